"""Loss l3: the default configuration trained with the paper's l3 loss.

Command:
  python -m vertjax.main --config=configs/l3.py

Measured on the synthetic test split (246 films, 1,599 labelled vertebrae),
best checkpoint, current tree: ID accuracy 95.6 % (seed 0, RMSE 6.70 px),
94.7 % (seed 1) and 96.6 % (seed 2); README, "Built-in synthetic data".
Time on the 2-core AMD EPYC CPU with no other load: 1,500 steps of batch 4
at 0.75-1.6 steps/s depending on the day, so 16 to 35 minutes of training.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l3'."""
    config = default.get_config()
    config.name = "l3"
    config.loss = "l3"
    return config
