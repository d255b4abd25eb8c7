"""The paper's field-of-view protocol applied to fully labelled real images.

The paper's radiographs come in pairs: an upper film and a lower film of one
participant that overlap by a few vertebrae, with each of T4..L4 labelled on
only one of them. `split_fov` makes such a pair from one image whose 17
vertebrae T1..L5 are all known:

- upper crop: top edge between C7 (extrapolated) and T3, bottom edge just
  below T11, T12 or L1;
- lower crop: top edge just above a vertebra chosen so that 2 to 4 of T4..L4
  are on both crops (top between T9 and T12), bottom edge between L5 and the
  sacrum (extrapolated), clipped to the image;
- each edge falls a random fraction of the way between two neighbouring
  centroids (the random margin), left and right edges trim a random 0-10 %
  but never cut off a centroid of the crop's vertebrae;
- T4 .. b are labelled on the upper crop and b+1 .. L4 on the lower, for a
  random b inside the overlap; `truth_visible` marks every vertebra whose
  centroid lies in the crop.

With `wide=True` the outer edges range further, as real films do: the
upper crop's top anywhere from the image top down to T3, the lower crop's
bottom anywhere from just below L5 down to the image bottom. A model trained
only on the paper's edges learns to name vertebrae by where the film starts
or ends; the wide crops train and check that it does not.

Everything is drawn from `numpy.random.default_rng`, seeded by the seed, the
image id, the draw number and the protocol, so the crops are a pure function
of those and the labels; draw 0 of the paper's protocol keeps the stream of
the first release, so its crops are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from vertjax import vertebrae

# Indices into T1..L5 (17 vertebrae); -1 would be C7, 17 the sacrum.
T1, T3, T4, T9, T11, T12, L1, L4, L5 = 0, 2, 3, 8, 10, 11, 12, 15, 16
OVERLAP: tuple[int, ...] = (2, 3, 4)
# Share of the gap to the next centroid that an edge may sit at; keeps an
# edge from cutting a centroid exactly.
MARGIN: tuple[float, float] = (0.15, 0.85)
SIDE_TRIM: float = 0.10


@dataclasses.dataclass(frozen=True)
class Crop:
    """One simulated film cut from an image.

    Attributes:
      view: 'upper' or 'lower'.
      box: (x0, y0, x1, y1) integer pixel bounds in the source image.
      centroids: float64 [13, 2] (x, y) in crop pixels, T4..L4.
      labeled: bool [13].
      truth_visible: bool [13], centroid inside the crop.
    """

    view: str
    box: tuple[int, int, int, int]
    centroids: np.ndarray
    labeled: np.ndarray
    truth_visible: np.ndarray


def _key(image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big")


def _edge(y: np.ndarray, position: float) -> float:
    """y at a fractional vertebra index, linear between centroids, extrapolated past the ends."""
    n = len(y)
    if position < 0:
        return y[0] + position * (y[1] - y[0])
    if position > n - 1:
        return y[-1] + (position - n + 1) * (y[-1] - y[-2])
    return float(np.interp(position, np.arange(n), y))


def _rng(seed: int, image_id: str, draw: int, wide: bool) -> np.random.Generator:
    if draw == 0 and not wide:
        return np.random.default_rng([seed, _key(image_id)])
    return np.random.default_rng([seed, _key(image_id), draw, int(wide)])


def split_fov(
    centroids: np.ndarray,
    *,
    width: int,
    height: int,
    seed: int,
    image_id: str,
    draw: int = 0,
    wide: bool = False,
) -> tuple[Crop, Crop]:
    """Cuts an upper and a lower film out of one fully labelled image.

    Args:
      centroids: float [17, 2] (x, y) pixels of T1..L5, y strictly increasing.
      width, height: image size in pixels.
      seed: dataset seed.
      image_id: stable id, mixed into the random stream.
      draw: which of several independent pairs of this image.
      wide: outer edges anywhere up to the image edges (module docstring).

    Returns:
      (upper, lower) crops; every T4..L4 is labelled on exactly one of them.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.shape != (17, 2):
        raise ValueError(f"{image_id}: expected T1..L5 centroids [17, 2], got {centroids.shape}")
    if not np.all(np.diff(centroids[:, 1]) > 0):
        raise ValueError(f"{image_id}: centroids must run strictly downwards")
    rng = _rng(seed, image_id, draw, wide)
    y = centroids[:, 1]

    upper_last = int(rng.choice([T11, T12, L1]))
    overlap = int(rng.choice([n for n in OVERLAP if upper_last - n + 1 >= T9]))
    lower_first = upper_last - overlap + 1
    # Vertebrae lower_first..upper_last are on both films; split the labels.
    boundary = int(rng.integers(lower_first - 1, upper_last + 1))

    upper_bottom = _edge(y, upper_last + rng.uniform(*MARGIN))
    lower_top = _edge(y, lower_first - rng.uniform(*MARGIN))
    if wide:
        upper_top = rng.uniform(0.0, max(_edge(y, T3 + MARGIN[0]), 0.0))
        lower_bottom = rng.uniform(min(_edge(y, L5 + MARGIN[0]), height), height)
    else:
        upper_top = _edge(y, rng.uniform(-1.0, T3 + MARGIN[0]))
        lower_bottom = _edge(y, rng.uniform(L5 + MARGIN[0], L5 + 1.0))

    crops = []
    for view, top, bottom, first, last in (
        ("upper", upper_top, upper_bottom, T1, upper_last),
        ("lower", lower_top, lower_bottom, lower_first, L5),
    ):
        y0 = int(np.clip(np.floor(top), 0, height - 1))
        y1 = int(np.clip(np.ceil(bottom), y0 + 1, height))
        xs = centroids[first : last + 1, 0]
        x0 = int(np.floor(min(rng.uniform(0, SIDE_TRIM) * width, xs.min() - 1)))
        x1 = int(np.ceil(max(width - rng.uniform(0, SIDE_TRIM) * width, xs.max() + 1)))
        x0, x1 = max(x0, 0), min(x1, width)
        local = centroids[T4 : L4 + 1] - np.array([x0, y0])
        visible = (
            (local[:, 0] >= 0)
            & (local[:, 0] < x1 - x0)
            & (local[:, 1] >= 0)
            & (local[:, 1] < y1 - y0)
        )
        index = np.arange(T4, T4 + vertebrae.K)
        labeled = index <= boundary if view == "upper" else index > boundary
        if np.any(labeled & ~visible):
            raise ValueError(f"{image_id}: {view} crop lost a labelled vertebra")
        crops.append(
            Crop(
                view=view,
                box=(x0, y0, x1, y1),
                centroids=np.where(visible[:, None], local, 0.0),
                labeled=labeled,
                truth_visible=visible,
            )
        )
    return crops[0], crops[1]
