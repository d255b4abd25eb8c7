"""grain input pipelines over the TFDS `spine_radiographs` data sources.

Training: an endless, per-epoch reshuffled stream of fixed-size batches,
sharded by process so that each host reads its own records, with a
checkpointable iterator (`get_state` / `set_state`) so that a resumed run
continues at the exact next batch. Evaluation: one pass over a split in
batches padded to full size, with a `mask` marking the real examples.

Batches are dicts of numpy arrays (strings dropped), per process:
  image            float32 [b, S, S, 1], (pixel - mean) / std
  centroids        float32 [b, 13, 2], normalised (x, y)
  labeled          bool    [b, 13]
  truth_centroids  float32 [b, 13, 2]
  truth_visible    bool    [b, 13]
  original_size    int32   [b, 2], (height, width)
  pixel_spacing_mm float32 [b, 2], (row, column) mm per pixel, 0 when unknown
  mask             bool    [b] (evaluation batches only)
where b is the global batch size divided by the number of processes.

Transforms are module-level classes so that grain worker processes can
unpickle them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

# Record fields passed on to the model and the metrics; strings stay behind.
FIELDS: tuple[str, ...] = (
    "image",
    "centroids",
    "labeled",
    "truth_centroids",
    "truth_visible",
    "original_size",
    "pixel_spacing_mm",
)
_DTYPES = {
    "centroids": np.float32,
    "labeled": np.bool_,
    "truth_centroids": np.float32,
    "truth_visible": np.bool_,
    "original_size": np.int32,
    "pixel_spacing_mm": np.float32,
}


class Preprocess(grain.transforms.Map):
    """Keeps the numeric fields of a record and normalises its image."""

    def __init__(self, mean: float, std: float, image_size: int | None = None):
        if not std > 0:
            raise ValueError(f"pixel std must be positive, got {std}")
        self.mean = float(mean)
        self.std = float(std)
        self.image_size = image_size

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise KeyError(f"record lacks field(s) {missing}; it has {sorted(record)}")
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(
                f"record image is {image.shape[0]}x{image.shape[1]} but config.image_size is "
                f"{self.image_size}; rebuild the dataset or change config.image_size"
            )
        out = {"image": (image.astype(np.float32) - self.mean) / self.std}
        for key, dtype in _DTYPES.items():
            out[key] = np.asarray(record[key], dtype=dtype)
        return out


class _PaddedLookup(grain.transforms.Map):
    """Maps a position in a padded index list to a record plus its mask flag.

    Positions past the end of `indices` repeat record `pad_index` with
    mask False, so that every evaluation batch has the same shape.
    """

    def __init__(
        self, source: Sequence[Any], indices: np.ndarray, pad_index: int, preprocess: Preprocess
    ):
        self.source = source
        self.indices = indices
        self.pad_index = pad_index
        self.preprocess = preprocess

    def map(self, position: int) -> dict[str, np.ndarray]:
        real = position < len(self.indices)
        index = int(self.indices[position]) if real else self.pad_index
        example = self.preprocess.map(self.source[index])
        example["mask"] = np.asarray(real)
        return example


def put_batch(
    batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, axis: str = "data"
) -> dict[str, jax.Array]:
    """Global device arrays from this process's part of a batch, split along `axis`.

    Args:
      batch: this process's arrays, leading dimension b = B / process count.
      mesh: the device mesh; dimension 0 of every array is sharded over `axis`.

    Returns:
      The same keys as global arrays with leading dimension B.
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """The per-process share of a global batch; ValueError if it does not divide."""
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"batch size {global_batch_size} must be a positive multiple of the "
            f"number of processes ({count})"
        )
    return global_batch_size // count


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return index, count


def train_dataset(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    mean: float,
    std: float,
    image_size: int | None = None,
    num_workers: int = 0,
    read_threads: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The endless training stream of this process.

    Each process takes an equal, disjoint share of the records (strided by
    process index) and shuffles it with a seed that changes every epoch;
    incomplete batches at the end of an epoch are not formed because the
    stream runs on into the next epoch.

    Args:
      source: random-access records, e.g. `builder.as_data_source('train')`.
      batch_size: global batch size (all processes together).
      seed: shuffle seed; the same seed gives the same order.
      mean, std: the training split's pixel statistics (uint8 scale).
      image_size: expected S; None skips the check.
      num_workers: grain worker processes (0 reads in this process).
      read_threads: threads reading records in each process or worker.
      process_index, process_count: default to JAX's.

    Returns:
      A grain IterDataset of batches as described in the module docstring;
      `iter()` of it has `get_state()` / `set_state()`.
    """
    index, count = _process(process_index, process_count)
    per_process = local_batch_size(batch_size, count)
    share = len(source) // count
    if share < per_process:
        raise ValueError(
            f"the training split has {len(source)} records, too few for "
            f"{count} process(es) x batch {per_process}"
        )
    ds = grain.MapDataset.source(source)
    ds = ds[index : share * count : count]
    # Shuffle before repeat: grain folds the epoch into the seed, so each
    # epoch has its own order while staying a pure function of (seed, step).
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.map(Preprocess(mean, std, image_size))
    ds = ds.batch(per_process, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def num_eval_batches(num_records: int, batch_size: int, process_count: int | None = None) -> int:
    """Batches per process needed to cover a split once (every process the same)."""
    _, count = _process(0, process_count)
    per_process = local_batch_size(batch_size, count)
    return max(1, math.ceil(math.ceil(num_records / count) / per_process))


def eval_batches(
    source: Sequence[Any],
    *,
    batch_size: int,
    mean: float,
    std: float,
    image_size: int | None = None,
    max_batches: int = 0,
    read_threads: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split in padded, masked batches.

    Every record appears exactly once with mask True across all processes;
    each process yields the same number of batches so that they can form
    global arrays together.

    Args:
      source: random-access records of the split.
      batch_size: global batch size.
      mean, std: the training split's pixel statistics.
      image_size: expected S; None skips the check.
      max_batches: stop after this many batches (0 = the whole split).
      read_threads: threads reading records.
      process_index, process_count: default to JAX's.

    Yields:
      Batches as in the module docstring, with `mask` bool [b].
    """
    index, count = _process(process_index, process_count)
    per_process = local_batch_size(batch_size, count)
    n_batches = num_eval_batches(len(source), batch_size, count)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    indices = np.arange(index, len(source), count)[: n_batches * per_process]
    if len(source) == 0:
        raise ValueError("cannot evaluate an empty split")
    # A process with no records of its own (more processes than records)
    # contributes only padding.
    lookup = _PaddedLookup(source, indices, 0, Preprocess(mean, std, image_size))
    ds = grain.MapDataset.range(n_batches * per_process).map(lookup)
    ds = ds.batch(per_process, drop_remainder=False)
    yield from ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2)
    )
