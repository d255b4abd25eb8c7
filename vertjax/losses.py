"""The paper's four heatmap losses (Gartland et al. 2025, Appendix B).

Each loss is a weighted squared error, sum(w * (y - p)^2) / (H * W * K) per
example, with the per-pixel weight w of the first matching rule:

| loss | rule 1                        | rule 2                       | rule 3                                  | else |
|------|-------------------------------|------------------------------|-----------------------------------------|------|
| mse  | -                             | -                            | -                                       | 1    |
| l1   | 10 if y[i, k] >= 0.5          | -                            | -                                       | 1    |
| l2   | 10 if y[i, k] >= 0.5          | 5 if k, k-1, k+1 unlabelled  | 0 if k unlabelled, k-1 or k+1 labelled  | 1    |
| l3   | 10 if max_k' y[i, k'] >= 0.5  | as l2                        | as l2                                   | 1    |

Layers outside 0..K-1 (the neighbours of the first and last layer) count as
unlabelled; zero-weight pixels still count in the denominator.

The weight of one layer depends only on that layer's targets, a per-layer
class from the `labeled` flags and (l3) the all-layer maximum, so it is
written for one layer and lifted with `jax.vmap`. The weight is a lazy
elementwise expression of (y >= 0.5, the layer class, the l3 maximum), so
XLA is free to fuse it with the squared error and the sum; no weight array
is built in Python.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

NAMES: tuple[str, ...] = ("mse", "l1", "l2", "l3")

HOT_THRESHOLD = 0.5
HOT_WEIGHT = 10.0
EMPTY_WEIGHT = 5.0  # rule 2: the layer and both neighbours unlabelled
BESIDE_WEIGHT = 0.0  # rule 3: unlabelled, but next to a labelled layer

LossFn = Callable[..., jax.Array]


def _base_weight(labeled: jax.Array, *, name: str) -> jax.Array:
    """[B, K] weight of the non-hot pixels of each layer (rules 2, 3 and else)."""
    if name in ("mse", "l1"):
        return jnp.ones(labeled.shape, jnp.float32)
    pad = jnp.zeros(labeled.shape[:-1] + (1,), bool)
    padded = jnp.concatenate([pad, labeled, pad], axis=-1)
    beside = padded[..., :-2] | padded[..., 2:]
    return jnp.where(labeled, 1.0, jnp.where(beside, BESIDE_WEIGHT, EMPTY_WEIGHT))


def _layer_weight(hot: jax.Array, base: jax.Array) -> jax.Array:
    """Weight of one layer [H, W]: rule 1 where `hot`, else the layer's base weight."""
    return jnp.where(hot, HOT_WEIGHT, base)


def _hot(targets: jax.Array, *, name: str) -> tuple[jax.Array, bool]:
    """Rule-1 mask: [B, H, W, K], or [B, H, W] shared by all layers for l3."""
    if name == "l3":
        return jnp.max(targets, axis=-1) >= HOT_THRESHOLD, True
    return targets >= HOT_THRESHOLD, False


def _lifted_weight(hot: jax.Array, base: jax.Array, *, shared: bool) -> jax.Array:
    """Lifts `_layer_weight` over K and B: hot [B, H, W(, K)], base [B, K] -> [B, H, W, K]."""
    per_example = jax.vmap(_layer_weight, in_axes=(None if shared else 2, 0), out_axes=2)
    return jax.vmap(per_example)(hot, base)


def _weights(targets: jax.Array, labeled: jax.Array, *, name: str) -> jax.Array:
    """Weights [B, H, W, K] as a lazy expression (a scalar 1 for mse) for XLA to fuse."""
    if name == "mse":
        return jnp.float32(1.0)
    base = _base_weight(labeled.astype(bool), name=name)
    hot, shared = _hot(targets, name=name)
    return _lifted_weight(hot, base, shared=shared)


def weights(name: str, *, targets: jax.Array, labeled: jax.Array) -> jax.Array:
    """Per-pixel weights of a loss.

    Args:
      name: one of NAMES.
      targets: [B, H, W, K] float target heatmaps.
      labeled: [B, K] bool.

    Returns:
      [B, H, W, K] float32 weights.
    """
    _check(name)
    targets = targets.astype(jnp.float32)
    return jnp.broadcast_to(_weights(targets, labeled, name=name), targets.shape)


def _loss(
    *, predictions: jax.Array, targets: jax.Array, labeled: jax.Array, name: str
) -> jax.Array:
    """Per-example loss [B]: mean over (H, W, K) of w * (y - p)^2."""
    if predictions.shape != targets.shape or predictions.ndim != 4:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must both be [B, H, W, K]"
        )
    if labeled.shape != targets.shape[:1] + targets.shape[3:]:
        raise ValueError(f"labeled {labeled.shape} must be [B, K] for targets {targets.shape}")
    targets = targets.astype(jnp.float32)
    error = targets - predictions.astype(jnp.float32)
    weighted = _weights(targets, labeled, name=name) * jnp.square(error)
    # sum(w * se) / (H * W * K): zero-weight pixels stay in the denominator.
    return jnp.mean(weighted, axis=(1, 2, 3))


def get(name: str) -> LossFn:
    """Returns `fn(*, predictions, targets, labeled) -> [B]` for a loss name.

    predictions and targets are [B, H, W, K] float, labeled is [B, K] bool;
    the result is the per-example loss [B] float32.
    """
    _check(name)
    return functools.partial(_loss, name=name)


def _check(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(NAMES)}")


def mean(per_example: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Batch mean of a per-example loss [B]; `mask` [B] bool drops padded entries.

    With a mask the mean runs over the unmasked entries only (0 when none).
    """
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
