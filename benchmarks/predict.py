"""Predict benchmark: one radiograph file to its JSON (cold and warm), and throughput.

    python -m benchmarks.predict [--workdir=RUN | --config=configs/default.py]
        [--files=64] [--batch=8] [--width=891] [--height=2375] [--format=png]
        [--json=FILE]

Measures `vertjax.predict.predict_files`, the library behind
`python -m vertjax.predict`, end to end: read and decode the file, resize,
normalise, the jit-compiled U-Net and decoder, map to original pixels,
write the JSON (and the overlay PNG, timed with and without):

  cold        the first file of a fresh model: includes jit compilation
  warm        one file with the compiled network (median over files)
  throughput  `--files` files in batches of `--batch` (compiled beforehand)

and the same three for the model exported to one file (`vertjax export`,
`predict --exported`; `--noexported` skips them), with the time to export
and to load the file. The exported function takes one radiograph of any
size and compiles once per image size; the generated files share one size.

Inputs are generated radiograph-sized images (default 891 x 2375, the
median AASCE size: noise over a smooth gradient, written as 8-bit PNG or
16-bit DICOM). Timings do not depend on the weights, so without
`--workdir` the model is the configured U-Net with random weights; the
time to restore a run's checkpoint is reported when `--workdir` is given.
Process start-up and imports (a few seconds for JAX) are not included.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks import common
from vertjax import inference

FLAGS = flags.FLAGS


def write_radiographs(folder: Path, count: int, *, width: int, height: int, fmt: str) -> list[Path]:
    """`count` generated radiographs of width x height as PNG (8-bit) or DICOM (16-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys = np.linspace(0.2, 0.8, height, dtype=np.float32)[:, None]
    xs = np.sin(np.linspace(0, np.pi, width, dtype=np.float32))[None, :]
    base = ys * xs
    paths = []
    for i in range(count):
        pixels = np.clip(base + 0.05 * rng.standard_normal(base.shape, np.float32), 0, 1)
        path = folder / f"radiograph_{i:03d}.{'png' if fmt == 'png' else 'dcm'}"
        if fmt == "png":
            from PIL import Image

            Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
        else:
            from vertjax import imaging

            imaging.write_dicom(path, np.rint(pixels * 4095), spacing=0.14, bits_stored=12)
        paths.append(path)
    return paths


def random_model(config_path: str) -> Any:
    """A `inference.Predictor` of the configured U-Net with random weights."""
    import functools
    import importlib.util

    import jax
    import jax.numpy as jnp

    from vertjax import models

    spec = importlib.util.spec_from_file_location("bench_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    net = models.from_config(config)
    s = config.image_size
    # Shapes from the model, values drawn here: an eager `init` of the U-Net
    # takes tens of seconds on a small CPU and timings do not depend on them.
    shapes = jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros((1, s, s, 1)), train=False)
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype), shapes)
    return inference.Predictor(
        apply=functools.partial(net.apply, train=False),
        variables=variables,
        image_size=int(s),
        pixel_mean=128.0,
        pixel_std=64.0,
        presence_threshold=float(config.presence_threshold),
        config=config,
    )


