"""Record assembly shared by every source, the split rule and pixel statistics.

Every source (phantom, AASCE, folder) ends in `make_record`, so all configs
produce the same fixed-shape records (docs/architecture.md, Records). Kept
free of TFDS so that build worker processes start quickly.
"""

from __future__ import annotations

import hashlib

import numpy as np

from vertjax import imaging

IMAGE_SIZE: int = 264
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Cumulative bounds of the 80/10/10 split on the hash's unit interval.
_SPLIT_BOUNDS: tuple[float, float] = (0.8, 0.9)


def split_fraction(participant_id: str) -> float:
    """A stable number in [0, 1) for a participant: sha256, not Python's hash."""
    digest = hashlib.sha256(participant_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(participant_id: str, splits: tuple[str, ...] = SPLITS) -> str:
    """The split of a participant: 80/10/10, or 80/10 when there is no test split."""
    u = split_fraction(participant_id)
    if "test" not in splits:
        # Keep the 80:10 ratio between train and validation.
        return "train" if u < _SPLIT_BOUNDS[0] / _SPLIT_BOUNDS[1] else "validation"
    if u < _SPLIT_BOUNDS[0]:
        return "train"
    return "validation" if u < _SPLIT_BOUNDS[1] else "test"


def make_record(
    *,
    pixels: np.ndarray,
    centroids_px: np.ndarray,
    labeled: np.ndarray,
    truth_centroids_px: np.ndarray | None,
    truth_visible: np.ndarray | None,
    spacing: imaging.PixelSpacing | None,
    participant_id: str,
    image_id: str,
    image_size: int = IMAGE_SIZE,
) -> dict:
    """One record from an image in its original resolution.

    Args:
      pixels: float [H, W] in [0, 1] (or uint8 [H, W]).
      centroids_px: float [13, 2] (x, y) original pixels; ignored where not
        labeled.
      labeled: bool [13].
      truth_centroids_px, truth_visible: [13, 2], [13] every vertebra whose
        centroid lies in the image, or None when the source does not know them
        (then they copy the labels).
      spacing: the pixel spacing, None when unknown; stored as
        pixel_spacing_mm = (row, column) mm per pixel, (0, 0) when unknown.
      participant_id, image_id: stable ids.
      image_size: model input side S.

    Returns:
      A dict matching `features(image_size)`; centroids normalised to [0, 1].
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    height, width = pixels.shape
    scale = np.array([width, height], dtype=np.float64)
    labeled = np.asarray(labeled, dtype=bool)
    centroids = np.where(labeled[:, None], np.asarray(centroids_px, np.float64) / scale, 0.0)
    if truth_visible is None:
        truth_visible, truth = labeled.copy(), centroids.copy()
    else:
        truth_visible = np.asarray(truth_visible, dtype=bool)
        truth = np.where(
            truth_visible[:, None], np.asarray(truth_centroids_px, np.float64) / scale, 0.0
        )
    for name, points, mask in (("centroids", centroids, labeled), ("truth", truth, truth_visible)):
        inside = np.all((points >= 0.0) & (points <= 1.0), axis=1) & np.isfinite(points).all(1)
        if np.any(mask & ~inside):
            raise ValueError(f"{image_id}: {name} outside the image or not finite")
    if np.any(labeled & ~truth_visible):
        raise ValueError(f"{image_id}: a labelled vertebra is not marked visible")
    image = imaging.to_model_input(pixels, image_size)[:, :, None]
    return {
        "image": image,
        "centroids": centroids.astype(np.float32),
        "labeled": labeled,
        "truth_centroids": truth.astype(np.float32),
        "truth_visible": truth_visible,
        "original_size": np.array([height, width], dtype=np.int32),
        "pixel_spacing_mm": np.array(
            (0.0, 0.0) if spacing is None else (spacing.row_mm, spacing.column_mm), np.float32
        ),
        "participant_id": participant_id,
        "image_id": image_id,
    }


class PixelStats:
    """Running mean and standard deviation of uint8 pixels (exact, float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, image: np.ndarray) -> None:
        values = np.asarray(image, dtype=np.float64)
        self.count += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())

    def result(self) -> tuple[float, float]:
        """(mean, std) on the 0-255 scale; ValueError when nothing was added."""
        if self.count == 0:
            raise ValueError("no training images: cannot compute pixel statistics")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return mean, float(np.sqrt(var))
