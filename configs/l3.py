"""Loss l3: the default configuration trained with the paper's l3 loss.

Command:
  python -m vertjax.main --config=configs/l3.py

Measured (2-core AMD EPYC CPU, no other load, jax 0.10.2, synthetic dataset
already built; building it first adds about 30 s idle, 2 min under load):
20 min 9 s wall clock for the whole command (1,500 steps of batch 4 at 1.28
steps/s, 1,096 s of training, then the test evaluation). Best checkpoint
(step 1500) on the synthetic test split (246 films, 1,599 labelled
vertebrae): ID accuracy 97.6 %, RMSE 6.85 px, mean error 10.4 px (2.28 mm),
presence precision 100 % / recall 85.2 %, visible-but-unlabelled recall
54.1 %. Validation ID accuracy: 47.8 % at step 250, 76.7 % at 500, 89.6 % at
1000, 97.4 % at 1500.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l3'."""
    config = default.get_config()
    config.name = "l3"
    config.loss = "l3"
    return config
