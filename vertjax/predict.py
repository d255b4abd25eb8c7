"""Run a trained model on new radiographs: named centroids as JSON, CSV and overlays.

Command:
  python -m vertjax.predict --out=DIR [--batch_size=8] INPUT...         # the shipped model
  python -m vertjax.predict --model=NAME_OR_FOLDER --out=DIR INPUT...   # another shipped model
  python -m vertjax.predict --workdir=RUN [--checkpoint=best|latest|STEP] --out=DIR INPUT...

INPUT is any mix of files and folders (searched recursively) of PNG, JPEG,
TIFF or DICOM radiographs of any size and aspect. For each readable image
`DIR/<stem>.json` holds
  {"image": file name, "width": W, "height": H, "pixel_spacing_mm": float|null,
   "vertebrae": [{"name": "T4", "x", "y", "confidence", "present",
                  "x_mm", "y_mm"}, ... 13 entries, T4..L4]}
with (x, y) in the original image's pixels (x right, y down, origin at the
top-left corner of the top-left pixel) and `present` = confidence >= the
run's `presence_threshold`. `DIR/<stem>_overlay.png` draws the named
centroids and `DIR/predictions.csv` has one row per image and vertebra.

Images are resized to the model's S x S input without keeping the aspect
ratio (as in training), so a model point (x, y) maps back to
(x * W / S, y * H / S). Inference runs in fixed-size batches (the last one
padded) through one jit-compiled function: one compilation per run.

A file that cannot be read gets one line on stderr naming it and the reason;
the others are still processed and the exit status is 1 if any failed.

Output names: the input's stem. Where two inputs share a stem (e.g.
`a/x.png` and `b/x.dcm`), each of them is named by its path relative to the
deepest folder common to all inputs, suffix included, with path separators
and dots turned into `__` and `_`: `a__x_png`, `b__x_dcm`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from vertjax import checkpoints, heatmaps, imaging, models, overlay, postprocess, shipped, vertebrae

CSV_FILE = "predictions.csv"
CSV_COLUMNS = (
    "image",
    "path",
    "output",
    "width",
    "height",
    "pixel_spacing_mm",
    "vertebra",
    "x",
    "y",
    "confidence",
    "present",
    "x_mm",
    "y_mm",
)
# Decimals kept in the outputs: 1e-4 px and 1e-6 of confidence are far below
# what the model resolves, and short numbers keep the files readable.
COORD_DECIMALS = 4
CONF_DECIMALS = 6


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything inference needs from a trained run.

    Attributes:
      apply: (variables, images float32 [B, S, S, 1]) -> heatmaps [B, S, S, K].
      variables: the network's variables ({'params': ...}).
      image_size: S.
      pixel_mean, pixel_std: the training split's pixel statistics (uint8 scale).
      presence_threshold: a vertebra is present when its confidence reaches this.
      locate: heatmaps [B, S, S, K] -> (points [B, K, 2] model px,
        confidence [B, K]); the plain decoder or the configured post-processing.
      step: the training step of the checkpoint (for the record).
      config: the run's config.
      flip: average with the mirrored image's heatmaps (`models.heatmaps_of`).
      source: where the model came from: 'model NAME' or the workdir.
      prior: the post-processing spacing prior, where post-processing is on.
    """

    apply: Callable[[Any, jax.Array], jax.Array]
    variables: Any
    image_size: int
    pixel_mean: float
    pixel_std: float
    presence_threshold: float
    locate: Callable[[jax.Array], tuple[jax.Array, jax.Array]] = heatmaps.decode
    step: int | None = None
    config: ml_collections.ConfigDict | None = None
    flip: bool = False
    source: str = ""
    prior: Any = None


@functools.partial(jax.jit, static_argnames=("apply", "locate", "mean", "std", "flip"))
def _infer(variables, images, *, apply, locate, mean, std, flip):
    # The same normalisation as training (input_pipeline.Preprocess).
    x = (images.astype(jnp.float32)[..., None] - mean) / std
    return locate(models.heatmaps_of(apply, variables, x, flip=flip))


def make_infer(model: Model) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    """The jit-compiled batch function: uint8 images [B, S, S] -> (points, confidence).

    Points are [B, K, 2] in model pixels, confidence [B, K]. The variables
    are an argument, not a constant, so compilation does not embed (and
    copy) the weights. The compilation is cached on the model's functions
    and statistics: every call with the same B, through this or a later
    `make_infer` of the same Model, reuses one executable.
    """
    variables = jax.device_put(model.variables)
    static = {
        "apply": model.apply,
        "locate": model.locate,
        "mean": model.pixel_mean,
        "std": model.pixel_std,
        "flip": model.flip,
    }
    return lambda images: _infer(variables, images, **static)


