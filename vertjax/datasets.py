"""The spine_radiographs TFDS dataset: register, build on first use, open.

`get_builder` returns a prepared builder of one config (building it when
missing, and leaving nothing half-made when a build fails); `pixel_stats`
gives the training split's pixel statistics stored with it. Reading goes
through `builder.as_data_source(split)` (array_record), which needs no
TensorFlow. `vertjax.runs.open_dataset` opens the dataset of a config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

# Importing the builder module registers `spine_radiographs` with TFDS.
from tfds_builder.spine_radiographs import spine_radiographs_dataset_builder as sr
from vertjax import files

DATASET: str = "spine_radiographs"
DATA_DIR_ENV: str = "VERTJAX_DATA_DIR"
# Where the AASCE images sit beside a checkout: ../shared/data/aasce.
DEFAULT_AASCE_DIR: Path = Path(__file__).resolve().parents[2] / "shared" / "data" / "aasce"
AASCE_CONFIGS: frozenset[str] = frozenset({"aasce", "aasce_fov"})


class DataError(RuntimeError):
    """A dataset that cannot be opened or built; the message says why."""


def default_data_dir() -> str:
    """$VERTJAX_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def config_name(name: str) -> str:
    """'synthetic' or 'spine_radiographs/synthetic' -> 'synthetic'."""
    prefix = DATASET + "/"
    return name[len(prefix) :] if name.startswith(prefix) else name


def _manual_dir(config: str, manual_dir: str | None) -> str | None:
    if manual_dir:
        if not os.path.isdir(manual_dir):
            raise DataError(f"{manual_dir}: manual directory not found")
        return os.fspath(manual_dir)
    if config in AASCE_CONFIGS:
        if DEFAULT_AASCE_DIR.is_dir():
            return os.fspath(DEFAULT_AASCE_DIR)
        raise DataError(
            f"config {config!r} needs --manual_dir pointing at the AASCE data "
            f"(a directory holding boostnet_labeldata/); {DEFAULT_AASCE_DIR} does not exist"
        )
    if config == "folder":
        raise DataError("config 'folder' needs --manual_dir: the folder with annotations.csv")
    return None


def get_builder(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    build: bool = True,
):
    """The spine_radiographs builder of one config, built on first use.

    Args:
      name: config name ('synthetic', 'synthetic_small', 'aasce', 'aasce_fov',
        'folder'), optionally prefixed 'spine_radiographs/'.
      data_dir: where datasets live; default `default_data_dir()`.
      manual_dir: the source directory for aasce, aasce_fov (default
        ../shared/data/aasce beside the repository) and folder (required).
      build: build the dataset when it is not there yet; if False, a missing
        dataset raises DataError.

    Returns:
      A prepared `tfds.core.DatasetBuilder`; read it with
      `builder.as_data_source(split)`.
    """
    config = config_name(name)
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    if not files.is_local(data_dir):
        # array_record opens its files with plain file descriptors.
        raise DataError(
            f"{data_dir}: datasets are read and built on a local disk only (array_record "
            "opens local files); copy the dataset folder to each host, or mount the bucket "
            "(Cloud Storage FUSE), and give that folder as the data directory"
        )
    known = [c.name for c in sr.Builder.BUILDER_CONFIGS]
    if config not in known:
        raise DataError(f"unknown dataset config {config!r}: expected one of {', '.join(known)}")
    builder = tfds.builder(f"{DATASET}/{config}", data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if not build:
        raise DataError(f"dataset {DATASET}/{config} is not built in {data_dir}")
    download_config = tfds.download.DownloadConfig(manual_dir=_manual_dir(config, manual_dir))
    logging.info("building %s/%s in %s", DATASET, config, data_dir)
    created = _missing_dirs(builder, data_dir)
    try:
        builder.download_and_prepare(download_config=download_config, file_format="array_record")
    except BaseException:
        # TFDS removes its temporary directory; also drop the empty folders
        # and markers this attempt created, so nothing half-made remains.
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return builder


def _missing_dirs(builder, data_dir: str) -> list[str]:
    """Directories a build may create that do not exist yet, deepest first."""
    candidates = [
        os.fspath(builder.data_path.parent),  # .../spine_radiographs/<config>
        os.path.join(data_dir, DATASET),
        os.path.join(data_dir, "downloads"),
        data_dir,  # when this build made it, nothing else is in it
    ]
    return [path for path in candidates if not os.path.exists(path)]


def pixel_stats(builder) -> tuple[float, float]:
    """(mean, std) of the training split's pixels on the uint8 scale (0-255)."""
    metadata = builder.info.metadata
    try:
        return float(metadata["pixel_mean"]), float(metadata["pixel_std"])
    except (KeyError, TypeError):
        raise DataError(
            f"{builder.data_dir}: dataset has no pixel statistics; rebuild it"
        ) from None


def split_counts(builder) -> dict[str, int]:
    """Number of records per split."""
    return {name: int(info.num_examples) for name, info in builder.info.splits.items()}
