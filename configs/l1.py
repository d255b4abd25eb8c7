"""Loss l1: the default configuration trained with the paper's l1 loss.

Command:
  python -m vertjax.main --config=configs/l1.py

Time and result: not yet measured as a full run; the model, data and step
are those of configs/l3.py, whose docstring gives the measured step time.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l1'."""
    config = default.get_config()
    config.name = "l1"
    config.loss = "l1"
    return config
