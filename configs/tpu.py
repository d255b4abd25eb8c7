"""Cloud TPU configuration: the default recipe data-parallel over a TPU slice.

The same model, loss (l3) and schedule as configs/default.py, with a global
batch of 64 split over all chips of all hosts (8 per chip on a v5e-8, 4 per
chip on the 16 chips of a v4-32), `jax.distributed.initialize()` first so that
every host of a slice joins the run (on a single-host TPU VM it finds one
process), and checkpoints twice as often because Spot TPUs are preempted.
docs/cloud_tpu.md has the whole procedure: creating the TPU VM, installing
vertjax, the dataset on a Cloud Storage bucket, launching on all workers,
logs and resuming.

Command (on every worker of the TPU VM, from the vertjax checkout):
  VERTJAX_DATA_DIR=gs://BUCKET/tensorflow_datasets \
  .venv/bin/python -m vertjax.main --config=configs/tpu.py --workdir=/mnt/vertjax/runs/tpu_l3

Expected time and result: not measured; no TPU was available when this
configuration was written. What was verified, on a 2-core CPU only: the same
batches give the same losses, parameters and metrics on 1 and 8 devices and
in a run of two processes joined by jax.distributed (tests/test_sharding.py,
tests/test_multiprocess.py). The batch is 8x the default's, so 3,000 steps
show the model 8x as many radiographs; scale train_steps (and perhaps the
learning rate) to the budget and say what you measured.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the Cloud TPU configuration."""
    config = default.get_config()
    config.name = "tpu"
    # A multiple of the device count: 8 on a v5e-8, 16 on a v4-32.
    config.batch_size = 64
    config.eval_batch_size = 64
    config.checkpoint_every = 250
    config.read_threads = 16  # TPU hosts have many cores; records are small
    config.mesh.distributed = True  # JAX reads the slice's hosts from the TPU metadata
    return config
