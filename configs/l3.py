"""Loss l3: the default configuration trained with the paper's l3 loss.

Command:
  python -m vertjax.main --config=configs/l3.py

Measured on the synthetic test split (246 films, 1,599 labelled vertebrae),
best checkpoint, the patch stem: ID accuracy 99.0 % (seed 0, RMSE 6.14 px;
the shipped `phantom` model), 98.1 % (seed 1) and 99.4 % (seed 2); with the
full-resolution conv stem 95.6 / 94.7 / 96.6 %. README, "Built-in
synthetic data". Time on the 2-core AMD EPYC CPU: 24 min 36 s wall clock
for seed 0 on 2026-12-03 (1.0 steps/s, a day this VM ran at half its best
speed).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l3'."""
    config = default.get_config()
    config.name = "l3"
    config.loss = "l3"
    return config
