"""Predict on radiograph files: named centroids as JSON, CSV and overlays.

`predict_files` reads each file (`vertjax.inputs`), runs the model
(`vertjax.inference`) and writes, for each readable image,
`DIR/<stem>.json`:
  {"image": file name, "width": W, "height": H,
   "pixel_spacing_mm": {"row": mm, "column": mm} | null,
   "pixel_spacing_source": the DICOM attribute(s) | null,
   "model": {"model", "checkpoint_step", "vertjax_version", "config_sha256"},
   "vertebrae": [{"name": "T4", "x", "y", "confidence", "present",
                  "x_mm", "y_mm"}, ... 13 entries, T4..L4]}
with (x, y) in the original image's pixels (x right, y down, origin at the
top-left corner of the top-left pixel), x_mm from the column spacing and
y_mm from the row spacing, `present` = confidence >= the run's
`presence_threshold`, and `model` saying which model made it
(`vertjax.provenance`); `DIR/<stem>_overlay.png` draws the named
centroids and `DIR/predictions.csv` has one row per image and vertebra.
Every file is written atomically (`vertjax.files`).

A file that cannot be read gets one line naming it and the reason; the
others are still processed. The command line is `vertjax predict`
(`vertjax.cli`):

  python -m vertjax.predict --out=DIR [--batch_size=8] INPUT...         # the shipped model
  python -m vertjax.predict --model=NAME_OR_FOLDER --out=DIR INPUT...   # another shipped model
  python -m vertjax.predict --workdir=RUN [--checkpoint=best|latest|STEP] --out=DIR INPUT...

INPUT is any mix of files and folders (searched recursively) of PNG, JPEG,
TIFF or DICOM radiographs of any size and aspect; the exit status is 1 if
any failed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vertjax import files, imaging, inference, inputs, overlay, vertebrae

CSV_FILE = "predictions.csv"
CSV_COLUMNS = (
    "image",
    "path",
    "output",
    "width",
    "height",
    "pixel_spacing_row_mm",
    "pixel_spacing_column_mm",
    "pixel_spacing_source",
    "vertebra",
    "x",
    "y",
    "confidence",
    "present",
    "x_mm",
    "y_mm",
    "model",
    "checkpoint_step",
    "vertjax_version",
    "config_sha256",
)
# Decimals kept in the outputs: 1e-4 px and 1e-6 of confidence are far below
# what the model resolves, and short numbers keep the files readable.
COORD_DECIMALS = 4
CONF_DECIMALS = 6


def _round(value: float, decimals: int) -> float:
    return round(float(value), decimals)


def prediction_record(
    *,
    image: str,
    width: int,
    height: int,
    spacing: imaging.PixelSpacing | None,
    points: np.ndarray,
    confidence: np.ndarray,
    present: np.ndarray,
    model: dict[str, Any],
) -> dict[str, Any]:
    """The JSON object of one image.

    Args:
      image: the input's file name.
      width, height: the original size in pixels.
      spacing: the pixel spacing, or None when unknown.
      points: [K, 2] (x, y) in original pixels.
      confidence: [K] heatmap peaks.
      present: [K] bool.
      model: `Predictor.provenance()`.
    """
    entries = []
    for k, name in enumerate(vertebrae.NAMES):
        x, y = float(points[k, 0]), float(points[k, 1])
        x_mm, y_mm = (None, None) if spacing is None else spacing.to_mm(x, y)
        entries.append(
            {
                "name": name,
                "x": _round(x, COORD_DECIMALS),
                "y": _round(y, COORD_DECIMALS),
                "confidence": _round(confidence[k], CONF_DECIMALS),
                "present": bool(present[k]),
                "x_mm": None if x_mm is None else _round(x_mm, COORD_DECIMALS),
                "y_mm": None if y_mm is None else _round(y_mm, COORD_DECIMALS),
            }
        )
    return {
        "image": image,
        "width": int(width),
        "height": int(height),
        "pixel_spacing_mm": None
        if spacing is None
        else {"row": float(spacing.row_mm), "column": float(spacing.column_mm)},
        "pixel_spacing_source": None if spacing is None else spacing.source,
        "model": dict(model),
        "vertebrae": entries,
    }


def csv_rows(record: dict[str, Any], *, path: str, output: str) -> list[dict[str, Any]]:
    """One CSV row per vertebra of a `prediction_record` (None -> empty cell)."""
    rows = []
    spacing = record["pixel_spacing_mm"] or {}
    for v in record["vertebrae"]:
        row = {
            "image": record["image"],
            "path": path,
            "output": output,
            "width": record["width"],
            "height": record["height"],
            "pixel_spacing_row_mm": spacing.get("row"),
            "pixel_spacing_column_mm": spacing.get("column"),
            "pixel_spacing_source": record["pixel_spacing_source"],
            "vertebra": v["name"],
            **{k: v[k] for k in ("x", "y", "confidence", "present", "x_mm", "y_mm")},
            **record["model"],
        }
        rows.append({k: "" if val is None else val for k, val in row.items()})
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Writes `rows` with the columns `CSV_COLUMNS`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomic(path, buffer.getvalue())


@dataclasses.dataclass
class Outcome:
    """What a prediction run did: written outputs and (path, reason) failures."""

    written: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def write_outputs(
    out: Path,
    name: str,
    path: Path,
    radiograph: imaging.Radiograph,
    points: inference.Points,
    *,
    model: dict[str, Any],
    overlays: bool,
) -> tuple[str, list[dict[str, Any]]]:
    """Writes one image's JSON (and overlay); returns the JSON path and its CSV rows."""
    height, width = radiograph.pixels.shape
    record = prediction_record(
        image=path.name,
        width=width,
        height=height,
        spacing=radiograph.spacing,
        points=points.xy,
        confidence=points.confidence,
        present=points.present,
        model=model,
    )
    json_path = out / f"{name}.json"
    files.write_atomic(json_path, json.dumps(record, indent=2) + "\n")
    if overlays:
        fig = overlay.draw(
            radiograph.pixels, points.xy, points.confidence, points.present, title=path.name
        )
        files.write_atomic(out / f"{name}_overlay.png", overlay.to_png(fig))
    return str(json_path), csv_rows(record, path=str(path), output=name)


