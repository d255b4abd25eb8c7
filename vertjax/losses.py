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
written for one layer and lifted with `jax.vmap`. The per-layer class is
derived from `labeled` once, as a [B, K] base weight, and broadcast.

Speed: the loss and its gradient are a `jax.custom_vjp` that XLA:CPU
compiles to two passes over the [B, H, W, K] arrays and no intermediate
array of that size; plain autodiff of the same expression stores the
difference, the weights and the weighted difference (10 passes for l2,
benchmarks/RESULTS.md). The function and its gradient are unchanged;
being a custom_vjp, it supports reverse-mode differentiation only.
- Value: one loop reads targets and predictions and reduces each pixel's K
  layers to a few per-pixel sums ([B, H, W]; for l3 also the all-layer
  maximum, which the weight needs); a vectorised reduction then sums those
  per example. A reduction over all of (H, W, K) in one go would either be
  one long float32 add chain (slow and less accurate) or, as a plain sum,
  go to XLA:CPU's YNNPACK path, which cannot fuse the weight selection and
  makes XLA store the weights first.
- Gradient: one elementwise loop reads targets and predictions (and l3's
  [B, H, W] maximum from the value pass) and writes 2 w (p - y) / (H W K)
  times the incoming cotangent, recomputing the weights on the fly.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
    base = _base_weight(jnp.asarray(labeled).astype(bool), name=name)
    return _weighted_mse(
        jnp.asarray(predictions).astype(jnp.float32),
        jnp.asarray(targets).astype(jnp.float32),
        base,
        name,
    )


def _sum_pair(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return a[0] + b[0], a[1] + b[1]


def _max_sum_sum(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return jnp.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2]


def _value_and_peak(
    predictions: jax.Array, targets: jax.Array, base: jax.Array, name: str
) -> tuple[jax.Array, jax.Array | None]:
    """Per-example loss [B] and, for l3, the all-layer maximum [B, H, W] of the targets."""
    count = np.prod(targets.shape[1:])
    error = targets - predictions
    squares = error * error
    zero = np.float32(0.0)
    based = base[:, None, None, :] * squares
    if name == "l3":
        # Per pixel: the all-layer maximum, sum_k se and sum_k base_k * se;
        # rule 1 then picks 10 * sum_k se for the whole pixel.
        peak, plain, weighted = jax.lax.reduce(
            (targets, squares, based), (np.float32(-np.inf), zero, zero), _max_sum_sum, (3,)
        )
        per_pixel = jnp.where(peak >= HOT_THRESHOLD, HOT_WEIGHT * plain, weighted)
        return jnp.sum(per_pixel, axis=(1, 2)) / count, peak
    hot = targets >= HOT_THRESHOLD
    cold_sum, hot_sum = jax.lax.reduce(
        (jnp.where(hot, zero, based), jnp.where(hot, squares, zero)), (zero, zero), _sum_pair, (3,)
    )
    # mse takes this path too, with weight 1 everywhere: its plain one-output
    # sum would go to YNNPACK, whose reduction is slower here (1.8 vs 1.6 ms
    # for the value pass at B = 8).
    hot_weight = 1.0 if name == "mse" else HOT_WEIGHT
    return jnp.sum(cold_sum + hot_weight * hot_sum, axis=(1, 2)) / count, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_mse(
    predictions: jax.Array, targets: jax.Array, base: jax.Array, name: str
) -> jax.Array:
    """sum(w * (y - p)^2) / (H * W * K): [B, H, W, K] x2, base [B, K] -> [B]."""
    return _value_and_peak(predictions, targets, base, name)[0]


def _weighted_mse_fwd(predictions, targets, base, name):
    value, peak = _value_and_peak(predictions, targets, base, name)
    return value, (predictions, targets, base, peak)


def _weighted_mse_bwd(name, residuals, cotangent):
    predictions, targets, base, peak = residuals
    # The barrier keeps XLA from sharing y - p with the value pass, which
    # would make it store the difference as a full array.
    predictions, targets = jax.lax.optimization_barrier((predictions, targets))
    if name == "mse":
        weight = jnp.float32(1.0)
    elif name == "l3":
        weight = _lifted_weight(peak >= HOT_THRESHOLD, base, shared=True)
    else:
        weight = _lifted_weight(targets >= HOT_THRESHOLD, base, shared=False)
    scale = (2.0 / np.prod(targets.shape[1:])) * cotangent[:, None, None, None]
    grad = scale * weight * (predictions - targets)
    # The weights are piecewise constant in y, so d/dy = -d/dp.
    return grad, -grad, None


_weighted_mse.defvjp(_weighted_mse_fwd, _weighted_mse_bwd)


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
