"""Export a trained model as one self-contained file (`vertjax export`).

`export_model(predictor, path)` traces the whole prediction for one
radiograph, float32 [H, W] in [0, 1] with H and W symbolic, so that one file
serves every image size:
resizing to the model's uint8 input (`vertjax.resample`, in integers, so
bit for bit as `predict` does), normalisation with the
training statistics, the network (with mirror averaging where the run uses
it), decoding with its post-processing, and the map back to the image's own
pixels. The weights are constants inside. `jax.export` serialises it as
StableHLO for cpu, cuda and tpu; `vertjax.exported.load` runs it with JAX and
NumPy alone and documents the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from vertjax import exported, files, imaging, inference, models, resample, vertebrae

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")


def _prediction(
    pixels: jax.Array, *, predictor: inference.Predictor
) -> tuple[jax.Array, jax.Array]:
    """One radiograph float32 [H, W] -> (xy [K, 2] in its pixels, confidence [K])."""
    size = predictor.image_size
    height, width = pixels.shape
    matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.int32)
    stored = resample.resize(jnp, pixels.astype(jnp.float32), size, matmul=matmul)
    x = ((stored.astype(jnp.float32) - predictor.pixel_mean) / predictor.pixel_std)[
        None, :, :, None
    ]
    heatmaps = models.heatmaps_of(predictor.apply, predictor.variables, x, flip=predictor.flip)
    points, confidence = predictor.locate(heatmaps)
    to_original = jnp.stack([jnp.asarray(width, jnp.float32), jnp.asarray(height, jnp.float32)])
    return points[0] * (to_original / size), confidence[0]


def metadata(
    predictor: inference.Predictor, function_blob: bytes, platforms: Sequence[str]
) -> dict:
    """What the file says about itself (see `vertjax.exported`)."""
    config = predictor.config
    return {
        "format": exported.FORMAT,
        "vertebrae": list(vertebrae.NAMES),
        "input": "one radiograph: float32 [H, W] in [0, 1], 0 black (air) to 1 white (bone), "
        f"H and W at least {imaging.MIN_SIDE}, as vertjax.imaging.read_radiograph gives it",
        "output": "xy float32 [13, 2]: (x, y) in the input's pixels, x right and y down from "
        "the top-left pixel's corner; confidence float32 [13]: heatmap peaks; a vertebra is "
        "present when its confidence >= presence_threshold",
        "presence_threshold": predictor.presence_threshold,
        "image_size": predictor.image_size,
        "platforms": list(platforms),
        "training_data": None if config is None else f"spine_radiographs/{config.dataset.name}",
        "provenance": predictor.provenance(),
        "function_sha256": hashlib.sha256(function_blob).hexdigest(),
    }


def export_model(
    predictor: inference.Predictor,
    path: str | os.PathLike,
    *,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
    """Writes `predictor` as one exported file, atomically; returns its metadata."""
    # Host arrays: traced as constants of the function, whatever device held them.
    on_host = dataclasses.replace(
        predictor, variables=jax.tree.map(np.asarray, jax.device_get(predictor.variables))
    )
    traced = jax.jit(functools.partial(_prediction, predictor=on_host))
    height, width = export.symbolic_shape("height, width")
    function = export.export(traced, platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((height, width), jnp.float32)
    )
    blob = bytes(function.serialize())
    info = metadata(predictor, blob, platforms)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(exported.METADATA_FILE, json.dumps(info, indent=2) + "\n")
        archive.writestr(exported.FUNCTION_FILE, blob)
    files.write_atomic(path, buffer.getvalue())
    return info
