"""Command line: train and evaluate a configuration, or evaluate a workdir
(`vertjax train` and `vertjax evaluate`; the documented entry point).

  python -m vertjax.main --config=configs/l3.py
      trains in runs/l3 (resuming if it holds checkpoints), then evaluates the
      best checkpoint on the test split: runs/l3/results.json and results.md.
  python -m vertjax.main --config=configs/l3.py --mode=evaluate \
      --split=validation --checkpoint=latest

Config fields are overridden on the command line, e.g.
`--config.train_steps=500`. The logic lives in vertjax.train and
vertjax.evaluate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vertjax import cli, evaluate, run_log, sharding, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train then test, or evaluate.")
_SPLIT = flags.DEFINE_string("split", None, "Split for --mode=evaluate; default config.eval_split.")
cli.define_checkpoint_flag("best")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one line instead of a traceback for an override
    of a config field that does not exist (config_flags raises KeyError or
    AttributeError there, which absl does not catch)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        detail = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]
        name, _, hint = str(detail).partition("\n")
        field = name.strip("'\"")
        flag = next(
            (a for a in argv[1:] if a.startswith("--config.") and f".{field}" in a.split("=")[0]),
            "--config",
        )
        sys.exit(
            f"FATAL Flags parsing error: flag {flag}: the config has no field {field!r}. {hint}"
        )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    run_log.quiet_libraries()
    config = _CONFIG.value
    # Before anything else touches JAX: a multi-host run joins its processes.
    sharding.initialize_distributed(config.mesh)
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    logging.info("workdir %s, %d device(s): %s", workdir, jax.device_count(), jax.devices())
    try:
        if _MODE.value == "train":
            train.train_and_evaluate(config, workdir)
        else:
            evaluate.evaluate_checkpoint(
                config,
                workdir,
                split=_SPLIT.value or config.eval_split,
                checkpoint=flags.FLAGS.checkpoint,
            )
    except (*cli.EXPECTED_ERRORS, train.NonFiniteLossError) as e:
        # Config and data faults end with their message and exit status 1,
        # not a traceback.
        logging.error("%s", e)
        raise SystemExit(f"vertjax: {e}") from e


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
