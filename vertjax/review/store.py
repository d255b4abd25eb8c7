"""Where reviewed labels go: `annotations.csv` for training and `review.json`, the log.

Both sit at the top of the images folder, which is then a `folder` dataset
(`tfds_builder/spine_radiographs/folder.py`): one row per named vertebra
(image path relative to the folder, participant, vertebra, x, y in original
pixels, split), and one row with `negative` = 1 for a radiograph reviewed
as showing none of T4..L4. The `negative` column is always written: with it
the folder reader takes only the images the csv names, so a radiograph
nobody has reviewed never becomes a negative in training.

A save replaces every row of its image and keeps all other rows as they
were, those the review cannot read included (they are reported, not
dropped). Each file is replaced whole (`files.write_atomic`): a crash
leaves the previous version. `review.json` gets one entry per save: when,
what changed from the prediction, the browser's edits with their times,
and the rows the save replaced.

Conflicts: an image's version is a hash of its rows in annotations.csv. A
save names the version it started from and is refused (`Conflict`) when the
file holds another, whoever changed it (another tab, another server, a hand
edit). Saves are serialised by a lock within the process and a `flock` on
the folder across processes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import posixpath
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfds_builder.spine_radiographs import folder
from vertjax import files, vertebrae
from vertjax.review import catalog

ANNOTATIONS = folder.ANNOTATIONS
LOG = "review.json"
LOG_FORMAT = "vertjax review log 1"
COLUMNS: tuple[str, ...] = (*folder.REQUIRED_COLUMNS, "split", folder.NEGATIVE)
SPLITS: tuple[str, ...] = ("", *sorted(folder.SPLIT_NAMES))
# 0.01 px is far below what a click or a drag resolves.
DECIMALS = 2


class StoreError(RuntimeError):
    """Saving is impossible until a file is fixed; the message says which and why."""


class Invalid(ValueError):
    """A save whose content cannot become labels (a point off the image, ...)."""


class Conflict(Exception):
    """The image's rows changed since the version the save started from."""

    def __init__(self, current: str):
        self.current = current
        super().__init__(f"annotations changed meanwhile (now version {current})")


@dataclasses.dataclass(frozen=True)
class Labels:
    """One image's saved labels.

    Attributes:
      points: {vertebra name: (x, y)} in original pixels.
      participant, split: as in the csv ('' split = by hash).
      negative: reviewed as showing none of T4..L4.
      rows: the raw csv rows of the image.
    """

    points: dict[str, tuple[float, float]]
    participant: str
    split: str
    negative: bool
    rows: tuple[dict[str, str], ...]


def image_key(value: str) -> str:
    """A csv `image` cell as the folder-relative id the catalog uses."""
    value = value.strip().replace("\\", "/")
    return posixpath.normpath(value) if value else ""


@dataclasses.dataclass(frozen=True)
class Sheet:
    """annotations.csv as read.

    Attributes:
      header: its columns ([] when there is no file yet).
      rows: (line number, {column: stripped value}) below the header.
      row_problems: {line number: message} of the rows the review cannot
        use (kept in the file as they are).
      error: why the file cannot be rewritten at all, or None.
    """

    header: list[str]
    rows: list[tuple[int, dict[str, str]]]
    row_problems: dict[int, str] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        return list(self.row_problems.values())

    def problems_of(self, image_id: str) -> list[str]:
        """The row problems of one image's rows."""
        return [
            self.row_problems[line]
            for line, row in self.rows
            if line in self.row_problems and image_key(row.get("image", "")) == image_id
        ]

    def rows_of(self, image_id: str) -> list[dict[str, str]]:
        return [row for _, row in self.rows if image_key(row.get("image", "")) == image_id]

    def version(self, image_id: str) -> str:
        """A hash of the image's rows; the same rows in any order give the same version."""
        cells = sorted([row.get(c, "") for c in COLUMNS] for row in self.rows_of(image_id))
        return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]

    def labels(self, image_id: str) -> Labels | None:
        """The image's labels; None when the csv has no row of it (not reviewed)."""
        rows = self.rows_of(image_id)
        if not rows:
            return None
        points = {}
        for row in rows:
            # Negative rows and those named in `problems` carry no point.
            if row.get(folder.NEGATIVE) != "1" and _row_problem(row) is None:
                name = vertebrae.NAMES[vertebrae.index(row["vertebra"])]
                points[name] = (float(row["x"]), float(row["y"]))
        return Labels(
            points=points,
            participant=rows[0].get("participant", ""),
            split=rows[0].get("split", ""),
            negative=any(row.get(folder.NEGATIVE) == "1" for row in rows),
            rows=tuple(rows),
        )

    def reviewed(self) -> set[str]:
        """Ids of the images the csv names."""
        return {image_key(row.get("image", "")) for _, row in self.rows}


