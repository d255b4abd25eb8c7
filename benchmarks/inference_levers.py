"""What each inference-time lever adds to one trained checkpoint.

Evaluates one checkpoint of a run on one or more splits with every
combination of: the moving average of the parameters or the raw ones (when
the run kept an average), the anatomical-order post-processing on or off, and
test-time mirror averaging on or off. Training is not repeated: the levers
that act at inference are compared on the same weights.

Command:
  python -m benchmarks.inference_levers runs/aasce_fov_seed0 --checkpoint=latest \
      --splits validation validation_wide --json /tmp/levers.json
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any

from benchmarks import common


def evaluate_levers(workdir: str, checkpoint: str, splits: list[str]) -> list[dict[str, Any]]:
    import ml_collections

    from vertjax import checkpoints, data, evaluate, sharding, train

    ckpt = checkpoints.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"), read_only=True
    )
    try:
        step = ckpt.resolve(checkpoint)
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        mesh = sharding.make_mesh(1)
        state, _ = ckpt.restore(step, state=train.abstract_train_state(config, mesh))
    finally:
        ckpt.close()
    builder = train.open_dataset(config)
    mean, std = data.pixel_stats(builder)
    train_source = builder.as_data_source("train")
    prior = evaluate.fit_prior(train_source, int(config.image_size))
    weights = {"raw": state.params}
    if train.inference_params(state) is not state.params:
        weights["ema"] = train.inference_params(state)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="training run folder")
    parser.add_argument("--checkpoint", default="latest", help="'best', 'latest' or a step")
    parser.add_argument("--splits", nargs="+", default=["validation"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = evaluate_levers(args.workdir, args.checkpoint, args.splits)
    print(common.describe(common.machine_info()))
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
    if args.json:
        common.write_json(args.json, {"machine": common.machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
