"""The spine_radiographs dataset: build it, open it, look at it.

Library: `get_builder` registers the TFDS builder, builds the dataset on
first use and returns it; `pixel_stats` gives the training split's pixel
mean and std. Command line:

  python -m vertjax.data build --config=synthetic_small [--manual_dir=D] [--data_dir=D]
  python -m vertjax.data preview --config=synthetic_small --out=preview.png [--split=train] [--count=8]

Reading goes through `builder.as_data_source(split)` (array_record), which
needs no TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

# Importing the builder module registers `spine_radiographs` with TFDS.
from tfds_builder.spine_radiographs import aasce, folder
from tfds_builder.spine_radiographs import spine_radiographs_dataset_builder as sr
from vertjax import imaging, vertebrae

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


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def preview(builder, out: str, *, split: str = "train", count: int = 8) -> str:
    """Draws a grid of radiographs with their centroids marked by name.

    Labelled centroids are drawn in one colour, visible-but-unlabelled ones
    (`truth_visible & ~labeled`) in another.

    Args:
      builder: a prepared builder.
      out: PNG path to write.
      split: split to draw from.
      count: number of radiographs (the first ones of the split).

    Returns:
      The path written.
    """
    # Imported here: only previews draw, and training should not load matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if split not in builder.info.splits:
        raise DataError(f"no split {split!r}; this dataset has {', '.join(builder.info.splits)}")
    source = builder.as_data_source(split)
    count = min(count, len(source))
    if count < 1:
        raise DataError(f"split {split!r} is empty")
    cols = min(4, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    handles = {}
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        record = source[i]
        ax = axes.flat[i]
        image = np.asarray(record["image"])[:, :, 0]
        size = image.shape[0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, size, size, 0))
        labeled = np.asarray(record["labeled"])
        unlabeled = np.asarray(record["truth_visible"]) & ~labeled
        for mask, points, colour, kind in (
            (labeled, record["centroids"], "lime", "labelled"),
            (unlabeled, record["truth_centroids"], "orange", "visible, unlabelled"),
        ):
            points = np.asarray(points) * size
            for k in np.flatnonzero(mask):
                handles[kind] = ax.plot(*points[k], "+", color=colour, ms=7, mew=1.5)[0]
                ax.annotate(
                    vertebrae.NAMES[k],
                    points[k],
                    xytext=(4, 0),
                    textcoords="offset points",
                    color=colour,
                    fontsize=6,
                    va="center",
                )
        ax.set_title(_text(record["image_id"])[-28:], fontsize=7)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{builder.info.full_name} / {split}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when run as a program, so that importing
    this module from another absl program cannot clash with its flags."""
    flags.DEFINE_string("config", "synthetic", "Dataset config (spine_radiographs/<config>).")
    flags.DEFINE_string("manual_dir", None, "Source directory for aasce, aasce_fov and folder.")
    flags.DEFINE_string(
        "data_dir", None, f"Dataset directory (default ${DATA_DIR_ENV} or ~/tensorflow_datasets)."
    )
    flags.DEFINE_string("out", None, "preview: PNG file to write.")
    flags.DEFINE_string("split", "train", "preview: split to draw.")
    flags.DEFINE_integer("count", 8, "preview: number of radiographs.")


COMMANDS: tuple[str, ...] = ("build", "preview")


# Faults of the input that deserve one line, not a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    folder.FolderError,
    aasce.AnnotationError,
    imaging.ImageError,
    FileNotFoundError,
)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        print(
            f"usage: python -m vertjax.data {{{'|'.join(COMMANDS)}}} --config=NAME ...",
            file=sys.stderr,
        )
        return 1
    command = argv[1]
    try:
        if command == "preview" and not FLAGS.out:
            raise DataError("preview needs --out=FILE.png")
        builder = get_builder(
            FLAGS.config,
            data_dir=FLAGS.data_dir,
            manual_dir=FLAGS.manual_dir,
            build=True,
        )
        if command == "build":
            mean, std = pixel_stats(builder)
            print(f"{builder.info.full_name} at {builder.data_dir}")
            for split, n in split_counts(builder).items():
                print(f"  {split}: {n} radiographs")
            print(f"  train pixel mean {mean:.2f}, std {std:.2f}")
        else:
            path = preview(builder, FLAGS.out, split=FLAGS.split, count=FLAGS.count)
            print(f"wrote {path}")
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
