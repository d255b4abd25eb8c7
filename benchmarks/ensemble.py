r"""Does averaging several runs' heatmaps (an ensemble) name more vertebrae?

Restores one checkpoint of each training run (the moving average of the
parameters where the run kept one) and evaluates, on each split and with the
first run's settings (post-processing, test-time mirror): every run alone,
then all of them with their heatmaps averaged before the points are decoded.
The runs must share the network's shape and the dataset (seeds of one
recipe).

Command (the run folders, then the flags):
  python -m benchmarks.ensemble runs/aasce_fov_seed0 runs/aasce_fov_seed1 \
      --checkpoint=latest --splits=validation,validation_wide --json=/tmp/ensemble.json
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import common
from vertjax import datasets, runs

FLAGS = flags.FLAGS

REPORTED = (
    "id_accuracy",
    "rmse_px",
    "level_slip_share",
    "all_correct_share",
    "presence_recall",
)


def evaluate_ensemble(
    workdirs: Sequence[str], checkpoint: str, splits: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per split and member ('0', '1', ...), then 'ensemble'."""
    import jax
    import jax.numpy as jnp

    from vertjax import evaluate, sharding

    mesh = sharding.make_mesh(1)
    restored = [runs.restore(w, checkpoint, mesh=mesh) for w in workdirs]
    config = restored[0].config
    for workdir, run in zip(workdirs[1:], restored[1:], strict=True):
        for field in ("model", "dataset", "image_size"):
            if run.config[field] != config[field]:
                raise ValueError(f"{workdir}: config.{field} differs from {workdirs[0]}'s")
    builder = runs.open_dataset(config)
    mean, std = datasets.pixel_stats(builder)
    # The prior reads every training label: fitted once, and only when used.
    prior = None
    if config.postprocess.enabled:
        prior = runs.fit_prior(builder.as_data_source("train"), int(config.image_size))
    apply_fn = restored[0].state.apply_fn
    members = [runs.inference_params(run.state) for run in restored]

    def ensemble_apply(variables: Any, images: jax.Array, train: bool = False) -> jax.Array:
        # The members' parameters are stacked on a leading axis: one vmapped pass.
        one = lambda params: apply_fn({"params": params}, images, train=train)  # noqa: E731
        return jax.vmap(one)(variables["params"]).astype(jnp.float32).mean(axis=0)

    weights = {str(i): (apply_fn, params) for i, params in enumerate(members)}
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    weights["ensemble"] = (ensemble_apply, stacked)
    rows = []
    for name, (apply, params) in weights.items():
        evaluator = evaluate.Evaluator(
            config, mesh, apply_fn=apply, mean=mean, std=std, prior=prior
        )
        for split in splits:
            summary = evaluator.run(params, builder.as_data_source(split))
            rows.append(
                {
                    "weights": name,
                    "run": workdirs[int(name)] if name != "ensemble" else "+".join(workdirs),
                    "step": None if name == "ensemble" else restored[int(name)].step,
                    "split": split,
                    **{key: summary.get(key) for key in REPORTED},
                }
            )
            print(f"{name} {split}: {100 * summary['id_accuracy']:.1f} %", flush=True)
    return rows


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", "latest", "'best', 'latest' or a step, for every run")
    flags.DEFINE_list("splits", ["validation"], "Splits, comma-separated: --splits=a,b.")
    common.define_json_flag()


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3:
        raise app.UsageError("give two or more training run folders, then the flags")
    rows = evaluate_ensemble(argv[1:], FLAGS.checkpoint, FLAGS.splits)
    info = common.machine_info()
    print(common.describe(info))
    print(
        common.format_table(
            ["weights", "split", "ID accuracy", "RMSE px", "one level off", "all right"],
            [
                [
                    r["weights"],
                    r["split"],
                    f"{100 * r['id_accuracy']:.1f} %",
                    f"{r['rmse_px']:.2f}",
                    f"{100 * r['level_slip_share']:.1f} %",
                    f"{100 * r['all_correct_share']:.1f} %",
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
