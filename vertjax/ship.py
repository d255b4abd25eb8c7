"""Ship a training run's model: one verified folder that predicts with no run at hand.

Command:
  python -m vertjax.ship --workdir=runs/aasce_fov_seed0 [--checkpoint=latest] \
      --out=vertjax/shipped_models/aasce_fov --description="..." \
      [--results=runs/aasce_fov_seed0/results.json ...]

Takes the checkpoint's parameters (the moving average where the run kept
one), its config, the training split's pixel statistics and post-processing
prior, and writes them with `vertjax.shipped.write`. Each `--results` file
(a `results.json` of that checkpoint) adds its metrics under its split.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from vertjax import predict, shipped

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training run folder.", required=True)
    flags.DEFINE_string("checkpoint", "latest", "'best', 'latest' or a step number.")
    flags.DEFINE_string("out", None, "Model folder to write.", required=True)
    flags.DEFINE_string("description", "", "One line on what the model is for.")
    flags.DEFINE_multi_string("results", [], "results.json files of this checkpoint to record.")


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        model = predict.load_model(FLAGS.workdir, FLAGS.checkpoint)
        metrics = {}
        for path in FLAGS.results:
            with open(path) as f:
                record = json.load(f)
            if record.get("steps") != model.step:
                raise ValueError(
                    f"{path}: results of checkpoint {record.get('steps')}, "
                    f"not of the shipped step {model.step}"
                )
            metrics[record["split"]] = record
        folder = shipped.write(
            FLAGS.out,
            config=model.config,
            params=model.variables["params"],
            pixel_mean=model.pixel_mean,
            pixel_std=model.pixel_std,
            prior=model.prior,
            step=model.step,
            description=FLAGS.description,
            training_data=f"spine_radiographs/{model.config.dataset.name}",
            metrics=metrics,
        )
        shipped.load(folder)  # read back: what is shipped must verify
    except (OSError, ValueError) as e:
        print(f"vertjax.ship: {e}", file=sys.stderr)
        return 1
    print(f"vertjax.ship: wrote {folder} (step {model.step})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
