"""Reader for a user's folder of radiographs with an `annotations.csv`.

Layout: any tree of PNG, JPEG, TIFF or DICOM files plus `annotations.csv`
at the top with the columns `image` (path relative to the folder),
`participant`, `vertebra` (T4..L4), `x`, `y` (original pixels, origin at the
top-left corner of the image) and optionally `split` (train, validation or
test; empty means by hash). One row per labelled vertebra; an image with no
rows is an unlabelled negative.

The optional column `negative` makes the csv the list of images: only the
images it names are read, every other image in the tree is left out, and a
row with `negative` = 1 (vertebra, x and y empty) names an image that shows
none of T4..L4. `vertjax review` writes this column, so that radiographs
nobody has reviewed yet never enter training as negatives.

`read_folder` checks everything it can before any record is written and
raises `FolderError` naming the file, the row (its line number in the csv,
header = line 1) and the fault.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

from vertjax import imaging, vertebrae

ANNOTATIONS: str = "annotations.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("image", "participant", "vertebra", "x", "y")
# Present: the csv lists every image to use (see the module docstring).
NEGATIVE: str = "negative"
SPLIT_NAMES: frozenset[str] = frozenset({"train", "validation", "test"})


class FolderError(ValueError):
    """Bad input in a user's folder; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class FolderImage:
    """One image of the folder and its labels.

    Attributes:
      path: absolute path of the image.
      image_id: its path relative to the folder, with '/' separators.
      participant_id: from the csv; the image id for unlabelled images.
      centroids: float64 [13, 2] (x, y) pixels, 0 where not labelled.
      labeled: bool [13].
      split: 'train' / 'validation' / 'test', or None for the hash rule.
      size: (height, width) in pixels.
    """

    path: str
    image_id: str
    participant_id: str
    centroids: np.ndarray
    labeled: np.ndarray
    split: str | None
    size: tuple[int, int]


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in imaging.SUFFIXES


def list_images(root: str) -> list[str]:
    """Relative posix paths of every image file under root, sorted; hidden entries skipped."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and _is_image(name):
                rel = os.path.relpath(os.path.join(directory, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _resolve(root: str, rel: str, where: str) -> tuple[str, str]:
    """(absolute path, normalised relative id) of a csv path, refusing escapes."""
    if not rel:
        raise FolderError(f"{where}: empty image path")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise FolderError(
            f"{where}: image path {rel!r} is absolute; it must be relative to the folder"
        )
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, path]) != real_root:
        raise FolderError(f"{where}: image path {rel!r} leaves the folder")
    if not os.path.isfile(path):
        raise FolderError(f"{where}: image file {rel!r} not found")
    image_id = os.path.relpath(path, real_root).replace(os.sep, "/")
    return path, image_id


def _number(value: str, column: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FolderError(f"{where}: column {column!r} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise FolderError(f"{where}: column {column!r} is not finite: {value!r}")
    return number


def _first_undecodable(csv_path: str) -> tuple[int, int]:
    """(line number, byte) of the first byte that is not UTF-8; the decoder's own
    offset counts from the start of its read buffer, not of the file."""
    with open(csv_path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return line_number, line[e.start]
    return 0, 0


def _read_rows(csv_path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and (line number, {column: stripped value}) of every row below it."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if not header:
            raise FolderError(f"{csv_path}: empty file, expected a header row")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise FolderError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        reader.fieldnames = header
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, _row_values(row, header, csv_path, reader.line_num)))
        except csv.Error as e:
            raise FolderError(
                f"{csv_path} row {reader.line_num + 1}: not valid CSV ({e})"
            ) from None
    return header, rows


def _row_values(row: dict, header: list[str], csv_path: str, line: int) -> dict[str, str]:
    """{column: stripped value} of one csv row; FolderError for surplus fields."""
    extra = row.pop(None, None)
    if extra is not None:
        # Most often a decimal comma ("12,5") splitting a number in two:
        # reading on would shift every later column.
        raise FolderError(
            f"{csv_path} row {line}: {len(header) + len(extra)} fields but the header has "
            f"{len(header)} (an unquoted comma?)"
        )
    return {k: (v or "").strip() for k, v in row.items()}


def _negative(row: dict[str, str], where: str) -> bool:
    """The row's `negative` flag; a negative row may name no vertebra or point."""
    flag = row.get(NEGATIVE, "")
    if flag not in ("", "0", "1"):
        raise FolderError(f"{where}: column {NEGATIVE!r} must be 1, 0 or empty, not {flag!r}")
    if flag == "1" and any(row[c] for c in ("vertebra", "x", "y")):
        raise FolderError(f"{where}: a row with {NEGATIVE}=1 must leave vertebra, x and y empty")
    return flag == "1"