def load_model(workdir: str | os.PathLike, checkpoint: str | int = "best") -> Model:
    """The model of a training run, ready for `make_infer`.

    Reads the run's config and the parameters of one checkpoint from
    `<workdir>/checkpoints` (orbax; the optimiser state is restored with
    them and dropped). The pixel statistics come from the checkpoint's meta
    where saved, else from the run's TFDS dataset; the post-processing
    prior (when the config enables it) is fitted on that dataset's training
    split. A dataset needed here must be built on this machine already.

    Args:
      workdir: the training run's folder.
      checkpoint: 'best' (validation ID accuracy), 'latest' or a step number.

    Raises:
      ValueError: no checkpoints, an unknown checkpoint, a model that does
        not match, or the run's dataset is not available.
    """
    ckpt_dir = Path(workdir).resolve() / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(f"{workdir}: no checkpoints folder (is it a training workdir?)")
    # Imported here: the file handling of this module needs no training stack.
    from vertjax import train

    ckpt = checkpoints.Checkpointer(str(ckpt_dir), read_only=True)
    try:
        step = ckpt.resolve(checkpoint)
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        # Shapes only (no weights initialised just to be overwritten), on
        # one device: inference runs unsharded.
        template = train.abstract_train_state(config, train.make_mesh(1))
        state, meta = ckpt.restore(step, state=template)
    finally:
        ckpt.close()
    mean, std, prior = _statistics(config, meta)
    logging.info("%s: checkpoint %d (%s)", workdir, step, checkpoint)
    return _model(
        config,
        train.inference_params(state),
        mean=mean,
        std=std,
        prior=prior,
        step=step,
        source=str(workdir),
    )


def load_shipped(name: str | os.PathLike = shipped.DEFAULT_MODEL) -> Model:
    """A shipped model (`vertjax.shipped.names()`, or a model folder), ready for `make_infer`.

    Raises:
      shipped.ShippedModelError (a ValueError): unknown, damaged or mismatched.
    """
    found = shipped.load(name)
    return _model(
        found.config,
        found.params,
        mean=found.pixel_mean,
        std=found.pixel_std,
        prior=found.prior,
        step=found.info.get("step"),
        source=f"model {found.name}",
    )


def _model(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    mean: float,
    std: float,
    prior: Any,
    step: int | None,
    source: str,
) -> Model:
    locate = heatmaps.decode
    if config.postprocess.enabled:
        locate = functools.partial(
            postprocess.apply,
            prior=prior,
            top_m=int(config.postprocess.top_m),
            min_confidence=float(config.postprocess.min_confidence),
        )
    return Model(
        apply=functools.partial(models.from_config(config).apply, train=False),
        variables={"params": params},
        image_size=int(config.image_size),
        pixel_mean=mean,
        pixel_std=std,
        presence_threshold=float(config.presence_threshold),
        locate=locate,
        step=step,
        config=config,
        flip=bool(config.get("test_time_flip", False)),
        source=source,
        prior=prior,
    )


def _statistics(
    config: ml_collections.ConfigDict, meta: dict[str, Any]
) -> tuple[float, float, Any]:
    """(pixel mean, pixel std, post-processing prior or None) of the run's training split.

    Pixel statistics saved with the checkpoint (`meta['pixel_mean']`,
    `meta['pixel_std']`) are used when present, so that inference needs no
    dataset; otherwise they, and the prior, come from the run's built dataset.
    """
    mean, std = (meta or {}).get("pixel_mean"), (meta or {}).get("pixel_std")
    if mean is not None and std is not None and not config.postprocess.enabled:
        return float(mean), float(std), None
    from vertjax import data, evaluate

    d = config.dataset
    try:
        builder = data.get_builder(
            d.name, data_dir=d.data_dir or None, manual_dir=d.manual_dir or None, build=False
        )
        if mean is None or std is None:
            mean, std = data.pixel_stats(builder)
        prior = None
        if config.postprocess.enabled:
            prior = evaluate.fit_prior(builder.as_data_source("train"), int(config.image_size))
    except data.DataError as e:
        needed = "pixel statistics"
        if config.postprocess.enabled:
            needed += " and post-processing prior"
        raise ValueError(
            f"the run's dataset {d.name!r} is not available here; predict needs its {needed}: {e}"
        ) from e
    return float(mean), float(std), prior


def to_original(points: np.ndarray, *, width: int, height: int, size: int) -> np.ndarray:
    """Model pixels (x, y) [..., 2] of an S x S input -> original pixels of a W x H image.

    Both grids share the corner origin and cover the whole image, so the map
    is a pure scale: x * W / S, y * H / S.
    """
    points = np.asarray(points, np.float64)
    return points * np.array([width / size, height / size])


