"""Real radiographs: the AASCE 2019 images under the paper's field-of-view protocol.

Each AASCE radiograph yields an upper and a lower crop that overlap by 2 to 4
vertebrae, each of T4..L4 labelled on only one of the two (the
`spine_radiographs/aasce_fov` TFDS config). The loss defaults to l3; pick
another with `--config.loss`, e.g. `--config.loss=l2`. The images are read
from `--config.dataset.manual_dir`, by default `../shared/data/aasce` beside
the repository (the layout of its README).

Command:
  python -m vertjax.main --config=configs/aasce_fov.py --config.loss=l2 \
      --workdir=runs/aasce_fov_l2
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the aasce_fov configuration (loss overridable with --config.loss)."""
    config = default.get_config()
    config.name = "aasce_fov"
    config.dataset.name = "aasce_fov"
    # Without the official AASCE test part (data/test) the dataset has only
    # train and validation: report the last checkpoint on validation, so the
    # figure is not the one used to pick a checkpoint.
    config.eval_split = "validation"
    config.eval_checkpoint = "latest"
    return config
