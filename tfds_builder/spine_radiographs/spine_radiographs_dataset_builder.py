"""spine_radiographs: sagittal spine radiographs with T4-L4 centroid labels.

One record per radiograph, fixed shapes (docs/architecture.md, Records),
stored as array_record so that it is read without TensorFlow. Sources:
`synthetic` (procedural phantom, the default), `synthetic_small`, `aasce`
and `aasce_fov` (real AASCE 2019 images from a manual directory) and
`folder` (a user's images with an annotations.csv).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from tfds_builder.spine_radiographs import aasce, fov, records, synthetic
from tfds_builder.spine_radiographs import folder as folder_source
from vertjax import imaging, vertebrae

SOURCES: tuple[str, ...] = ("synthetic", "aasce", "aasce_fov", "folder")
# aasce_fov's second validation split: the validation images cut with wide edges.
WIDE_VALIDATION = "validation_wide"


@dataclasses.dataclass(eq=False)
class SpineConfig(tfds.core.BuilderConfig):
    """A source of radiographs.

    Attributes:
      source: one of SOURCES.
      num_participants: phantom participants (2 radiographs each); synthetic only.
      seed: phantom seed and the field-of-view crops' seed.
      image_size: model input side S.
      workers: processes rendering the phantom.
      train_draws: aasce_fov: crop pairs per training image; odd draws have
        wide edges (fov.split_fov).
    """

    source: str = "synthetic"
    num_participants: int = 0
    seed: int = 0
    image_size: int = records.IMAGE_SIZE
    workers: int = 2
    train_draws: int = 1

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(
                f"unknown source {self.source!r}: expected one of {', '.join(SOURCES)}"
            )
        if self.source == "synthetic" and self.num_participants < 1:
            raise ValueError("a synthetic config needs num_participants >= 1")


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for spine_radiographs."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "aasce_fov: several crop pairs per training image, half with wide edges; "
        "a validation_wide split.",
        "1.2.0": "pixel_spacing_mm holds the (row, column) spacing, so that non-square "
        "pixels give correct millimetres.",
    }
    BUILDER_CONFIGS = [
        SpineConfig(
            name="synthetic",
            description="Procedural phantom: 1,300 participants x 2 overlapping lateral films.",
            source="synthetic",
            num_participants=1300,
        ),
        SpineConfig(
            name="synthetic_small",
            description="Procedural phantom: 100 participants x 2 films, for tests and quick runs.",
            source="synthetic",
            num_participants=100,
        ),
        SpineConfig(
            name="aasce",
            description="AASCE 2019 AP radiographs, whole images, T4-L4 all labelled.",
            source="aasce",
        ),
        SpineConfig(
            name="aasce_fov",
            description=(
                "AASCE 2019 images cut into overlapping upper and lower films: 6 pairs per "
                "training image (3 with wide edges); validation with the paper's edges and "
                "validation_wide with wide ones."
            ),
            source="aasce_fov",
            train_draws=6,
        ),
        SpineConfig(
            name="folder",
            description="A user's radiographs with annotations.csv.",
            source="folder",
        ),
    ]
    DEFAULT_CONFIG_NAME = "synthetic"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    synthetic, synthetic_small: nothing to download.

    aasce, aasce_fov: the AASCE 2019 challenge data (SpineWeb dataset 16),
    laid out as
      <manual_dir>/boostnet_labeldata/data/training/*.jpg
      <manual_dir>/boostnet_labeldata/labels/training/<image>.jpg.mat
    and, optionally, the official test part as data/test and labels/test.

    folder: a directory of PNG, JPEG, TIFF or DICOM images with an
    annotations.csv (columns image, participant, vertebra, x, y, optional
    split and negative); see the README.
    """

    def __init__(self, *, file_format=None, **kwargs):
        # array_record is the format that reads without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._train_stats = records.PixelStats()
        self._pool = None

    def _info(self) -> tfds.core.DatasetInfo:
        info = self.dataset_info_from_configs(
            features=self._features(),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(),
        )
        # These records are never on the TFDS bucket; TFDS's lookup there
        # leaves an empty temporary directory behind for every unbuilt dataset.
        info.initialize_from_bucket = lambda: None
        return info

    def _features(self) -> tfds.features.FeaturesDict:
        size = self.builder_config.image_size
        k = vertebrae.K
        tensor = tfds.features.Tensor
        return tfds.features.FeaturesDict(
            {
                "image": tensor(
                    shape=(size, size, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                ),
                "centroids": tensor(shape=(k, 2), dtype=np.float32),
                "labeled": tensor(shape=(k,), dtype=np.bool_),
                "truth_centroids": tensor(shape=(k, 2), dtype=np.float32),
                "truth_visible": tensor(shape=(k,), dtype=np.bool_),
                "original_size": tensor(shape=(2,), dtype=np.int32),
                "pixel_spacing_mm": tensor(shape=(2,), dtype=np.float32),  # (row, column)
                "participant_id": tfds.features.Text(),
                "image_id": tfds.features.Text(),
            }
        )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        self._train_stats = records.PixelStats()
        config = self.builder_config
        # One pool for all splits: starting workers costs up to a second each.
        workers = config.workers if config.source == "synthetic" else 1
        with synthetic.worker_pool(workers, config.num_participants) as pool:
            self._pool = pool
            try:
                super()._download_and_prepare(dl_manager, download_config)
            finally:
                self._pool = None
        # Runs inside TFDS's temporary directory, before dataset_info and
        # metadata.json are written, so the statistics land with the data.
        mean, std = self._train_stats.result()
        self.info.metadata["pixel_mean"] = mean
        self.info.metadata["pixel_std"] = std

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Reads and validates every label first, so bad input fails before any write."""
        config = self.builder_config
        if config.source == "synthetic":
            by_split: dict[str, list[int]] = {}
            for index in range(config.num_participants):
                split = records.split_of(synthetic.participant_id(index))
                by_split.setdefault(split, []).append(index)
            return {
                split: self._generate_examples(split, indices)
                for split, indices in sorted(by_split.items())
            }
        manual_dir = os.fspath(dl_manager.manual_dir)
        if config.source in ("aasce", "aasce_fov"):
            return self._aasce_splits(manual_dir)
        return self._folder_splits(manual_dir)

    def _generate_examples(self, split: str, items: list) -> Iterator[tuple[str, dict]]:
        """Yields (stable id, record) for one split's items and counts train pixels.

        Args:
          split: split name.
          items: phantom participant indices, `aasce.Entry`s or
            `folder.FolderImage`s, by source.
        """
        source = self.builder_config.source
        if source == "synthetic":
            examples = self._synthetic_examples(items)
        elif source == "folder":
            examples = self._folder_examples(items)
        else:
            examples = self._aasce_examples(items, split)
        for key, record in examples:
            if split == "train":
                self._train_stats.add(record["image"])
            yield key, record

    def _synthetic_examples(self, indices: list[int]) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        yield from synthetic.generate(
            seed=config.seed,
            indices=indices,
            image_size=config.image_size,
            pool=self._pool,
        )

    def _aasce_splits(self, manual_dir: str):
        entries, _ = aasce.read_part(manual_dir, "training")
        by_split: dict[str, list[aasce.Entry]] = {}
        if aasce.has_part(manual_dir, "test"):
            by_split["test"], _ = aasce.read_part(manual_dir, "test")
            # A patient of the official test part must not be trained on.
            held_out = {e.participant_id for e in by_split["test"]}
            dropped = [e for e in entries if e.participant_id in held_out]
            if dropped:
                logging.warning(
                    "AASCE: %d training images belong to test patients; left out", len(dropped)
                )
            entries = [e for e in entries if e.participant_id not in held_out]
        for entry in entries:
            split = records.split_of(entry.participant_id, ("train", "validation"))
            by_split.setdefault(split, []).append(entry)
        if self.builder_config.source == "aasce_fov" and by_split.get("validation"):
            by_split[WIDE_VALIDATION] = by_split["validation"]
        return {
            split: self._generate_examples(split, chosen)
            for split, chosen in sorted(by_split.items())
            if chosen
        }

    def _fov_draws(self, split: str) -> list[tuple[int, bool]]:
        """(draw, wide) of the crop pairs cut from each image of `split`."""
        if split == WIDE_VALIDATION:
            return [(0, True)]
        if split == "train":
            return [(d, d % 2 == 1) for d in range(max(self.builder_config.train_draws, 1))]
        return [(0, False)]

    def _aasce_examples(self, entries: list[aasce.Entry], split: str) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for entry in entries:
            pixels, spacing = imaging.read_radiograph(entry.image_path)
            height, width = pixels.shape
            if config.source == "aasce":
                labeled = np.ones(vertebrae.K, dtype=bool)
                record = records.make_record(
                    pixels=pixels,
                    centroids_px=entry.centroids[fov.T4 : fov.L4 + 1],
                    labeled=labeled,
                    truth_centroids_px=None,
                    truth_visible=None,
                    spacing=spacing,
                    participant_id=entry.participant_id,
                    image_id=entry.image_id,
                    image_size=config.image_size,
                )
                yield entry.image_id, record
                continue
            pairs = [
                (draw, crop)
                for draw, wide in self._fov_draws(split)
                for crop in fov.split_fov(
                    entry.centroids,
                    width=width,
                    height=height,
                    seed=config.seed,
                    image_id=entry.image_id,
                    draw=draw,
                    wide=wide,
                )
            ]
            for draw, crop in pairs:
                x0, y0, x1, y1 = crop.box
                suffix = f"-{draw}" if draw else ""
                image_id = f"{entry.image_id}-{crop.view}{suffix}"
                record = records.make_record(
                    pixels=pixels[y0:y1, x0:x1],
                    centroids_px=crop.centroids,
                    labeled=crop.labeled,
                    truth_centroids_px=crop.centroids,
                    truth_visible=crop.truth_visible,
                    spacing=spacing,
                    participant_id=entry.participant_id,
                    image_id=image_id,
                    image_size=config.image_size,
                )
                yield image_id, record

    def _folder_splits(self, manual_dir: str):
        images = folder_source.read_folder(manual_dir)
        by_split: dict[str, list[folder_source.FolderImage]] = {}
        for image in images:
            split = image.split or records.split_of(image.participant_id)
            by_split.setdefault(split, []).append(image)
        if not by_split.get("train"):
            raise folder_source.FolderError(
                f"{manual_dir}: no image falls in the train split; add images or a split column"
            )
        return {
            split: self._generate_examples(split, chosen)
            for split, chosen in sorted(by_split.items())
        }

    def _folder_examples(
        self, images: list[folder_source.FolderImage]
    ) -> Iterator[tuple[str, dict]]:
        for image in images:
            pixels, spacing = imaging.read_radiograph(image.path)
            if pixels.shape != image.size:
                raise imaging.ImageError(
                    image.path, f"decoded size {pixels.shape} differs from header size {image.size}"
                )
            record = records.make_record(
                pixels=pixels,
                centroids_px=image.centroids,
                labeled=image.labeled,
                truth_centroids_px=None,
                truth_visible=None,
                spacing=spacing,
                participant_id=image.participant_id,
                image_id=image.image_id,
                image_size=self.builder_config.image_size,
            )
            yield image.image_id, record