def _row_problem(row: dict[str, str]) -> str | None:
    if row.get(folder.NEGATIVE) == "1":
        return None
    try:
        vertebrae.index(row.get("vertebra", ""))
    except ValueError as e:
        return str(e)
    for column in ("x", "y"):
        try:
            if not math.isfinite(float(row.get(column, ""))):
                raise ValueError
        except ValueError:
            return f"column {column!r} is not a finite number: {row.get(column)!r}"
    return None


def _parse(stream: io.TextIOBase, path: Path) -> Sheet:
    reader = csv.DictReader(stream)
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in folder.REQUIRED_COLUMNS if c not in header]
    if missing:
        return Sheet(header, [], {}, f"{path}: missing column(s) {', '.join(missing)}")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:  # rewriting would drop the surplus fields
            return Sheet(header, [], {}, f"{path} row {reader.line_num}: more fields than columns")
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    problems = {}
    for line, row in rows:
        problem = _row_problem(row)
        if problem:
            problems[line] = f"{path} row {line}: {problem}"
    return Sheet(header, rows, problems)


def read_sheet(path: Path) -> Sheet:
    """Reads annotations.csv; a missing file is an empty sheet."""
    if not path.is_file():
        return Sheet(header=[], rows=[])
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _parse(f, path)
    except UnicodeDecodeError:
        return Sheet([], [], {}, f"{path}: not UTF-8 text")
    except csv.Error as e:
        return Sheet([], [], {}, f"{path}: not valid CSV ({e})")


