"""Gaussian heatmap targets and their decoding back to sub-pixel centroids.

Both directions are written for ONE heatmap layer and lifted with `jax.vmap`
over the vertebrae (K) and the batch (B). Coordinates are continuous model
pixels (x, y) with pixel (i, j) centred at (j + 0.5, i + 0.5).
"""

import functools

import jax
import jax.numpy as jnp


def _render_layer(
    centroid: jax.Array, labeled: jax.Array, *, height: int, width: int, sigma: float
) -> jax.Array:
    """One layer [H, W]: a peak-1 Gaussian at `centroid` (x, y), zeros when unlabelled."""
    # Separable: the outer product of two 1-D Gaussians costs H + W exponentials
    # instead of H * W, which matters because targets are rendered every step.
    xs = jnp.arange(width, dtype=jnp.float32) + 0.5
    ys = jnp.arange(height, dtype=jnp.float32) + 0.5
    scale = -0.5 / (sigma * sigma)
    gx = jnp.exp(scale * jnp.square(xs - centroid[0]))
    gy = jnp.exp(scale * jnp.square(ys - centroid[1]))
    gy = jnp.where(labeled, gy, 0.0)
    return gy[:, None] * gx[None, :]


def render(
    centroids: jax.Array, labeled: jax.Array, *, height: int, width: int, sigma: float
) -> jax.Array:
    """Renders target heatmaps.

    Args:
      centroids: [B, K, 2] float, (x, y) in model pixels.
      labeled: [B, K] bool; an unlabelled layer is all zeros.
      height, width: heatmap size H, W in pixels.
      sigma: Gaussian standard deviation in model pixels (may be traced, e.g.
        a schedule).

    Returns:
      [B, H, W, K] float32 with peak 1.0 at each labelled centroid.
    """
    if centroids.ndim != 3 or centroids.shape[-1] != 2 or labeled.shape != centroids.shape[:2]:
        raise ValueError(
            f"centroids {centroids.shape} must be [B, K, 2] and labeled {labeled.shape} [B, K]"
        )
    layer = functools.partial(_render_layer, height=height, width=width, sigma=sigma)
    per_example = jax.vmap(layer, in_axes=(0, 0), out_axes=2)
    return jax.vmap(per_example)(centroids.astype(jnp.float32), labeled.astype(bool))


def _vertex_offset(left: jax.Array, centre: jax.Array, right: jax.Array) -> jax.Array:
    """Sub-pixel offset in [-0.5, 0.5] of the parabola through three log-values."""
    curvature = left - 2.0 * centre + right
    # A maximum needs negative curvature; flat or convex neighbourhoods (plateaus,
    # all-zero layers) keep the integer position instead of dividing by ~0.
    safe = jnp.where(curvature < 0.0, curvature, -1.0)
    offset = jnp.where(curvature < 0.0, 0.5 * (left - right) / safe, 0.0)
    return jnp.clip(offset, -0.5, 0.5)


def subpixel(layer: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
    """Refines an integer peak (row, col) of one layer [H, W] to a point (x, y).

    The fit is a parabola through the logarithm of the peak and its two
    neighbours along each axis, which is exact for a Gaussian (the log of a
    Gaussian is a parabola), as in DARK (Zhang et al., CVPR 2020). Values are
    floored at a tiny fraction of the peak so that noisy or negative
    neighbours stay finite. Peaks on the border keep the integer position
    along that axis.
    """
    height, width = layer.shape
    peak = layer[row, col]
    floor = jnp.maximum(peak, 0.0) * 1e-6 + 1e-30

    def log_at(r, c):
        return jnp.log(jnp.maximum(layer[r, c], floor))

    up, down = jnp.maximum(row - 1, 0), jnp.minimum(row + 1, height - 1)
    left, right = jnp.maximum(col - 1, 0), jnp.minimum(col + 1, width - 1)
    centre = log_at(row, col)
    dx = _vertex_offset(log_at(row, left), centre, log_at(row, right))
    dy = _vertex_offset(log_at(up, col), centre, log_at(down, col))
    positive = peak > 0.0
    dx = jnp.where(positive & (col > 0) & (col < width - 1), dx, 0.0)
    dy = jnp.where(positive & (row > 0) & (row < height - 1), dy, 0.0)
    return jnp.stack([col + 0.5 + dx, row + 0.5 + dy]).astype(jnp.float32)


def decode_layer(layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer [H, W] -> (point (x, y) [2], peak value [])."""
    width = layer.shape[1]
    flat = jnp.argmax(layer)
    row, col = flat // width, flat % width
    return subpixel(layer, row, col), layer[row, col]


def decode(heatmaps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decodes each layer to its sub-pixel peak.

    Args:
      heatmaps: [B, H, W, K] float.

    Returns:
      points: [B, K, 2] float32 (x, y) in model pixels; an all-zero layer
        decodes to the centre of pixel (0, 0), always finite.
      confidence: [B, K] float32, the peak value (0 for an all-zero layer).
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps {heatmaps.shape} must be [B, H, W, K]")
    heatmaps = heatmaps.astype(jnp.float32)
    per_example = jax.vmap(decode_layer, in_axes=2)
    return jax.vmap(per_example)(heatmaps)
