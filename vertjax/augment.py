"""On-device augmentation of a training batch: similarity transform and intensity.

Each example gets its own random rotation, zoom, shift and, optionally, a
left-right mirror with probability 1/2 (the image is
resampled bilinearly through the inverse map, the centroids moved by the
forward map; a centroid moved out of the image is no longer labelled) and
its own gamma, contrast and brightness change. It runs inside the jitted
train step, vmapped over the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation ranges; plain values so that it can be bound with partial."""

    rotate_degrees: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    gamma: float = 0.0
    flip: bool = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Augment | None:
        a = config.augment
        if not a.enabled:
            return None
        return cls(
            rotate_degrees=float(a.rotate_degrees),
            scale=float(a.scale),
            shift=float(a.shift),
            contrast=float(a.contrast),
            brightness=float(a.brightness),
            gamma=float(a.gamma),
            flip=bool(a.get("flip", False)),
        )


def _augment_one(
    rng: jax.Array, image: jax.Array, points: jax.Array, labeled: jax.Array, *, aug: Augment
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One example: image [S, S, 1], points [K, 2] model px, labeled [K]."""
    size = image.shape[0]
    # One draw for all seven factors: each separate threefry call costs XLA
    # seconds of compile time on CPU.
    # Without the mirror the stream stays that of the seven factors.
    u = jax.random.uniform(rng, (8 if aug.flip else 7,), minval=-1.0, maxval=1.0)
    angle = jnp.deg2rad(u[0] * aug.rotate_degrees)
    zoom = 1.0 + u[1] * aug.scale
    shift = u[2:4] * aug.shift * size
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    linear = jnp.array([[cos, -sin], [sin, cos]])  # M = R, or R F with F a mirror in x
    if aug.flip:
        linear = linear * jnp.array([jnp.where(u[7] < 0, -1.0, 1.0), 1.0])
    centre = jnp.array([size / 2.0, size / 2.0])

    # Forward map of points: p' = zoom * M (p - c) + c + shift. Pixels are
    # resampled through the inverse map at each output pixel centre (M is
    # orthogonal, so its inverse is its transpose).
    moved = (points - centre) @ linear.T * zoom + centre + shift
    coords = jnp.arange(size, dtype=jnp.float32) + 0.5
    grid = jnp.stack(jnp.meshgrid(coords, coords, indexing="xy"), axis=-1)  # [S, S, (x, y)]
    source = (grid - centre - shift) @ linear / zoom + centre
    # Outside the source image reads as its darkest value: sample the image
    # minus its minimum with zero padding (map_coordinates' cval is static).
    fill = jnp.min(image)
    warped = fill + jax.scipy.ndimage.map_coordinates(
        image[..., 0] - fill,
        [source[..., 1] - 0.5, source[..., 0] - 0.5],
        order=1,
        mode="constant",
        cval=0.0,
    )

    # Gamma on the image's own [min, max] range, then gain and offset.
    lo, hi = jnp.min(warped), jnp.max(warped)
    span = jnp.maximum(hi - lo, 1e-6)
    log_gamma = u[4] * math.log1p(aug.gamma)
    unit = jnp.clip((warped - lo) / span, 0.0, 1.0) ** jnp.exp(log_gamma)
    gain = 1.0 + u[5] * aug.contrast
    offset = u[6] * aug.brightness
    out = (lo + unit * span) * gain + offset

    inside = jnp.all((moved >= 0.0) & (moved < size), axis=-1)
    return out[..., None], moved, labeled & inside


def augment(
    rng: jax.Array, images: jax.Array, points: jax.Array, labeled: jax.Array, aug: Augment
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random similarity transform + intensity changes, per example.

    Args:
      rng: PRNG key for the batch.
      images: [B, S, S, 1] float32, normalised.
      points: [B, K, 2] centroids in model pixels.
      labeled: [B, K] bool.
      aug: ranges.

    Returns:
      (images [B, S, S, 1], points [B, K, 2], labeled [B, K]); a centroid moved
      out of the image is no longer labelled.
    """
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(functools.partial(_augment_one, aug=aug))(keys, images, points, labeled)