def changes_from(
    prediction: catalog.Prediction, points: Mapping[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """What the reviewed points change in the prediction, vertebra by vertebra.

    Returns:
      [{"vertebra", "change": "moved" | "added" | "removed" | "kept", ...}] in
      order T4..L4; "added" also names points the model saw below the
      presence threshold (with that confidence).
    """
    found = []
    for k, name in enumerate(vertebrae.NAMES):
        predicted = [round(float(v), DECIMALS) for v in prediction.xy[k]]
        confidence = round(float(prediction.confidence[k]), 4)
        entry: dict[str, Any] = {"vertebra": name}
        if prediction.present[k] and name in points:
            to = list(points[name])
            distance = math.dist(predicted, to)
            entry.update(change="moved" if distance > 0.01 else "kept", to=to)
            if distance > 0.01:
                entry.update(**{"from": predicted, "distance_px": round(distance, DECIMALS)})
        elif prediction.present[k]:
            entry.update(change="removed", confidence=confidence, **{"from": predicted})
        elif name in points:
            entry.update(change="added", to=list(points[name]), confidence=confidence)
        else:
            continue
        found.append(entry)
    return found


def _cell(value: float) -> str:
    """A coordinate in at most DECIMALS decimals, without trailing zeros."""
    return f"{value:.{DECIMALS}f}".rstrip("0").rstrip(".")


def _new_rows(
    image_id: str, participant: str, split: str, named: Mapping[str, tuple[float, float]]
) -> list[dict[str, str]]:
    """The csv rows of one reviewed image: one per point, or one negative row."""
    base = {"image": image_id, "participant": participant, "split": split}
    if not named:
        return [{**base, "vertebra": "", "x": "", "y": "", folder.NEGATIVE: "1"}]
    return [
        {**base, "vertebra": name, "x": _cell(x), "y": _cell(y), folder.NEGATIVE: ""}
        for name, (x, y) in named.items()
    ]


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """An exclusive flock on the folder, where the platform has one."""
    try:
        import fcntl
    except ImportError:  # Windows: the in-process lock alone
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """annotations.csv and review.json of one images folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.csv_path = self.root / ANNOTATIONS
        self.log_path = self.root / LOG
        self._lock = threading.Lock()

    def sheet(self) -> Sheet:
        return read_sheet(self.csv_path)

    def _log(self) -> dict[str, Any]:
        if not self.log_path.is_file():
            return {"format": LOG_FORMAT, "saves": []}
        try:
            log = json.loads(self.log_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{self.log_path}: not valid JSON ({e}); move it aside to save"
            ) from None
        if not isinstance(log, dict) or not isinstance(log.get("saves"), list):
            raise StoreError(f"{self.log_path}: not a review log; move it aside to save")
        return log

    def save(
        self,
        prediction: catalog.Prediction,
        *,
        version: str,
        points: Sequence[Mapping[str, Any]],
        participant: str,
        split: str,
        edits: Sequence[Any] = (),
    ) -> str:
        """Replaces the image's rows with the reviewed points; returns the new version.

        Args:
          prediction: the reviewed radiograph (its image_id names the rows).
          version: the version the review started from (`Sheet.version`).
          points: [{"name", "x", "y"}] in original pixels; none = a negative.
          participant, split: the csv's columns for this image.
          edits: the browser's edit history, logged as given.

        Raises:
          Conflict: the image's rows are no longer at `version`.
          Invalid: a point off the image, an unknown or repeated name, a bad
            participant or split.
          StoreError: annotations.csv or review.json cannot be rewritten.
        """
        image_id = prediction.image_id
        if image_id is None:
            raise Invalid(prediction.problem or "no image to label")
        named = self._check(prediction, points, participant, split)
        with self._lock, _folder_lock(self.root):
            sheet = self.sheet()
            if sheet.error:
                raise StoreError(f"{sheet.error}; fix it to save")
            log = self._log()
            current = sheet.version(image_id)
            if version != current:
                raise Conflict(current)
            for line, row in sheet.rows:
                other = image_key(row.get("image", ""))
                if other != image_id and row.get("participant") == participant:
                    if row.get("split", "") != split:
                        raise Invalid(
                            f"participant {participant!r} has split {row.get('split', '')!r} "
                            f"on {other} ({ANNOTATIONS} row {line}); one participant, one split"
                        )
            rows = [row for _, row in sheet.rows if image_key(row.get("image", "")) != image_id]
            rows += _new_rows(image_id, participant, split, named)
            rows.sort(key=lambda row: image_key(row["image"]))  # stable: others keep their order
            header = sheet.header + [c for c in COLUMNS if c not in sheet.header]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
            after = _parse(io.StringIO(text), self.csv_path).version(image_id)
            entry = {
                "time": _now(),
                "image": image_id,
                "prediction": prediction.file,
                "model": prediction.model,
                "participant": participant,
                "split": split,
                "negative": not named,
                "version_before": current,
                "version_after": after,
                "changes": changes_from(prediction, named),
                "edits": list(edits),
                "replaced_rows": sheet.rows_of(image_id),
            }
            # The csv first: it is what training reads and what versions hash.
            files.write_atomic(self.csv_path, text)
            log["saves"].append(entry)
            files.write_json(self.log_path, log)
        return after

    @staticmethod
    def _check(
        prediction: catalog.Prediction,
        points: Sequence[Mapping[str, Any]],
        participant: str,
        split: str,
    ) -> dict[str, tuple[float, float]]:
        """{name: (x, y)} of the request in T4..L4 order, rounded; Invalid if it cannot be saved."""
        if not isinstance(participant, str) or not participant.strip() or "\n" in participant:
            raise Invalid("participant must be a non-empty line of text")
        if participant != participant.strip():
            raise Invalid("participant must not start or end with spaces")
        if split not in SPLITS:
            raise Invalid(f"split must be one of {', '.join(repr(s) for s in SPLITS)}")
        named: dict[str, tuple[float, float]] = {}
        for point in points:
            try:
                name = vertebrae.NAMES[vertebrae.index(str(point["name"]))]
                x, y = (round(float(point[c]), DECIMALS) for c in ("x", "y"))
            except (KeyError, TypeError, ValueError) as e:
                raise Invalid(f"bad point {point!r}: {e}") from None
            if name in named:
                raise Invalid(f"{name} is named twice")
            if not (0 <= x <= prediction.width and 0 <= y <= prediction.height):
                raise Invalid(
                    f"{name} at ({x:g}, {y:g}) lies outside the image of "
                    f"{prediction.width} x {prediction.height} pixels"
                )
            named[name] = (x, y)
        return {name: named[name] for name in vertebrae.NAMES if name in named}
