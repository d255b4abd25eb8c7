"""Loss l3: the default configuration trained with the paper's l3 loss.

Command:
  python -m vertjax.main --config=configs/l3.py

Measured (2-core CPU shared with other jobs, load average about 9, jax
0.10.2): the default model (U-Net, 16 base features, 4 poolings, group
norm; 2.16 M parameters) ran at 0.12 steps/s (8.3 s per step of batch 8,
augmentation on); a 20-step probe on synthetic_small took 3 min 45 s end to
end. The full 3,000-step schedule therefore needs a GPU or a lighter recipe
on this CPU; a complete run's time and test metrics are not measured yet.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l3'."""
    config = default.get_config()
    config.name = "l3"
    config.loss = "l3"
    return config