def find_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expands folders (recursively, sorted) into radiograph files.

    A folder contributes files with an image suffix (`imaging.SUFFIXES`) or
    the DICOM magic, skipping hidden files; files named explicitly are kept
    whatever their suffix (and fail later if unreadable), and so are paths
    that do not exist, so that they are reported like any unreadable file.
    Each file appears once.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() in imaging.SUFFIXES or imaging.is_dicom(p))
            )
        else:
            candidates = [path]
        for p in candidates:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct output stem per input file (see the module docstring).

    Stems are compared case-insensitively so that outputs do not collide on
    case-insensitive file systems either.
    """
    stems = [f.stem for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if files else Path()
    names = []
    for r, stem in zip(resolved, stems, strict=True):
        if counts[stem.lower()] == 1:
            names.append(stem)
        else:
            rel = r.relative_to(common).as_posix()
            names.append(rel.replace("/", "__").replace(".", "_"))
    # A disambiguated name could still equal another file's plain stem
    # (e.g. a file literally called `a__x_png.png`): number the later ones.
    taken: dict[str, int] = {}
    unique = []
    for name in names:
        key = name.lower()
        if key in taken:
            taken[key] += 1
            name = f"{name}-{taken[key]}"
        else:
            taken[key] = 1
        unique.append(name)
    return unique


def _round(value: float, decimals: int) -> float:
    return round(float(value), decimals)


def prediction_record(
    *,
    image: str,
    width: int,
    height: int,
    pixel_spacing_mm: float | None,
    points: np.ndarray,
    confidence: np.ndarray,
    present: np.ndarray,
) -> dict[str, Any]:
    """The JSON object of one image.

    Args:
      image: the input's file name.
      width, height: the original size in pixels.
      pixel_spacing_mm: mm per pixel, or None when unknown.
      points: [K, 2] (x, y) in original pixels.
      confidence: [K] heatmap peaks.
      present: [K] bool.
    """
    spacing = None if pixel_spacing_mm is None else float(pixel_spacing_mm)
    entries = []
    for k, name in enumerate(vertebrae.NAMES):
        x, y = float(points[k, 0]), float(points[k, 1])
        entries.append(
            {
                "name": name,
                "x": _round(x, COORD_DECIMALS),
                "y": _round(y, COORD_DECIMALS),
                "confidence": _round(confidence[k], CONF_DECIMALS),
                "present": bool(present[k]),
                "x_mm": None if spacing is None else _round(x * spacing, COORD_DECIMALS),
                "y_mm": None if spacing is None else _round(y * spacing, COORD_DECIMALS),
            }
        )
    return {
        "image": image,
        "width": int(width),
        "height": int(height),
        "pixel_spacing_mm": spacing,
        "vertebrae": entries,
    }


def csv_rows(record: dict[str, Any], *, path: str, output: str) -> list[dict[str, Any]]:
    """One CSV row per vertebra of a `prediction_record` (None -> empty cell)."""
    rows = []
    for v in record["vertebrae"]:
        row = {
            "image": record["image"],
            "path": path,
            "output": output,
            "width": record["width"],
            "height": record["height"],
            "pixel_spacing_mm": record["pixel_spacing_mm"],
            "vertebra": v["name"],
            **{k: v[k] for k in ("x", "y", "confidence", "present", "x_mm", "y_mm")},
        }
        rows.append({k: "" if val is None else val for k, val in row.items()})
    return rows


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_problem(out: str | os.PathLike) -> str | None:
    """Why `out` cannot be the output folder (a file on its path), or None."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            return None if path.is_dir() else f"{path} is a file, not a folder"
    return None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place.

    A reader never sees a half-written file, and an interrupted run leaves
    the previous version (or nothing), not a truncated one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode any new file gets.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Writes `rows` with the columns `CSV_COLUMNS`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue().encode())


