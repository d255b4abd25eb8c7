"""Predict benchmark: one radiograph file to its JSON (cold and warm), and throughput.

    python -m benchmarks.predict [--workdir RUN | --config configs/default.py]
        [--files 64] [--batch 8] [--width 891] [--height 2375] [--format png]
        [--json FILE]

Measures `vertjax.predict.predict_files`, the library behind
`python -m vertjax.predict`, end to end: read and decode the file, resize,
normalise, the jit-compiled U-Net and decoder, map to original pixels,
write the JSON (and the overlay PNG, timed with and without):

  cold        the first file of a fresh model: includes jit compilation
  warm        one file with the compiled network (median over files)
  throughput  `--files` files in batches of `--batch` (compiled beforehand)

Inputs are generated radiograph-sized images (default 891 x 2375, the
median AASCE size: noise over a smooth gradient, written as 8-bit PNG or
16-bit DICOM). Timings do not depend on the weights, so without
`--workdir` the model is the configured U-Net with random weights; the
time to restore a run's checkpoint is reported when `--workdir` is given.
Process start-up and imports (a few seconds for JAX) are not included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common


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
    """A `predict.Model` of the configured U-Net with random weights."""
    import functools
    import importlib.util

    import jax
    import jax.numpy as jnp

    from vertjax import models, predict

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
    return predict.Model(
        apply=functools.partial(net.apply, train=False),
        variables=variables,
        image_size=int(s),
        pixel_mean=128.0,
        pixel_std=64.0,
        presence_threshold=float(config.presence_threshold),
        config=config,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vertjax import predict

    results: dict[str, Any] = {"machine": common.machine_info(), "settings": vars(args).copy()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = max(args.files, args.batch) + 6
        files = write_radiographs(
            tmp / "in", count, width=args.width, height=args.height, fmt=args.format
        )
        start = time.perf_counter()
        if args.workdir:
            model = predict.load_model(args.workdir, "best")
        else:
            model = random_model(args.config)
        results["model_load_s"] = time.perf_counter() - start

        def timed(batch_files, out, *, batch_size, overlays):
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

        many = files[6 : 6 + args.files]
        # Compile the throughput batch size first, so throughput is steady state.
        timed(many[: args.batch], "compile", batch_size=args.batch, overlays=False)
        for overlays in (False, True):
            elapsed = timed(many, f"many_{overlays}", batch_size=args.batch, overlays=overlays)
            key = "throughput_overlay" if overlays else "throughput_json"
            results[key] = {"images_per_s": len(many) / elapsed, "seconds": elapsed}
    return results


def table(results: dict[str, Any]) -> str:
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
    return (
        common.describe(results["machine"])
        + "\n\n"
        + common.format_table(["measurement", "value", "unit"], rows)
    )


def main() -> None:
    common.ensure_malloc_tuning()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="Training run to restore (best checkpoint).")
    parser.add_argument("--config", default="configs/default.py", help="Config for random weights.")
    parser.add_argument("--files", type=int, default=64, help="Files for the throughput run.")
    parser.add_argument("--batch", type=int, default=8, help="Batch size for the throughput run.")
    parser.add_argument("--width", type=int, default=891)
    parser.add_argument("--height", type=int, default=2375)
    parser.add_argument("--format", choices=("png", "dcm"), default="png")
    parser.add_argument("--json", default="", help="Also write the results here.")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="See benchmarks/common.py.")
    args = parser.parse_args()
    results = run(args)
    print(table(results))
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
