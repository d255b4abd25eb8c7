"""Run an exported vertjax model with JAX and NumPy alone.

    from vertjax import exported

    model = exported.load("aasce_fov.vjx")
    found = model(pixels)        # pixels: float32 [H, W] in [0, 1], any size
    found.xy, found.confidence, found.present, model.names

An exported model (`vertjax export`, `vertjax.export`) is one file: a zip
archive holding `function.stablehlo`, the whole prediction serialised by
`jax.export` (resizing, normalisation, the network, decoding and
post-processing, with the weights inside), and `metadata.json`, which
names the vertebrae, states the input and output contract, says which
model it is and holds the sha256 of the function. This module imports
nothing of vertjax's training code, flax or orbax, so that a deployment
needs only `jax` (with `flatbuffers`) and `numpy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any

import numpy as np

FORMAT = "vertjax-exported/1"
FUNCTION_FILE = "function.stablehlo"
METADATA_FILE = "metadata.json"
# Smaller images cannot hold 13 vertebrae (vertjax.imaging.MIN_SIDE).
MIN_SIDE = 32


class ExportedModelError(ValueError):
    """An exported model file that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Found:
    """The named points of one radiograph, in its own pixels.

    Attributes:
      xy: float32 [K, 2] (x, y), x right and y down from the top-left pixel's corner.
      confidence: float32 [K] heatmap peaks.
      present: bool [K], confidence >= the model's presence threshold.
    """

    xy: np.ndarray
    confidence: np.ndarray
    present: np.ndarray


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A loaded exported model: call it on a radiograph."""

    function: Any  # jax.export.Exported
    metadata: dict[str, Any]
    path: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.metadata["vertebrae"])

    @property
    def presence_threshold(self) -> float:
        return float(self.metadata["presence_threshold"])

    def __call__(self, pixels: np.ndarray) -> Found:
        """The named points of `pixels`, float [H, W] in [0, 1] (0 air, 1 bone)."""
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 2 or min(pixels.shape) < MIN_SIDE:
            raise ValueError(
                f"expected a grey radiograph [H, W] of at least {MIN_SIDE} px a side, "
                f"got shape {pixels.shape}"
            )
        xy, confidence = (np.asarray(a) for a in self.function.call(pixels))
        return Found(xy=xy, confidence=confidence, present=confidence >= self.presence_threshold)


def load(path: str | os.PathLike) -> ExportedModel:
    """Reads and checks an exported model file.

    Raises:
      ExportedModelError: not an exported vertjax model, damaged (checksum),
        or of a format this version cannot read.
    """
    from jax import export

    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(METADATA_FILE))
            blob = archive.read(FUNCTION_FILE)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise ExportedModelError(f"{path}: not a vertjax exported model ({e})") from None
    if metadata.get("format") != FORMAT:
        raise ExportedModelError(
            f"{path}: format {metadata.get('format')!r}, this loader reads {FORMAT!r}"
        )
    actual = hashlib.sha256(blob).hexdigest()
    if actual != metadata.get("function_sha256"):
        raise ExportedModelError(
            f"{path}: {FUNCTION_FILE} is damaged: sha256 {actual[:16]}..., "
            f"metadata says {str(metadata.get('function_sha256'))[:16]}..."
        )
    try:
        function = export.deserialize(bytearray(blob))
    except Exception as e:  # flatbuffers and jax raise many types
        raise ExportedModelError(f"{path}: cannot deserialise the function ({e})") from e
    return ExportedModel(function=function, metadata=metadata, path=path)
