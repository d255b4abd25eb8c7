"""Loss l3: the default configuration trained with the paper's l3 loss.

Command:
  python -m vertjax.main --config=configs/l3.py

Measured (2-core AMD EPYC CPU, no other load, jax 0.10.2, synthetic dataset
already built; building it first adds about 30 s idle, 2 min under load):
16 min 23 s wall clock for the whole command (1,500 steps of batch 4 at 1.6
steps/s, 879 s of training, then the test evaluation). Best checkpoint
(step 1500) on the synthetic test split (246 films, 1,599 labelled
vertebrae): ID accuracy 83.0 %, RMSE 5.96 px, mean error 36.4 px (7.8 mm).
The same command gave 90.1 % with seed 1, and 97.6 % / 89.8 % (seeds 0 / 1)
with an up-sampling layer that differs only in float rounding: the spread
between runs of this short schedule is wide (README, "Built-in synthetic
data").
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l3'."""
    config = default.get_config()
    config.name = "l3"
    config.loss = "l3"
    return config
