"""What a `vertjax predict` folder holds, and where each prediction's radiograph is.

`load` reads every `<stem>.json` of the folder (it never writes there) and
finds the image each one was made from, under one images folder: `--images`
when given, else the deepest folder holding every image that
`predictions.csv` names. Inside it an image is found by the path in
`predictions.csv`, else by the file name in the JSON (the longest matching
tail of that path when several files share the name). An image must lie
inside the images folder after following links, and must have the size
the prediction was made on.

A prediction that cannot be read (malformed JSON, a wrong field) is left out
and named in `Catalog.problems`; one whose image is missing keeps its place
with `Prediction.problem` set. Neither stops the others.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from vertjax import imaging, vertebrae
from vertjax.review import suspicion

PREDICTIONS_CSV = "predictions.csv"  # vertjax.predict.CSV_FILE, without importing JAX here
# JSON files of the folder that are not predictions.
NOT_PREDICTIONS = frozenset({"review.json"})


class CatalogError(ValueError):
    """The prediction folder or the images folder cannot be used at all."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predicted radiograph.

    Attributes:
      id: the output stem (`<id>.json`), the radiograph's name in URLs.
      file: the JSON file's name.
      image_name: the input's file name, as the JSON gives it.
      width, height: the original size in pixels.
      xy: float [13, 2] (x, y) in original pixels.
      confidence: float [13].
      present: bool [13].
      model: the JSON's provenance record.
      assessment: the suspicion score and reasons.
      image_path: the image, links resolved; None when not found.
      image_id: its path relative to the images folder ('/' separators).
      problem: why the radiograph cannot be shown, or None.
    """

    id: str
    file: str
    image_name: str
    width: int
    height: int
    xy: np.ndarray
    confidence: np.ndarray
    present: np.ndarray
    model: dict[str, Any]
    assessment: suspicion.Assessment
    image_path: Path | None = None
    image_id: str | None = None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The predictions (by id, worst first), the images folder and what went wrong."""

    pred_dir: Path
    images_root: Path
    predictions: dict[str, Prediction]
    problems: tuple[str, ...]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def parse(path: Path) -> Prediction:
    """Reads one prediction JSON in the format `vertjax.predict` writes.

    Raises:
      ValueError: the message says what is wrong, without the path.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    image = record.get("image")
    if not isinstance(image, str) or not image or "/" in image or "\\" in image:
        raise ValueError(f"'image' must be a file name, got {image!r}")
    size = []
    for key in ("width", "height"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'{key}' must be a positive whole number, got {value!r}")
        size.append(value)
    entries = record.get("vertebrae")
    if not isinstance(entries, list) or len(entries) != vertebrae.K:
        raise ValueError(f"'vertebrae' must list the {vertebrae.K} vertebrae T4..L4")
    xy = np.zeros((vertebrae.K, 2))
    confidence = np.zeros(vertebrae.K)
    present = np.zeros(vertebrae.K, bool)
    for k, (name, entry) in enumerate(zip(vertebrae.NAMES, entries, strict=True)):
        if not isinstance(entry, dict) or entry.get("name") != name:
            raise ValueError(f"vertebrae[{k}] must be the entry of {name}")
        xy[k] = [_number(entry.get(c), f"{name} {c}") for c in ("x", "y")]
        confidence[k] = _number(entry.get("confidence"), f"{name} confidence")
        if not isinstance(entry.get("present"), bool):
            raise ValueError(f"{name} 'present' must be true or false")
        present[k] = entry["present"]
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    return Prediction(
        id=path.stem,
        file=path.name,
        image_name=image,
        width=size[0],
        height=size[1],
        xy=xy,
        confidence=confidence,
        present=present,
        model=model,
        assessment=suspicion.assess(xy, confidence, present),
    )


def _csv_paths(pred_dir: Path, problems: list[str]) -> dict[str, str]:
    """{output stem: input path as predict was given it} from predictions.csv."""
    path = pred_dir / PREDICTIONS_CSV
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("output") and row.get("path"):
                    found.setdefault(row["output"], row["path"])
    except (csv.Error, UnicodeDecodeError, OSError) as e:
        problems.append(f"{path}: cannot be read ({e}); images are found by file name")
    return found


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _tail_match(candidate: Path, hint: str | None) -> int:
    """How many trailing path parts `candidate` shares with the csv's path."""
    if not hint:
        return 0
    count = 0
    for a, b in zip(reversed(candidate.parts), reversed(Path(hint).parts), strict=False):
        if a != b:
            break
        count += 1
    return count


