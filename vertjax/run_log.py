"""Run logs in the workdir: TensorBoard events, `metrics.jsonl`, progress lines.

TensorBoard also shows, at each validation, a few validation radiographs
with their predicted and labelled points (`write_figures`).
`metrics.jsonl` holds one JSON object per event, e.g.
  {"step": 500, "kind": "train", "loss": 0.0012, "steps_per_second": 0.6}
  {"step": 500, "kind": "validation", "id_accuracy": 0.91, ...}
so that reports can be drawn without TensorBoard. Only process 0 writes;
the other processes of a multi-host run get a writer that does nothing.
"""

from __future__ import annotations

import io
import json
import logging as std_logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image
from tensorboardX import SummaryWriter

from vertjax import files, overlay

METRICS_FILE = "metrics.jsonl"
# Libraries whose INFO lines (orbax logs every file it writes) drown the run's own.
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/")


class _QuietLibraries(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def quiet_libraries() -> None:
    """Drops library INFO lines from the absl log (warnings and errors stay)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


class MetricWriter:
    """Writes scalars to TensorBoard (`<workdir>/tensorboard`) and `metrics.jsonl`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.workdir = files.as_path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            # tensorboardX writes event files without TensorFlow (gs:// through
            # google-cloud-storage, the `cloud` extra).
            self._tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"))

    def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
        """Records one event: `scalars` (nested dicts allowed in the JSON line)."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **files.plain(scalars)}
        files.append_text(self.workdir / METRICS_FILE, json.dumps(record) + "\n")
        for name, value in record.items():
            if name in ("step", "kind") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{kind}/{name}", float(value), int(step))
        self._tb.flush()

    def write_figures(self, step: int, tag: str, figures: Sequence[Any]) -> None:
        """Adds matplotlib figures to TensorBoard as images `tag/0`, `tag/1`, ..."""
        if not self.enabled:
            return
        for i, fig in enumerate(figures):
            png = Image.open(io.BytesIO(overlay.to_png(fig))).convert("RGB")
            self._tb.add_image(f"{tag}/{i}", np.asarray(png), int(step), dataformats="HWC")
        self._tb.flush()

    def drop_after(self, step: int) -> None:
        """Forgets `metrics.jsonl` events after `step`: a run resumed from a
        checkpoint at `step` logs those steps again, once."""
        if not self.enabled:
            return
        events = read_metrics(self.workdir)
        kept = [e for e in events if int(e.get("step", 0)) <= step]
        if len(kept) == len(events):
            return
        files.write_atomic(self.workdir / METRICS_FILE, "".join(json.dumps(e) + "\n" for e in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of `<workdir>/metrics.jsonl`, in order (empty if none)."""
    path = files.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    events = []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({e})") from e
    return events


class Progress:
    """Steps per second and time left, measured from the first reported step.

    The first interval includes compilation, so rates are taken from the
    moment of the first `report` on.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._t0: float | None = None
        self._step0 = 0

    def report(self, step: int) -> dict[str, float]:
        """Returns steps_per_second and eta_seconds at `step` and logs a progress line."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
            logging.info("step %d/%d", step, self.total_steps)
            return {}
        elapsed = now - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        logging.info(
            "step %d/%d (%.1f%%), %.3f steps/s, ETA %s",
            step,
            self.total_steps,
            100.0 * step / max(self.total_steps, 1),
            rate,
            format_seconds(eta),
        )
        return {"steps_per_second": rate, "eta_seconds": eta}


def format_seconds(seconds: float) -> str:
    """'1h02m03s'-style duration; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
