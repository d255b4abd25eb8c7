"""Tiny CPU configuration for tests and a quick check that everything runs.

A 2-level U-Net with 4 base features trained for a few steps on
`synthetic_small`; it proves the plumbing (data, train step, checkpoints,
evaluation, results files), not accuracy.

Command:
  python -m vertjax.main --config=configs/test.py --workdir=/tmp/vertjax_test

Measured (2-core CPU shared with other jobs, jax 0.10.2), synthetic_small
already built: 37-53 s wall time with a cold XLA cache, 17 s with
JAX_COMPILATION_CACHE_DIR warm; building synthetic_small first adds about
23 s. Result: test ID accuracy about 3 % after 6 steps (plumbing, not
accuracy).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny test configuration."""
    config = default.get_config()
    config.name = "test"
    config.dataset.name = "synthetic_small"
    config.model.features = 4
    config.model.depth = 2
    config.optimizer.warmup_steps = 2
    config.batch_size = 2
    config.eval_batch_size = 4
    config.train_steps = 6
    config.log_every = 2
    config.eval_every = 3
    config.val_max_batches = 2
    config.checkpoint_every = 3
    config.keep_checkpoints = 1
    config.tensorboard_examples = 0  # tests/test_main.py turns it on for one run
    config.read_threads = 1
    return config