def predict_files(
    model: inference.Predictor | inference.ExportedPredictor,
    paths: Sequence[Path],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    overlays: bool = True,
    progress: bool | None = None,
    on_error: Callable[[str], None] | None = None,
    read_workers: int = 2,
) -> Outcome:
    """Predicts every file and writes its JSON (and overlay), then the CSV.

    Args:
      model: the trained model (`inference.load`) or an exported one
        (`inference.ExportedPredictor`).
      paths: input radiographs (see `inputs.find_inputs`).
      out_dir: output folder, created if needed.
      batch_size: images per network call (at most the number of files);
        the last batch is padded, so the network is compiled once.
      overlays: also write `<stem>_overlay.png`.
      progress: show a tqdm bar on stderr; None = only for more than one
        batch of files on a terminal.
      on_error: called with one line per unreadable file; default prints it
        to stderr.
      read_workers: threads decoding images ahead of the network.

    Returns:
      An Outcome listing the written JSON files and the failures.

    Raises:
      ValueError: `out_dir` cannot be a folder (a file lies on its path).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # Fewer files than a batch: a smaller batch computes no padding (a single
    # radiograph runs at batch 1), still one compilation for the run.
    batch_size = max(1, min(batch_size, len(paths)))
    out = Path(out_dir)
    problem = files.folder_problem(out)
    if problem:
        raise ValueError(f"output folder {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    names = inputs.output_names(paths)
    stamp = model.provenance()
    outcome = Outcome()
    rows: list[dict[str, Any]] = []
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    disable = (True if len(paths) <= batch_size else None) if progress is None else not progress
    bar = tqdm(total=len(paths), unit="image", disable=disable, file=sys.stderr)

    def flush(batch: list[tuple[int, imaging.Radiograph]]) -> None:
        found = model.points([r.pixels for _, r in batch], batch_size=batch_size)
        for (index, radiograph), points in zip(batch, found, strict=True):
            written, new_rows = write_outputs(
                out, names[index], paths[index], radiograph, points, model=stamp, overlays=overlays
            )
            outcome.written.append(written)
            rows.extend(new_rows)
        bar.update(len(batch))

    batch: list[tuple[int, imaging.Radiograph]] = []
    try:
        for index, result in inputs.prefetch(paths, read_workers, depth=2 * batch_size):
            if isinstance(result, Exception):
                reason = inputs.reason(result)
                outcome.failures.append((str(paths[index]), reason))
                line = f"{paths[index]}: {reason}"
                on_error(line) if on_error is not None else bar.write(line, file=sys.stderr)
                bar.update(1)
                continue
            batch.append((index, result))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
    write_csv(out / CSV_FILE, rows)
    return outcome


if __name__ == "__main__":
    from vertjax import cli

    cli.run_command("predict")
