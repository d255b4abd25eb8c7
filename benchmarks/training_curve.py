r"""Training speed and time to accuracy of finished (or running) training runs.

For each run folder: training images per second, and the wall-clock minutes
from the start of training to the first validation at or above each
accuracy mark (80 % and 90 % by default), read from the run's TensorBoard
events (each carries its wall time) and its config. Optionally plots
validation ID accuracy against minutes.

Command (the run folders, then the flags; `--marks` takes a comma-separated
list of floats, an absl list flag, e.g. `--marks=0.8,0.9`):
  python -m benchmarks.training_curve runs/aasce_fov_seed0 runs/aasce_fov_seed1 \
      --plot=docs/results/aasce_fov_curve.png --json=/tmp/curve.json

Runs whose folders are gone can still be drawn beside new ones from an
earlier `--json` output (`--earlier=old.json`); they keep their recorded
figures and are labelled "(earlier)".

Minutes count from the TensorBoard writer's creation, just before the first
step (data opened, network initialised), and include compilation and the
validation passes: what a user waits for. Put runs that shared the machine
side by side only with that said.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import struct
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS

MARKS = (0.8, 0.9)
ACCURACY_TAG = "validation/id_accuracy"
RATE_TAG = "train/steps_per_second"


def read_events(path: str) -> list[Any]:
    """The Event protos of one TensorBoard file (TFRecord framing, CRCs not checked)."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)
            if len(payload) < length:
                break  # a run still writing: the last record is incomplete
            events.append(event_pb2.Event.FromString(payload))
    return events


def scalars(run: str) -> tuple[float, dict[str, list[tuple[int, float, float]]]]:
    """(start wall time, {tag: [(step, wall_time, value)]}) of a run's TensorBoard files.

    A resumed run has several files; each value keeps its latest write.
    """
    files = sorted(glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*")))
    if not files:
        raise ValueError(f"{run}: no TensorBoard events (is it a training run folder?)")
    start = None
    latest: dict[tuple[str, int], tuple[float, float]] = {}
    for path in files:
        for event in read_events(path):
            start = event.wall_time if start is None else min(start, event.wall_time)
            for value in event.summary.value:
                latest[(value.tag, event.step)] = (event.wall_time, value.simple_value)
    by_tag: dict[str, list[tuple[int, float, float]]] = {}
    for (tag, step), (wall, value) in sorted(latest.items(), key=lambda kv: kv[0][1]):
        by_tag.setdefault(tag, []).append((step, wall, value))
    return start, by_tag


def batch_size(run: str) -> int:
    """The run's global batch size, from its latest checkpoint's config."""
    configs = glob.glob(os.path.join(run, "checkpoints", "*", "config", "metadata"))
    if not configs:
        raise ValueError(f"{run}: no checkpoint config to read the batch size from")
    with open(max(configs, key=lambda p: int(p.split(os.sep)[-3]))) as f:
        return int(json.load(f)["batch_size"])


def summarize(run: str, marks: tuple[float, ...] = MARKS) -> dict[str, Any]:
    start, by_tag = scalars(run)
    curve = [
        ((wall - start) / 60.0, step, value) for step, wall, value in by_tag.get(ACCURACY_TAG, [])
    ]
    rates = [value for _, _, value in by_tag.get(RATE_TAG, [])]
    batch = batch_size(run)
    reached = {}
    for mark in marks:
        hit = next((c for c in curve if c[2] >= mark), None)
        reached[f"minutes_to_{round(mark * 100)}"] = None if hit is None else round(hit[0], 1)
    return {
        "run": run,
        "batch_size": batch,
        "images_per_second": round(batch * rates[-1], 3) if rates else None,
        "images_per_second_median": round(batch * statistics.median(rates), 3) if rates else None,
        "best_id_accuracy": max((c[2] for c in curve), default=None),
        "curve": [{"minutes": round(m, 2), "step": s, "id_accuracy": v} for m, s, v in curve],
        **reached,
    }


def plot(results: list[dict[str, Any]], path: str, marks: tuple[float, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = r["curve"]
        ax.plot(
            [p["minutes"] for p in points],
            [100 * p["id_accuracy"] for p in points],
            marker="o",
            label=os.path.basename(os.path.normpath(r["run"])),
        )
    for mark in marks:
        ax.axhline(100 * mark, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("wall-clock minutes since training started")
    ax.set_ylabel("validation ID accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def earlier_runs(path: str) -> list[dict[str, Any]]:
    """The runs recorded in a previous `--json` output, labelled as earlier."""
    try:
        with open(path) as f:
            recorded = json.load(f)["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a training_curve --json output ({e})") from e
    return [{**r, "run": _labelled_earlier(r["run"])} for r in recorded]


def _labelled_earlier(run: str) -> str:
    """`run (earlier)`, once: an output drawn from earlier runs is labelled already."""
    return run if run.endswith(" (earlier)") else f"{run} (earlier)"


def _reached(run: dict[str, Any], mark: float) -> float | str:
    key = f"minutes_to_{round(mark * 100)}"
    if key not in run:
        return "-"  # an earlier output that did not look for this mark
    return "not reached" if run[key] is None else run[key]


def define_flags() -> None:
    common.define_list_flag(
        "marks", MARKS, "Accuracy marks, comma-separated: --marks=0.8,0.9.", kind=float
    )
    flags.DEFINE_string("plot", None, "PNG of validation ID accuracy against minutes")
    flags.DEFINE_multi_string(
        "earlier", [], "A previous --json output whose runs are shown too (repeatable)."
    )
    common.define_json_flag()


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 and not FLAGS.earlier:
        raise app.UsageError("give one or more training run folders (or --earlier), then the flags")
    marks = tuple(common.list_value("marks", float))
    results = [r for path in FLAGS.earlier for r in earlier_runs(path)]
    results += [summarize(run, marks) for run in argv[1:]]
    rows = [
        [
            r["run"],
            r["images_per_second"],
            f"{100 * r['best_id_accuracy']:.1f} %" if r["best_id_accuracy"] is not None else "-",
            *[_reached(r, m) for m in marks],
        ]
        for r in results
    ]
    headers = ["run", "images/s", "best val ID acc", *[f"min to {round(m * 100)} %" for m in marks]]
    info = common.machine_info()
    print(common.describe(info))
    print(common.format_table(headers, rows))
    if FLAGS.plot:
        plot(results, FLAGS.plot, marks)
    if FLAGS.json:
        common.write_json(FLAGS.json, {"machine": info, "runs": results})


if __name__ == "__main__":
    define_flags()
    app.run(main)