def read_folder(root: str) -> list[FolderImage]:
    """Reads and validates a user's folder.

    Args:
      root: the folder holding the images and `annotations.csv`.

    Returns:
      Every image (labelled ones and negatives), sorted by image id; with a
      `negative` column, only the images the csv names.

    Raises:
      FolderError: any fault, naming the file and row.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FolderError(f"{root}: folder not found")
    csv_path = os.path.join(root, ANNOTATIONS)
    if not os.path.isfile(csv_path):
        raise FolderError(f"{csv_path}: annotations file not found")
    try:
        header, rows = _read_rows(csv_path)
    except UnicodeDecodeError:
        line, byte = _first_undecodable(csv_path)
        raise FolderError(
            f"{csv_path} row {line}: not UTF-8 text (byte {byte:#04x}); save the file as UTF-8"
        ) from None
    if not rows:
        raise FolderError(f"{csv_path}: no annotation rows below the header")
    listed_only = NEGATIVE in header

    labels: dict[str, dict] = {}
    seen: dict[tuple[str, int], int] = {}
    participant_split: dict[str, tuple[str | None, int]] = {}
    for line, row in rows:
        where = f"{csv_path} row {line}"
        path, image_id = _resolve(root, row["image"], where)
        participant = row["participant"]
        if not participant:
            raise FolderError(f"{where}: empty participant")
        negative = _negative(row, where) if listed_only else False
        if not negative:
            try:
                k = vertebrae.index(row["vertebra"])
            except ValueError as e:
                raise FolderError(f"{where}: {e}") from None
            x = _number(row["x"], "x", where)
            y = _number(row["y"], "y", where)
            if (image_id, k) in seen:
                raise FolderError(
                    f"{where}: duplicate vertebra {vertebrae.NAMES[k]} for image {image_id!r} "
                    f"(first on row {seen[image_id, k]})"
                )
            seen[image_id, k] = line
        split = row.get("split") or None
        if split is not None and split not in SPLIT_NAMES:
            raise FolderError(
                f"{where}: unknown split {split!r}: expected one of {', '.join(sorted(SPLIT_NAMES))}"
            )
        if participant in participant_split:
            previous, previous_line = participant_split[participant]
            if previous != split:
                raise FolderError(
                    f"{where}: participant {participant!r} has split {split!r} here but "
                    f"{previous!r} on row {previous_line}"
                )
        else:
            participant_split[participant] = (split, line)
        entry = labels.setdefault(
            image_id,
            {
                "path": path,
                "participant": participant,
                "line": line,
                "points": {},
                "split": split,
                "negative": None,
            },
        )
        if entry["participant"] != participant:
            raise FolderError(
                f"{where}: image {image_id!r} belongs to participant {participant!r} here but "
                f"to {entry['participant']!r} on row {entry['line']}"
            )
        if negative:
            entry["negative"] = line
        else:
            entry["points"][k] = (x, y, line)
        if entry["negative"] is not None and entry["points"]:
            first = min(p[2] for p in entry["points"].values())
            raise FolderError(
                f"{where}: image {image_id!r} is marked negative on row {entry['negative']} "
                f"but has a vertebra on row {first}"
            )

    images = []
    unlabelled = {}
    for rel in () if listed_only else list_images(root):
        if rel not in labels:
            # The rule of the csv paths holds for found files too: a link that
            # leads out of the folder is refused, not followed.
            path, image_id = _resolve(root, rel, os.path.join(root, rel))
            unlabelled.setdefault(image_id, path)
    for image_id in sorted(set(labels) | set(unlabelled)):
        entry = labels.get(image_id)
        path = entry["path"] if entry else unlabelled[image_id]
        try:
            height, width = imaging.image_size(path)
        except imaging.ImageError as e:
            where = f" (referenced on {csv_path} row {entry['line']})" if entry else ""
            raise FolderError(f"{e}{where}") from None
        centroids = np.zeros((vertebrae.K, 2))
        labeled = np.zeros(vertebrae.K, dtype=bool)
        for k, (x, y, line) in entry["points"].items() if entry else ():
            if not (0 <= x <= width and 0 <= y <= height):
                raise FolderError(
                    f"{csv_path} row {line}: point ({x:g}, {y:g}) of {vertebrae.NAMES[k]} lies "
                    f"outside image {image_id!r} of {width} x {height} pixels"
                )
            centroids[k] = (x, y)
            labeled[k] = True
        images.append(
            FolderImage(
                path=path,
                image_id=image_id,
                participant_id=entry["participant"] if entry else image_id,
                centroids=centroids,
                labeled=labeled,
                split=entry["split"] if entry else None,
                size=(height, width),
            )
        )
    return images
