"""Inference: a trained network turns radiographs into named points.

`load` gives a `Predictor` for a shipped model or a training run
(`vertjax.runs` reads them); `Predictor.predict` takes radiographs of any
size and returns, per image, the 13 named centroids in its own pixels with
their confidence. Images are resized to the model's S x S input without
keeping the aspect ratio (as in training), so a model point (x, y) maps
back to (x * W / S, y * H / S). Batches have a fixed size (the last one
padded) and run through one jit-compiled function: one compilation per run.
Writing the results (JSON, CSV, overlays) is `vertjax.predict`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vertjax import exported, heatmaps, imaging, models, postprocess, provenance, runs, shipped


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained network ready to turn radiographs into named points.

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

    def provenance(self) -> dict[str, Any]:
        """Which model this is, for the outputs it makes (`vertjax.provenance`)."""
        return provenance.stamp(model=self.source, step=self.step, config=self.config)

    def points(self, images: Sequence[np.ndarray], *, batch_size: int) -> list[Points]:
        """`predict(self, images, batch_size=batch_size)`."""
        return predict(self, images, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class ExportedPredictor:
    """An exported model file (`vertjax.export`) behind the calls `predict` makes."""

    model: exported.ExportedModel

    @property
    def source(self) -> str:
        return f"exported {self.model.path}"

    @property
    def step(self) -> int | None:
        return self.model.metadata["provenance"].get("checkpoint_step")

    def provenance(self) -> dict[str, Any]:
        """The exported model's own provenance; `model` names the file too."""
        stamp = dict(self.model.metadata["provenance"])
        stamp["model"] = f"{stamp['model']} (exported {self.model.path})"
        return stamp

    def points(self, images: Sequence[np.ndarray], *, batch_size: int) -> list[Points]:
        """Each image through the exported function, one call per image.

        The function takes any size; JAX compiles it once per new size.
        """
        del batch_size  # the exported function takes one radiograph of its own size
        found = [self.model(pixels) for pixels in images]
        return [
            Points(xy=f.xy.astype(np.float64), confidence=f.confidence, present=f.present)
            for f in found
        ]


@functools.partial(jax.jit, static_argnames=("apply", "locate", "mean", "std", "flip"))
def _infer(variables, images, *, apply, locate, mean, std, flip):
    # The same normalisation as training (input_pipeline.Preprocess).
    x = (images.astype(jnp.float32)[..., None] - mean) / std
    return locate(models.heatmaps_of(apply, variables, x, flip=flip))


def make_infer(model: Predictor) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    """The jit-compiled batch function: uint8 images [B, S, S] -> (points, confidence).

    Points are [B, K, 2] in model pixels, confidence [B, K]. The variables
    are an argument, not a constant, so compilation does not embed (and
    copy) the weights. The compilation is cached on the model's functions
    and statistics: every call with the same B, through this or a later
    `make_infer` of the same Predictor, reuses one executable.
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


def from_trained(trained: runs.Trained) -> Predictor:
    """The predictor of a trained network: its decoding, mirror averaging and threshold."""
    config = trained.config
    locate = functools.partial(
        postprocess.locate, prior=trained.prior, **postprocess.settings(config)
    )
    return Predictor(
        apply=functools.partial(models.from_config(config).apply, train=False),
        # On the device once: each batch's `make_infer` then copies nothing.
        variables=jax.device_put({"params": trained.params}),
        image_size=int(config.image_size),
        pixel_mean=trained.pixel_mean,
        pixel_std=trained.pixel_std,
        presence_threshold=float(config.presence_threshold),
        locate=locate,
        step=trained.step,
        config=config,
        flip=bool(config.get("test_time_flip", False)),
        source=trained.source,
        prior=trained.prior,
    )


def load(
    model: str | os.PathLike | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    checkpoint: str | int = "best",
) -> Predictor:
    """The predictor of a training run (`workdir`, `checkpoint`) or of a shipped
    model (`model`: a name or a model folder; default `shipped.DEFAULT_MODEL`).

    Raises:
      ValueError: both given; or the run or model cannot be read (the
        message says why).
    """
    if workdir and model:
        raise ValueError("give a training run (workdir) or a shipped model, not both")
    if workdir:
        return from_trained(runs.load_run(workdir, checkpoint))
    return from_trained(runs.load_shipped(model or shipped.DEFAULT_MODEL))


@dataclasses.dataclass(frozen=True)
class Points:
    """The named centroids of one radiograph, in its own pixels.

    Attributes:
      xy: [K, 2] (x, y), x right and y down from the top-left pixel's corner.
      confidence: [K] heatmap peaks.
      present: [K] bool, confidence >= the model's presence threshold.
    """

    xy: np.ndarray
    confidence: np.ndarray
    present: np.ndarray


def predict(
    model: Predictor, images: Sequence[np.ndarray], *, batch_size: int | None = None
) -> list[Points]:
    """The named points of each radiograph (float [H, W] in [0, 1], any size).

    Args:
      model: the predictor.
      images: the radiographs.
      batch_size: network batch (default len(images)); a shorter list is
        padded, so a run that keeps one batch size compiles once.
    """
    batch_size = batch_size or len(images)
    if len(images) > batch_size:
        raise ValueError(f"{len(images)} images do not fit a batch of {batch_size}")
    size = model.image_size
    batch = np.zeros((batch_size, size, size), np.uint8)
    for slot, pixels in enumerate(images):
        batch[slot] = imaging.to_model_input(pixels, size)
    points, confidence = jax.device_get(make_infer(model)(batch))
    out = []
    for slot, pixels in enumerate(images):
        height, width = np.shape(pixels)
        out.append(
            Points(
                xy=to_original(points[slot], width=width, height=height, size=size),
                confidence=np.asarray(confidence[slot]),
                present=np.asarray(confidence[slot] >= model.presence_threshold),
            )
        )
    return out


def predict_records(
    model: Predictor, records: Sequence[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """(points [N, K, 2] in model pixels, confidence [N, K]) of dataset records' S x S images."""
    size = model.image_size
    images = np.stack([np.asarray(r["image"]).reshape(size, size) for r in records])
    points, confidence = make_infer(model)(images)
    return np.asarray(points), np.asarray(confidence)


def to_original(points: np.ndarray, *, width: int, height: int, size: int) -> np.ndarray:
    """Model pixels (x, y) [..., 2] of an S x S input -> original pixels of a W x H image.

    Both grids share the corner origin and cover the whole image, so the map
    is a pure scale: x * W / S, y * H / S.
    """
    points = np.asarray(points, np.float64)
    return points * np.array([width / size, height / size])
