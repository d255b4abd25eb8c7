r"""What each inference-time lever adds to one trained checkpoint.

Evaluates one checkpoint of a run on one or more splits with every
combination of: the moving average of the parameters or the raw ones (when
the run kept an average), the anatomical-order post-processing on or off, and
test-time mirror averaging on or off. Training is not repeated: the levers
that act at inference are compared on the same weights.

Command (the training run folder, then the flags; `--splits` takes a
comma-separated list, an absl list flag):
  python -m benchmarks.inference_levers runs/aasce_fov_seed0 --checkpoint=latest \
      --splits=validation,validation_wide --json=/tmp/levers.json
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import common
from vertjax import datasets, runs

FLAGS = flags.FLAGS


def evaluate_levers(workdir: str, checkpoint: str, splits: list[str]) -> list[dict[str, Any]]:
    """One row (ID accuracy, RMSE) per weights x post-processing x mirror x split."""
    import ml_collections

    from vertjax import evaluate, sharding

    mesh = sharding.make_mesh(1)
    restored = runs.restore(workdir, checkpoint, mesh=mesh)
    state, step, config = restored.state, restored.step, restored.config
    builder = runs.open_dataset(config)
    mean, std = datasets.pixel_stats(builder)
    train_source = builder.as_data_source("train")
    prior = runs.fit_prior(train_source, int(config.image_size))
    weights = {"raw": state.params}
    if runs.inference_params(state) is not state.params:
        weights["ema"] = runs.inference_params(state)
    rows = []
    # One evaluator (one compilation) per setting, run on each set of weights.
    for post, flip in itertools.product((False, True), (False, True)):
        variant = ml_collections.ConfigDict(config.to_dict())
        variant.postprocess.enabled = post
        variant.test_time_flip = flip
        evaluator = evaluate.Evaluator(
            variant, mesh, apply_fn=state.apply_fn, mean=mean, std=std, prior=prior
        )
        for (name, params), split in itertools.product(weights.items(), splits):
            summary = evaluator.run(params, builder.as_data_source(split))
            rows.append(
                {
                    "step": step,
                    "weights": name,
                    "postprocess": post,
                    "test_time_flip": flip,
                    "split": split,
                    "id_accuracy": summary["id_accuracy"],
                    "rmse_px": summary["rmse_px"],
                }
            )
            print(
                f"{name} postprocess={post} flip={flip} {split}: "
                f"{100 * summary['id_accuracy']:.1f} %",
                flush=True,
            )
    rows.sort(key=lambda r: list(weights).index(r["weights"]))
    return rows


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", "latest", "'best', 'latest' or a step")
    flags.DEFINE_list("splits", ["validation"], "Splits, comma-separated: --splits=a,b.")
    common.define_json_flag()


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give one training run folder, then the flags")
    rows = evaluate_levers(argv[1], FLAGS.checkpoint, FLAGS.splits)
    info = common.machine_info()
    print(common.describe(info))
    print(
        common.format_table(
            ["weights", "post-processing", "test-time flip", "split", "ID accuracy", "RMSE px"],
            [
                [
                    r["weights"],
                    "on" if r["postprocess"] else "off",
                    "on" if r["test_time_flip"] else "off",
                    r["split"],
                    f"{100 * r['id_accuracy']:.1f} %",
                    f"{r['rmse_px']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    if FLAGS.json:
        common.write_json(FLAGS.json, {"machine": info, "rows": rows})


if __name__ == "__main__":
    define_flags()
    app.run(main)