class _ImageIndex:
    """Files under the images folder by name, listed once, when first needed."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def named(self, name: str) -> list[Path]:
        if self._by_name is None:
            self._by_name = {}
            for directory, dirs, files in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in files:
                    self._by_name.setdefault(file, []).append(Path(directory) / file)
        return self._by_name.get(name, [])


def _find_image(prediction: Prediction, hint: str | None, root: Path, index: _ImageIndex):
    """(real path, image id, problem) of a prediction's image under `root`."""
    candidates = []
    if hint and Path(hint).is_file() and _inside(Path(hint).resolve(), root):
        candidates = [Path(hint)]
    else:  # moved, or --images names another copy: by file name under the root
        named = index.named(prediction.image_name)
        if named:
            best = max(_tail_match(p, hint) for p in named)
            candidates = [p for p in named if _tail_match(p, hint) == best]
    if not candidates:
        return None, None, f"image {prediction.image_name} not found under {root}"
    if len(candidates) > 1:
        listed = ", ".join(str(p) for p in candidates[:3])
        return None, None, f"several images named {prediction.image_name}: {listed}"
    real = candidates[0].resolve()
    if not _inside(real, root):
        return None, None, f"image {candidates[0]} lies outside {root} (a link leading out?)"
    try:
        height, width = imaging.image_size(real)
    except imaging.ImageError as e:
        return None, None, str(e)
    if (width, height) != (prediction.width, prediction.height):
        return (
            None,
            None,
            (
                f"image {real} is {width} x {height} pixels but the prediction was made on "
                f"{prediction.width} x {prediction.height}"
            ),
        )
    return real, real.relative_to(root).as_posix(), None


def _images_root(images: str | os.PathLike | None, hints: dict[str, str]) -> Path:
    if images is not None:
        root = Path(images).resolve()
        if not root.is_dir():
            raise CatalogError(f"--images={images}: folder not found")
        return root
    found = [Path(p).resolve().parent for p in hints.values() if Path(p).is_file()]
    if not found:
        raise CatalogError(
            f"the radiographs named in {PREDICTIONS_CSV} are not found from here; "
            "give the folder that holds them with --images"
        )
    root = Path(os.path.commonpath(found))
    if root == Path(root.anchor):
        # annotations.csv goes to the images folder: never to the file system's root.
        raise CatalogError(
            f"the radiographs named in {PREDICTIONS_CSV} share no folder; give one with --images"
        )
    return root


def load(pred_dir: str | os.PathLike, images: str | os.PathLike | None = None) -> Catalog:
    """Reads a prediction folder and finds its radiographs.

    Args:
      pred_dir: a folder written by `vertjax predict`.
      images: the folder holding the radiographs (searched recursively);
        None: the deepest folder holding every image predictions.csv names
        (relative paths there are taken from the current folder).

    Returns:
      The Catalog, predictions sorted by suspicion (highest first), then id.

    Raises:
      CatalogError: no such folder, no prediction in it, or no images folder.
    """
    pred = Path(pred_dir)
    if not pred.is_dir():
        raise CatalogError(f"{pred_dir}: prediction folder not found")
    problems: list[str] = []
    hints = _csv_paths(pred, problems)
    files = sorted(p for p in pred.glob("*.json") if p.name not in NOT_PREDICTIONS)
    if not files:
        raise CatalogError(f"{pred_dir}: no prediction (<stem>.json) in it")
    root = _images_root(images, hints)
    index = _ImageIndex(root)
    found: list[Prediction] = []
    by_image: dict[str, str] = {}
    for path in files:
        try:
            prediction = parse(path)
        except (ValueError, OSError) as e:
            problems.append(f"{path}: {e}")
            continue
        real, image_id, problem = _find_image(prediction, hints.get(path.stem), root, index)
        if image_id is not None and image_id in by_image:
            # One image, one set of labels: the first prediction of it is reviewed.
            problem = f"image {image_id} is also the image of {by_image[image_id]}.json"
            real, image_id = None, None
        if image_id is not None:
            by_image[image_id] = prediction.id
        found.append(
            dataclasses.replace(prediction, image_path=real, image_id=image_id, problem=problem)
        )
    for prediction in found:
        if prediction.problem:
            problems.append(f"{pred / prediction.file}: {prediction.problem}")
    for problem in problems:
        logging.warning("review: %s", problem)
    found.sort(key=lambda p: (-p.assessment.score, p.id))
    return Catalog(
        pred_dir=pred.resolve(),
        images_root=root,
        predictions={p.id: p for p in found},
        problems=tuple(problems),
    )