@dataclasses.dataclass
class Outcome:
    """What a prediction run did: written outputs and (path, reason) failures."""

    written: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _prefetch(
    files: Sequence[Path], workers: int, depth: int
) -> Iterator[tuple[int, imaging.Radiograph | Exception]]:
    """Reads files in a thread pool, at most `depth` ahead, yielding in order.

    Decoding (PIL, pydicom, numpy) releases the GIL for most of its time, so
    threads overlap reading with the network; the bound keeps memory flat
    however many large radiographs there are.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[int, concurrent.futures.Future]] = []
        next_index = 0
        while next_index < len(files) or pending:
            while next_index < len(files) and len(pending) < depth:
                pending.append(
                    (next_index, pool.submit(imaging.read_radiograph, files[next_index]))
                )
                next_index += 1
            index, future = pending.pop(0)
            try:
                yield index, future.result()
            except (imaging.ImageError, OSError, ValueError, MemoryError) as e:
                yield index, e


def _reason(error: Exception) -> str:
    """The fault without the path prefix that ImageError already carries."""
    if isinstance(error, imaging.ImageError):
        return error.reason
    return f"{type(error).__name__}: {error}"


def predict_files(
    model: Model,
    files: Sequence[Path],
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
      model: the trained model.
      files: input radiographs (see `find_inputs`).
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
    batch_size = max(1, min(batch_size, len(files)))
    out = Path(out_dir)
    problem = output_problem(out)
    if problem:
        raise ValueError(f"output folder {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files)
    infer = make_infer(model)
    size = model.image_size
    outcome = Outcome()
    rows: list[dict[str, Any]] = []
    if progress is None:
        # tqdm's disable=None hides the bar when stderr is not a terminal.
        disable = True if len(files) <= batch_size else None
    else:
        disable = not progress
    bar = tqdm(total=len(files), unit="image", disable=disable, file=sys.stderr)

    def report(line: str) -> None:
        if on_error is not None:
            on_error(line)
        else:
            bar.write(line, file=sys.stderr)

    def flush(batch: list[tuple[int, imaging.Radiograph]]) -> None:
        images = np.zeros((batch_size, size, size), np.uint8)
        for slot, (_, radiograph) in enumerate(batch):
            images[slot] = imaging.to_model_input(radiograph.pixels, size)
        points, confidence = jax.device_get(infer(images))
        for slot, (index, radiograph) in enumerate(batch):
            height, width = radiograph.pixels.shape
            original = to_original(points[slot], width=width, height=height, size=size)
            present = confidence[slot] >= model.presence_threshold
            record = prediction_record(
                image=files[index].name,
                width=width,
                height=height,
                pixel_spacing_mm=radiograph.pixel_spacing_mm,
                points=original,
                confidence=confidence[slot],
                present=present,
            )
            name = names[index]
            json_path = out / f"{name}.json"
            write_atomic(json_path, (json.dumps(record, indent=2) + "\n").encode())
            if overlays:
                fig = overlay.draw(
                    radiograph.pixels,
                    original,
                    confidence[slot],
                    present,
                    title=files[index].name,
                )
                write_atomic(out / f"{name}_overlay.png", overlay.to_png(fig))
            rows.extend(csv_rows(record, path=str(files[index]), output=name))
            outcome.written.append(str(json_path))
        bar.update(len(batch))

    batch: list[tuple[int, imaging.Radiograph]] = []
    try:
        for index, result in _prefetch(files, read_workers, depth=2 * batch_size):
            if isinstance(result, Exception):
                reason = _reason(result)
                outcome.failures.append((str(files[index]), reason))
                report(f"{files[index]}: {reason}")
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


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags.

    Called only when the module runs as a program, so that importing it as a
    library beside another command-line module cannot clash on flag names.
    """
    flags.DEFINE_string(
        "workdir", None, "Your own training run's folder (holds checkpoints/); else --model."
    )
    flags.DEFINE_string("checkpoint", "best", "With --workdir: 'best', 'latest' or a step number.")
    flags.DEFINE_string(
        "model",
        None,
        f"A shipped model ({', '.join(shipped.names()) or 'none'}) or a model folder; "
        f"the default without --workdir is {shipped.DEFAULT_MODEL}.",
    )
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer(
        "batch_size", 8, "Images per network call (one compilation).", lower_bound=1
    )
    flags.DEFINE_bool("overlays", True, "Also write <stem>_overlay.png per image.")


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("give one or more image files or folders after the flags")
    if not FLAGS["verbosity"].present:
        # orbax and JAX log at INFO on every restore; a user of predict wants
        # the per-file errors and the summary, not that. -v 0 brings it back.
        logging.set_verbosity(logging.WARNING)
    problem = output_problem(FLAGS.out)
    if problem:
        print(f"vertjax.predict: --out={FLAGS.out}: {problem}", file=sys.stderr)
        return 1
    files = find_inputs(argv[1:])
    if not files:
        print(f"vertjax.predict: no radiographs found in {' '.join(argv[1:])}", file=sys.stderr)
        return 1
    if FLAGS.workdir and FLAGS.model:
        print("vertjax.predict: give --workdir or --model, not both", file=sys.stderr)
        return 1
    try:
        if FLAGS.workdir:
            model = load_model(FLAGS.workdir, FLAGS.checkpoint)
        else:
            model = load_shipped(FLAGS.model or shipped.DEFAULT_MODEL)
    except ValueError as e:
        print(f"vertjax.predict: {e}", file=sys.stderr)
        return 1
    outcome = predict_files(
        model, files, FLAGS.out, batch_size=FLAGS.batch_size, overlays=FLAGS.overlays
    )
    print(
        f"vertjax.predict: {len(outcome.written)} of {len(files)} image(s) written to "
        f"{FLAGS.out} ({model.source}, step {model.step}); {len(outcome.failures)} failed",
        file=sys.stderr,
    )
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
