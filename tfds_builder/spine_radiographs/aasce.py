"""Reader for the AASCE 2019 (BoostNet) spine radiographs and their `.mat` labels.

Layout of the manual directory (as in ../shared/data/aasce):
`boostnet_labeldata/data/<part>/<name>.jpg` and
`boostnet_labeldata/labels/<part>/<name>.jpg.mat`, `<part>` = training or
test. Each `.mat` holds `p2`, 68 x 2 (x, y) pixel corners, four per vertebra
T1..L5 (top-left, top-right, bottom-left, bottom-right); a centroid is the
mean of its four corners, and T4..L4 are vertebrae 3..15.

Faults found in the 481 training files, and what this reader does (473 kept):
- 18 files store the topmost vertebra last (groups in the order 16, 0, ..., 15
  from top to bottom): fixed by moving the last group to the front.
- 18 files have the four corners of some vertebra out of order (top and
  bottom or left and right swapped, or scrambled): fixed by re-sorting them
  clockwise from the top-left; the centroid, their mean, is unchanged.
- 3 files annotate one vertebra twice, on top of its neighbour (centroids
  0.02-0.07 x the median spacing apart; L5 on L4 twice, T7 on T6 once):
  rejected, since which vertebra is missing cannot be told.
- 5 files have vertebrae in some other wrong order (L5 placed between T11
  and T12, between L3 and L4, or between L4 and L5 and overlapping it; T1
  and T2 swapped and overlapping): rejected.
- 1 file (also rejected above) has a corner below the image. A corner
  outside is accepted when the centroid is inside; a centroid outside
  rejects the file.
- Checked and not found: missing or malformed `p2`, non-finite numbers,
  labels without images and images without labels; each would reject the
  file.
Each rejection is logged with the file and the reason and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import numpy as np
from absl import logging

NUM_VERTEBRAE: int = 17  # T1..L5 in the files
FIRST: int = 3  # T4 is the fourth vertebra of T1..L5
LAST: int = 15  # L4
# Neighbouring centroids closer than this share of the median spacing are one
# vertebra annotated twice (real neighbours measured >= 0.33 in this set).
DUPLICATE_RATIO: float = 0.25
ROOT: str = "boostnet_labeldata"
PARTS: tuple[str, ...] = ("training", "test")
_PARTICIPANT = re.compile(r"-(\d+)\s*[A-Za-z]?\s+AP$", re.IGNORECASE)


class AnnotationError(ValueError):
    """A label file that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One AASCE radiograph with its validated vertebrae.

    Attributes:
      image_path: the JPEG.
      image_id: stable id, the file name without extension.
      participant_id: the patient number shared by the 'A', 'B', ... films of
        one patient, else the image id.
      centroids: float64 [17, 2] (x, y) pixels, T1..L5, top to bottom.
      corners: float64 [17, 4, 2] (x, y) pixels, TL, TR, BL, BR.
      fixes: what was repaired, e.g. ('rotated groups',).
    """

    image_path: str
    image_id: str
    participant_id: str
    centroids: np.ndarray
    corners: np.ndarray
    fixes: tuple[str, ...]


def participant_of(image_id: str) -> str:
    """'sunhl-1th-02-Jan-2017-162 A AP' -> 'aasce-162'; others keep their id."""
    match = _PARTICIPANT.search(image_id)
    return f"aasce-{match.group(1)}" if match else f"aasce-{image_id}"


def sort_corners(quad: np.ndarray) -> np.ndarray:
    """[4, 2] corners in any order -> TL, TR, BL, BR.

    Walks the corners clockwise around their mean, starting from the one
    nearest the upper-left diagonal, which stays right for vertebrae tilted
    by less than about 45 degrees (sorting by y alone fails on tilted ones).
    """
    offset = quad - quad.mean(axis=0)
    angle = np.arctan2(offset[:, 1], offset[:, 0])  # y points down: clockwise
    cyclic = np.argsort(angle, kind="stable")
    distance = np.abs(np.angle(np.exp(1j * (angle[cyclic] + 0.75 * np.pi))))
    tl, tr, br, bl = np.roll(cyclic, -int(np.argmin(distance)))
    return quad[[tl, tr, bl, br]]


def check_points(
    points: np.ndarray, *, width: int, height: int, name: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Validates and repairs one `p2` array.

    Args:
      points: [68, 2] (x, y) pixels.
      width, height: the image size in pixels.
      name: file name for messages.

    Returns:
      (centroids [17, 2] (x, y), corners [17, 4, 2], fixes applied).

    Raises:
      AnnotationError: naming the file and the fault.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (NUM_VERTEBRAE * 4, 2):
        raise AnnotationError(f"{name}: p2 has shape {points.shape}, expected (68, 2)")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise AnnotationError(f"{name}: p2 row {int(np.argmax(bad))} is not finite")
    fixes = []
    quads = points.reshape(NUM_VERTEBRAE, 4, 2)
    sorted_quads = np.stack([sort_corners(q) for q in quads])
    if not np.array_equal(sorted_quads, quads):
        fixes.append("corners reordered")
    centroids = sorted_quads.mean(axis=1)
    order = np.argsort(centroids[:, 1], kind="stable")
    rotated = np.roll(np.arange(NUM_VERTEBRAE), 1)
    if np.array_equal(order, rotated):
        # The topmost vertebra stored last: a known fault of this set.
        sorted_quads, centroids = sorted_quads[order], centroids[order]
        fixes.append("groups rotated")
    elif not np.array_equal(order, np.arange(NUM_VERTEBRAE)):
        first = int(np.argmax(order != np.arange(NUM_VERTEBRAE)))
        raise AnnotationError(
            f"{name}: vertebrae out of order (group {first} lies below a later group)"
        )
    gaps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
    ratio = gaps / np.median(gaps)
    if ratio.min() < DUPLICATE_RATIO:
        k = int(np.argmin(ratio))
        raise AnnotationError(
            f"{name}: vertebra groups {k} and {k + 1} coincide (distance {gaps[k]:.1f} px, "
            f"{ratio[k]:.2f} x median): one vertebra annotated twice"
        )
    inside = (
        (centroids[:, 0] >= 0)
        & (centroids[:, 0] <= width)
        & (centroids[:, 1] >= 0)
        & (centroids[:, 1] <= height)
    )
    if not inside.all():
        k = int(np.argmax(~inside))
        raise AnnotationError(
            f"{name}: centroid of vertebra group {k} {tuple(np.round(centroids[k], 1))} "
            f"outside the {width} x {height} image"
        )
    corners_out = ~(
        (sorted_quads[..., 0] >= 0)
        & (sorted_quads[..., 0] <= width)
        & (sorted_quads[..., 1] >= 0)
        & (sorted_quads[..., 1] <= height)
    )
    if corners_out.any():
        fixes.append("corner outside image")
    return centroids, sorted_quads, tuple(fixes)


def read_label(mat_path: str) -> np.ndarray:
    """The raw `p2` [68, 2] of one `.mat` file; AnnotationError when unusable."""
    import scipy.io

    try:
        data = scipy.io.loadmat(mat_path)
    except Exception as e:  # scipy raises many types for damaged files
        raise AnnotationError(f"{mat_path}: unreadable .mat file ({e})") from e
    if "p2" not in data:
        raise AnnotationError(f"{mat_path}: no variable 'p2'")
    return np.asarray(data["p2"])


def list_part(manual_dir: str, part: str) -> list[tuple[str, str]]:
    """[(image path, label path or '')] of one part, sorted by name."""
    image_dir = os.path.join(manual_dir, ROOT, "data", part)
    label_dir = os.path.join(manual_dir, ROOT, "labels", part)
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".jpeg")))
    labels = set(os.listdir(label_dir)) if os.path.isdir(label_dir) else set()
    pairs = []
    for image in images:
        label = image + ".mat"
        pairs.append(
            (
                os.path.join(image_dir, image),
                os.path.join(label_dir, label) if label in labels else "",
            )
        )
    image_set = set(images)
    for label in sorted(labels):
        if label.endswith(".mat") and label[: -len(".mat")] not in image_set:
            pairs.append(("", os.path.join(label_dir, label)))
    return pairs


def has_part(manual_dir: str, part: str) -> bool:
    return os.path.isdir(os.path.join(manual_dir, ROOT, "data", part))


def read_part(manual_dir: str, part: str) -> tuple[list[Entry], collections.Counter]:
    """Reads and validates every labelled image of one part.

    Args:
      manual_dir: directory holding `boostnet_labeldata/`.
      part: 'training' or 'test'.

    Returns:
      (accepted entries sorted by image id, counts of fixes and rejections).

    Raises:
      FileNotFoundError: the part's image directory is missing.
    """
    from PIL import Image

    image_dir = os.path.join(manual_dir, ROOT, "data", part)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: AASCE image directory not found")
    counts: collections.Counter = collections.Counter()
    entries = []
    for image_path, label_path in list_part(manual_dir, part):
        counts["files"] += 1
        try:
            if not image_path:
                raise AnnotationError(f"{label_path}: label without an image")
            if not label_path:
                raise AnnotationError(f"{image_path}: image without a label file")
            points = read_label(label_path)
            try:
                with Image.open(image_path) as im:
                    width, height = im.size
            except OSError as e:
                raise AnnotationError(f"{image_path}: unreadable image ({e})") from e
            centroids, corners, fixes = check_points(
                points, width=width, height=height, name=label_path
            )
        except AnnotationError as e:
            counts["rejected"] += 1
            logging.warning("AASCE: rejected %s", e)
            continue
        for fix in fixes:
            counts[fix] += 1
            logging.info("AASCE: %s: %s", os.path.basename(label_path), fix)
        image_id = os.path.splitext(os.path.basename(image_path))[0]
        entries.append(
            Entry(
                image_path=image_path,
                image_id=image_id,
                participant_id=participant_of(image_id),
                centroids=centroids,
                corners=corners,
                fixes=fixes,
            )
        )
    counts["accepted"] = len(entries)
    logging.info("AASCE %s: %s", part, dict(counts))
    return entries, counts