def run(settings: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """The measurements for `settings` (the flags by name: workdir, files, batch, ...).

    `info` is `common.machine_info()`, recorded with them.
    """
    from vertjax import predict

    settings = dict(settings)
    results: dict[str, Any] = {"machine": dict(info), "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = max(settings["files"], settings["batch"]) + 6
        files = write_radiographs(
            tmp / "in",
            count,
            width=settings["width"],
            height=settings["height"],
            fmt=settings["format"],
        )
        start = time.perf_counter()
        if settings["workdir"]:
            model = inference.load(workdir=settings["workdir"], checkpoint="best")
        else:
            model = random_model(settings["config"])
        results["model_load_s"] = time.perf_counter() - start

        def timed(batch_files, out, *, batch_size, overlays, model=model):
            start = time.perf_counter()
            outcome = predict.predict_files(
                model,
                batch_files,
                tmp / out,
                batch_size=batch_size,
                overlays=overlays,
                progress=False,
            )
            elapsed = time.perf_counter() - start
            if outcome.failures or len(outcome.written) != len(batch_files):
                raise RuntimeError(f"prediction failed: {outcome.failures}")
            return elapsed

        results["cold_s"] = timed(files[:1], "cold", batch_size=1, overlays=True)
        warm_json, warm_overlay = [], []
        for i in range(1, 6):
            warm_json.append(timed(files[i : i + 1], f"w{i}", batch_size=1, overlays=False))
            warm_overlay.append(timed(files[i : i + 1], f"o{i}", batch_size=1, overlays=True))
        results["warm_json_s"] = statistics.median(warm_json)
        results["warm_json_overlay_s"] = statistics.median(warm_overlay)

        many = files[6 : 6 + settings["files"]]
        # Compile the throughput batch size first, so throughput is steady state.
        timed(many[: settings["batch"]], "compile", batch_size=settings["batch"], overlays=False)
        for overlays in (False, True):
            elapsed = timed(
                many, f"many_{overlays}", batch_size=settings["batch"], overlays=overlays
            )
            key = "throughput_overlay" if overlays else "throughput_json"
            results[key] = {"images_per_s": len(many) / elapsed, "seconds": elapsed}
        if settings["exported"]:
            results["exported"] = _exported_timings(model, files, tmp, settings, timed)
    return results


def _exported_timings(model, files, tmp: Path, settings, timed) -> dict[str, Any]:
    """Export `model`, load the file, then cold, warm and throughput as above."""
    from vertjax import export, exported

    path = tmp / "model.vjx"
    start = time.perf_counter()
    export.export_model(model, path)
    out: dict[str, Any] = {"export_s": time.perf_counter() - start}
    start = time.perf_counter()
    loaded = inference.ExportedPredictor(exported.load(path))
    out["load_s"] = time.perf_counter() - start
    out["file_mb"] = path.stat().st_size / 1e6
    out["cold_s"] = timed(files[:1], "x_cold", batch_size=1, overlays=True, model=loaded)
    warm = [
        timed(files[i : i + 1], f"x_w{i}", batch_size=1, overlays=False, model=loaded)
        for i in range(1, 6)
    ]
    out["warm_json_s"] = statistics.median(warm)
    many = files[6 : 6 + settings["files"]]
    elapsed = timed(many, "x_many", batch_size=settings["batch"], overlays=False, model=loaded)
    out["throughput_json"] = {"images_per_s": len(many) / elapsed, "seconds": elapsed}
    return out


def table(results: dict[str, Any]) -> str:
    """The measurements of `run` as a plain-text table."""
    s = results["settings"]
    size = f"{s['width']}x{s['height']} {s['format']}"
    rows = [
        [
            "model: restore best checkpoint"
            if s["workdir"]
            else "model: random weights (no restore)",
            results["model_load_s"],
            "s",
        ],
        [f"cold: 1 file -> JSON + overlay, incl. compile ({size})", results["cold_s"], "s"],
        [f"warm: 1 file -> JSON ({size})", results["warm_json_s"], "s"],
        [f"warm: 1 file -> JSON + overlay ({size})", results["warm_json_overlay_s"], "s"],
        [
            f"throughput: {s['files']} files, batch {s['batch']}, JSON only",
            results["throughput_json"]["images_per_s"],
            "images/s",
        ],
        [
            f"throughput: {s['files']} files, batch {s['batch']}, JSON + overlay",
            results["throughput_overlay"]["images_per_s"],
            "images/s",
        ],
    ]
    x = results.get("exported")
    if x:
        rows += [
            ["exported: export to one file (cpu, cuda, tpu)", x["export_s"], "s"],
            ["exported: load the file", x["load_s"], "s"],
            [f"exported: cold: 1 file -> JSON + overlay, incl. compile ({size})", x["cold_s"], "s"],
            [f"exported: warm: 1 file -> JSON ({size})", x["warm_json_s"], "s"],
            [
                f"exported: throughput: {s['files']} files, one call each, JSON only",
                x["throughput_json"]["images_per_s"],
                "images/s",
            ],
        ]
    return common.format_table(["measurement", "value", "unit"], rows)


def define_flags() -> None:
    flags.DEFINE_string("workdir", "", "Training run to restore (best checkpoint).")
    flags.DEFINE_string("config", "configs/default.py", "Config for random weights.")
    flags.DEFINE_integer("files", 64, "Files for the throughput run.", lower_bound=1)
    common.define_batch_flag("Batch size for the throughput run.")
    flags.DEFINE_integer("width", 891, "Width of the generated radiographs (px).")
    flags.DEFINE_integer("height", 2375, "Height of the generated radiographs (px).")
    flags.DEFINE_enum("format", "png", ["png", "dcm"], "8-bit PNG or 16-bit DICOM files.")
    flags.DEFINE_bool("exported", True, "Also time the model exported to one file.")
    common.define_timing_flags()


def main(argv: Sequence[str]) -> None:
    info = common.start_timing(argv)
    results = run(common.flag_values(), info)
    print()
    print(table(results))
    if FLAGS.json:
        common.write_json(FLAGS.json, results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
