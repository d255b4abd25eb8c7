"""Loss l2: the default configuration trained with the paper's l2 loss.

Command:
  python -m vertjax.main --config=configs/l2.py

Time and result: not yet measured as a full run; the model, data and step
are those of configs/l3.py, whose docstring gives the measured step time.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration with loss 'l2'."""
    config = default.get_config()
    config.name = "l2"
    config.loss = "l2"
    return config
