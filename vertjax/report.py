"""The paper's Table 1 over trained runs, with per-vertebra and training-curve plots.

Command:
  python -m vertjax.report RUN_DIR... --out=DIR [--examples=3]

Each RUN_DIR is a training workdir holding `results.json` (written after
training by the evaluation) and `metrics.jsonl` (the training log). Runs of
the same configuration (config name, loss and dataset) differ only in seed
and are grouped: each cell of the table is the mean +- sample standard
deviation (n - 1 in the denominator) over the group's seeds. Written to DIR:

  table.md                   Table 1 (also printed), the paper's numbers beside it
  per_vertebra_id_accuracy.png   ID accuracy of each vertebra, one line per group
  training_curves.png        training loss and validation ID accuracy per run
  examples/<group>_<i>.png   the first run of each group on a few test records

Examples: for the first run of each group the report restores the best
checkpoint and predicts the first `--examples` records of the run's
evaluation split (`config.eval_split`, the records `results.json` was
computed on), drawn at their original aspect with the ground truth. They
need the run's checkpoint and its TFDS dataset on this machine; a run
without them gets no examples and a note in the log, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from matplotlib.figure import Figure

from vertjax import checkpoints, files, overlay, run_log, vertebrae

RESULTS_FILE = "results.json"  # evaluate.RESULTS_JSON, without importing the evaluator
LOSS_ORDER = ("mse", "l1", "l2", "l3")

# Gartland et al., MIDL 2025, Table 1: a test set of 260 private sagittal
# radiographs (Rotterdam Study). Shown for reference only; they are not the
# data the runs here use.
PAPER_TABLE: tuple[tuple[str, str, float, float], ...] = (
    ("UNet-Base", "mse", 89.6, 20.28),
    ("UNet-L1", "l1", 94.7, 17.17),
    ("UNet-L2", "l2", 95.9, 17.08),
    ("UNet-L3", "l3", 95.2, 19.65),
)


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: a results.json key, its header and display scale."""

    key: str
    header: str
    percent: bool
    decimals: int


