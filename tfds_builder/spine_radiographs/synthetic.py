"""Records of the procedural phantom, rendered in parallel but yielded in order.

The phantom (`phantom.py`) renders each radiograph at full resolution, which
dominates build time; a small process pool renders participants while the
main process serialises and writes. Results come back in participant order
(`Pool.imap`), and each participant depends only on (seed, index), so the
records are identical whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import sys
import threading
from collections.abc import Iterator, Sequence

from tfds_builder.spine_radiographs import records
from vertjax import imaging

# Below this many participants the pool's start-up (about a second per
# spawned process) costs more than it saves.
MIN_PARALLEL: int = 16


def participant_id(index: int) -> str:
    """Stable participant id of phantom participant `index`."""
    return f"synthetic-{index:05d}"


def participant_records(args: tuple[int, int, int]) -> list[tuple[str, dict]]:
    """[(key, record)] of one participant's two radiographs (upper, lower).

    Args:
      args: (seed, index, image_size), a tuple so that Pool.imap can map it.
    """
    # Imported here: real-image builds need not load the phantom's renderer.
    from tfds_builder.spine_radiographs import phantom

    seed, index, image_size = args
    pid = participant_id(index)
    out = []
    for radiograph in phantom.participant(seed, index):
        image_id = f"{pid}-{radiograph.view}"
        record = records.make_record(
            pixels=radiograph.image,
            centroids_px=radiograph.centroids,
            labeled=radiograph.labeled,
            truth_centroids_px=radiograph.centroids,
            truth_visible=radiograph.truth_visible,
            spacing=imaging.PixelSpacing(
                radiograph.pixel_spacing_mm, radiograph.pixel_spacing_mm, "phantom film"
            ),
            participant_id=pid,
            image_id=image_id,
            image_size=image_size,
        )
        out.append((image_id, record))
    return out


def _start_method() -> str:
    """'fork' while this process is single-threaded, else 'spawn'.

    Fork starts workers at once and needs no `if __name__ == "__main__"`
    guard in the calling script, but forking a process with other threads
    can deadlock the child; spawn is safe there and costs about a second per
    worker. JAX's runtime threads are native, invisible to `threading`, so a
    loaded JAX counts as threaded.
    """
    single = threading.active_count() == 1 and "jax" not in sys.modules
    if single and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


@contextlib.contextmanager
def worker_pool(workers: int, participants: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of `workers` processes for a build, or None where one is not worth it."""
    if workers <= 1 or participants < MIN_PARALLEL:
        yield None
        return
    with multiprocessing.get_context(_start_method()).Pool(workers) as pool:
        yield pool


def generate(
    *,
    seed: int,
    indices: Sequence[int],
    image_size: int,
    pool: multiprocessing.pool.Pool | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yields (key, record) for the given participants, in order.

    Args:
      seed: phantom seed.
      indices: participant indices to render.
      image_size: model input side S.
      pool: worker processes (`worker_pool`); None renders in this process.
    """
    tasks = [(seed, index, image_size) for index in indices]
    if pool is None:
        for task in tasks:
            yield from participant_records(task)
        return
    for pair in pool.imap(participant_records, tasks, chunksize=2):
        yield from pair