COLUMNS: tuple[Column, ...] = (
    Column("id_accuracy", "ID accuracy", True, 1),
    Column("level_slip_share", "Named one level off", True, 1),
    Column("rmse_px", "RMSE (px)", False, 2),
    Column("mean_error_px", "Mean error (px)", False, 2),
    Column("mean_error_mm", "Mean error (mm)", False, 2),
    Column("presence_precision", "Presence precision", True, 1),
    Column("presence_recall", "Presence recall", True, 1),
    Column("unlabelled_visible_recall", "Visible-unlabelled recall", True, 1),
    Column("all_correct_share", "All correct", True, 1),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its folder, `results.json` and training log events."""

    path: epath.Path
    results: dict[str, Any]
    events: list[dict[str, Any]]
    seed: Any = "?"

    @property
    def key(self) -> tuple[str, str, str]:
        """(config name, loss, dataset): runs sharing it differ only in seed."""
        loss = str(self.results.get("loss", "?"))
        name = self.results.get("config")
        # results.json names the config; a full config dict is accepted too.
        if isinstance(name, dict):
            name = name.get("name")
        return str(name or loss), loss, str(self.results.get("dataset", "?"))


def as_float(value: Any) -> float:
    """A metric value as float; None and 'nan'-style strings become NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_run(path: str | os.PathLike) -> Run:
    """Reads a run folder; ValueError names the file and the fault."""
    path = files.as_path(path)
    results_path = path / RESULTS_FILE
    if not results_path.is_file():
        raise ValueError(f"{results_path}: missing (has the run finished its evaluation?)")
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{results_path}: not readable JSON ({e})") from e
    if not isinstance(results, dict):
        raise ValueError(f"{results_path}: expected a JSON object, got {type(results).__name__}")
    if "id_accuracy" not in results:
        raise ValueError(f"{results_path}: no 'id_accuracy' field; keys {sorted(results)}")
    seed = results.get("seed")
    if seed is None:
        seed = _checkpoint_seed(path)
    return Run(path=path, results=results, events=run_log.read_metrics(path), seed=seed)


def _checkpoint_seed(path: epath.Path) -> Any:
    """The seed in the config of the run's latest checkpoint; '?' without one."""
    ckpt_dir = path / "checkpoints"
    if not ckpt_dir.is_dir():
        return "?"
    ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
    try:
        step = ckpt.latest_step()
        return "?" if step is None else ckpt.restore_config(step).get("seed", "?")
    finally:
        ckpt.close()


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs grouped by `Run.key`, groups in loss order (mse, l1, l2, l3, others)."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)

    def order(key: tuple[str, str, str]) -> tuple[int, str, str, str]:
        name, loss, dataset = key
        rank = LOSS_ORDER.index(loss) if loss in LOSS_ORDER else len(LOSS_ORDER)
        return rank, dataset, name, loss

    return {key: groups[key] for key in sorted(groups, key=order)}


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) over the finite values; sd is NaN for n < 2."""
    finite = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if n > 1 else math.nan
    return float(np.mean(finite)), sd, n


def format_cell(values: Sequence[float], *, percent: bool, decimals: int) -> str:
    """'92.0 +- 2.8 %'-style cell; '-' when no run has a finite value."""
    mean, sd, n = mean_sd([v * 100.0 if percent else v for v in values])
    if n == 0:
        return "-"
    unit = " %" if percent else ""
    text = f"{mean:.{decimals}f}"
    if n > 1:
        text += f" ± {sd:.{decimals}f}"
    if n < len(values):
        # Some seeds had no finite value (e.g. RMSE with nothing identified).
        text += f" (n={n})"
    return text + unit


def table_markdown(groups: dict[tuple[str, str, str], list[Run]]) -> str:
    """Table 1 over the groups, then the paper's numbers, as markdown."""
    headers = [
        "Config",
        "Loss",
        "Dataset (split)",
        "Seeds",
        *[c.header for c in COLUMNS],
        "Labelled",
        "Steps",
    ]
    lines = [
        "## Table 1: vertebra identification and localisation",
        "",
        "Mean ± sample standard deviation over seeds (n - 1 in the denominator). "
        "ID accuracy: share of labelled vertebrae whose prediction lies within half the "
        "image's mean neighbour distance of its own ground truth; RMSE over those "
        "correctly identified; named one level off: share of labelled vertebrae whose "
        "prediction missed its own centroid but lies on a visible neighbour's; mean error "
        "over all labelled vertebrae; presence against "
        "every visible vertebra; distances in original pixels.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for (name, loss, dataset), runs in groups.items():
        cells = [
            format_cell(
                [as_float(r.results.get(c.key)) for r in runs],
                percent=c.percent,
                decimals=c.decimals,
            )
            for c in COLUMNS
        ]

        def values(key: str, runs: list[Run] = runs) -> str:
            return "/".join(sorted({str(r.results.get(key, "?")) for r in runs}))

        seeds = ", ".join(str(r.seed) for r in runs)
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    loss,
                    f"{dataset} ({values('split')})",
                    f"{len(runs)} ({seeds})",
                    *cells,
                    values("n_labelled"),
                    values("steps"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "### For reference: the paper's Table 1 (not comparable data)",
        "",
        "Gartland et al., MIDL 2025: UNet trained and tested on their private sagittal "
        "radiographs (Rotterdam Study, test set of 260 radiographs, mean neighbour "
        "distance 326 px). The runs above use other images (aasce and aasce_fov: frontal "
        "AASCE 2019 radiographs; synthetic: a phantom), labels and resolution.",
        "",
        "| Model | Loss | ID accuracy | RMSE (px) |",
        "|---|---|---|---|",
    ]
    for model, loss, accuracy, rmse in PAPER_TABLE:
        lines.append(f"| {model} | {loss} | {accuracy:.1f} % | {rmse:.2f} |")
    return "\n".join(lines) + "\n"


def group_label(key: tuple[str, str, str]) -> str:
    name, loss, dataset = key
    return f"{name} ({loss}, {dataset})" if name != loss else f"{loss} ({dataset})"


def plot_per_vertebra(groups: dict[tuple[str, str, str], list[Run]]) -> Figure:
    """Per-vertebra ID accuracy (%), mean over seeds with sd error bars, per group."""
    fig = Figure(figsize=(9, 4.5), dpi=110)
    ax = fig.add_subplot()
    xs = np.arange(vertebrae.K)
    for key, runs in groups.items():
        stats = [
            mean_sd(
                [
                    100.0
                    * as_float(
                        ((r.results.get("per_vertebra") or {}).get(n) or {}).get("id_accuracy")
                    )
                    for r in runs
                ]
            )
            for n in vertebrae.NAMES
        ]
        means = np.array([s[0] for s in stats])
        sds = np.nan_to_num(np.array([s[1] for s in stats]))
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=group_label(key))
    ax.set_xticks(xs, vertebrae.NAMES)
    ax.set_ylim(0, 102)
    ax.set_ylabel("ID accuracy (%)")
    ax.set_title("Per-vertebra identification accuracy (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_curves(groups: dict[tuple[str, str, str], list[Run]]) -> Figure:
    """Training loss (log scale) and validation ID accuracy against step, per run."""
    fig = Figure(figsize=(11, 4.5), dpi=110)
    loss_ax, acc_ax = fig.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    for i, (key, runs) in enumerate(groups.items()):
        for j, run in enumerate(runs):
            label = group_label(key) if j == 0 else None
            train = [e for e in run.events if e.get("kind") == "train" and "loss" in e]
            val = [e for e in run.events if e.get("kind") == "validation" and "id_accuracy" in e]
            if train:
                loss_ax.plot(
                    [e["step"] for e in train],
                    [as_float(e["loss"]) for e in train],
                    color=colours[i % 10],
                    alpha=0.8,
                    label=label,
                )
            if val:
                acc_ax.plot(
                    [e["step"] for e in val],
                    [100.0 * as_float(e["id_accuracy"]) for e in val],
                    color=colours[i % 10],
                    marker=".",
                    alpha=0.8,
                    label=label,
                )
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("validation ID accuracy (%)")
    acc_ax.set_ylim(0, 102)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Training curves (one line per run)")
    fig.tight_layout()
    return fig


def example_figures(run_path: str | os.PathLike, n: int) -> list[Figure]:
    """Overlays of the reported checkpoint on the first `n` records of the run's eval split.

    Each record's S x S image is drawn stretched back to its original aspect
    ratio, with the predicted centroids and the labelled ground truth
    (hollow circles), in original pixels.

    Raises:
      ValueError: no checkpoints or the run's dataset is not available.
    """
    # The network stack and the datasets (TFDS) are needed only for the examples.
    from vertjax import datasets, inference, runs

    # The checkpoint step results.json reports (else the best), on its split.
    results = files.as_path(run_path) / RESULTS_FILE
    step = json.loads(results.read_text()).get("steps") if results.is_file() else None
    model = inference.load(workdir=run_path, checkpoint="best" if step is None else int(step))
    config = model.config
    try:
        builder = runs.open_dataset(config, build=False)
    except datasets.DataError as e:
        raise ValueError(str(e)) from e
    source = builder.as_data_source(config.eval_split)
    records = [source[i] for i in range(min(n, len(source)))]
    if not records:
        return []
    points, confidence = inference.predict_records(model, records)
    return [
        overlay.draw_record(
            record,
            points[i],
            confidence[i],
            image_size=model.image_size,
            threshold=model.presence_threshold,
            title=f"{Path(run_path).name}: {overlay.text(record.get('image_id'))} (step {model.step})",
        )
        for i, record in enumerate(records)
    ]


def write_examples(groups: dict[tuple[str, str, str], list[Run]], out: Path, n: int) -> list[Path]:
    """Example overlays from the first run of each group (see the module docstring)."""
    written: list[Path] = []
    if n <= 0:
        return written
    folder = out / "examples"
    for key, runs in groups.items():
        run = runs[0]
        try:
            figures = example_figures(run.path, n)
        except (ValueError, OSError, KeyError) as e:
            logging.warning("no example overlays for %s: %s", run.path, e)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i, fig in enumerate(figures):
            path = folder / f"{_slug(group_label(key))}_{i}.png"
            files.write_atomic(path, overlay.to_png(fig))
            written.append(path)
    return written


def _slug(text: str) -> str:
    """'l2 (aasce_fov)' -> 'l2_aasce_fov': a file-name-safe label."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_report(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, examples: int = 3
) -> str:
    """Writes the table and plots for `run_dirs` to `out`; returns the markdown.

    Raises:
      ValueError: no run folders, or one without a readable results.json.
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    groups = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = table_markdown(groups)
    figures = {
        "per_vertebra_id_accuracy.png": plot_per_vertebra(groups),
        "training_curves.png": plot_training_curves(groups),
    }
    for name, fig in figures.items():
        files.write_atomic(out / name, overlay.to_png(fig))
    example_paths = write_examples(groups, out, examples)
    markdown += "\n## Plots\n\n" + "".join(f"![{name}]({name})\n" for name in figures)
    if example_paths:
        markdown += "\n## Example predictions (evaluation split, reported checkpoint)\n\n"
        markdown += "".join(
            f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in example_paths
        )
    markdown += "\n## Runs\n\n" + "".join(f"- `{r.path}`\n" for r in runs)
    files.write_atomic(out / "table.md", markdown)
    return markdown


if __name__ == "__main__":
    from vertjax import cli

    cli.run_command("report")
