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

The rules are stated once. A `Rule` per loss name says what differs between
the losses: whether rule 1 tests the layer or the all-layer maximum, whether
rules 2 and 3 apply, and rule 1's weight (1 for mse, where it then equals
the else weight). Three one-layer functions apply it: `_is_hot` (rule 1's
test), `_base_weight` (rules 2, 3 and else, from the layer's and its
neighbours' `labeled` flags) and `_layer_weight` (the [H, W] weights).

Two forms of each loss use these functions:
- `reference(name)` is the definition, written as the paper states it: the
  one-layer weight times the squared error, lifted with `jax.vmap` over
  layers and batch. `weights(name)` gives its weights.
- `get(name)`, what training uses, is the same function as a
  `jax.custom_vjp` that XLA:CPU compiles to two passes over the
  [B, H, W, K] arrays and no intermediate array of that size; plain
  autodiff of the reference stores the difference, the weights and the
  weighted difference (10 passes for l2, benchmarks/RESULTS.md). Being a
  custom_vjp, it supports reverse-mode differentiation only.
tests/test_losses.py checks that both forms agree in value and gradient,
and both against a pixel loop and weights built from the table above.

The two passes of `get`:
- Value: one loop reads targets and predictions and reduces each pixel's K
  layers to a few per-pixel sums ([B, H, W]): the hot and the cold pixels'
  squared errors apart (cold ones times their layer's base weight), or for
  l3 the all-layer maximum, the plain and the base-weighted sum; rule 1's
  weight then scales the hot part. A vectorised reduction sums those per
  example. A reduction over all of (H, W, K) in one go would either be one
  long float32 add chain (slow and less accurate) or, as a plain sum, go to
  XLA:CPU's YNNPACK path, which cannot fuse the weight selection and makes
  XLA store the weights first. mse takes the same two-output reduction:
  its one-output sum would go to YNNPACK, whose reduction is slower here
  (1.8 vs 1.6 ms for the value pass at B = 8).
- Gradient: one elementwise loop reads targets and predictions (and l3's
  [B, H, W] maximum from the value pass) and writes 2 w (p - y) / (H W K)
  times the incoming cotangent, with w from `_layer_weight` on the fly.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

HOT_THRESHOLD = 0.5
HOT_WEIGHT = 10.0
EMPTY_WEIGHT = 5.0  # rule 2: the layer and both neighbours unlabelled
BESIDE_WEIGHT = 0.0  # rule 3: unlabelled, but next to a labelled layer

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one loss makes of the table's rules."""

    hot_weight: float  # rule 1's weight; 1.0 (the else weight) for mse, which has no rule 1
    hot_over_all_layers: bool  # rule 1 tests max_k' y[i, k'] (l3), not y[i, k]
    neighbours: bool  # rules 2 and 3 apply


_RULES: dict[str, Rule] = {
    "mse": Rule(hot_weight=1.0, hot_over_all_layers=False, neighbours=False),
    "l1": Rule(hot_weight=HOT_WEIGHT, hot_over_all_layers=False, neighbours=False),
    "l2": Rule(hot_weight=HOT_WEIGHT, hot_over_all_layers=False, neighbours=True),
    "l3": Rule(hot_weight=HOT_WEIGHT, hot_over_all_layers=True, neighbours=True),
}
NAMES: tuple[str, ...] = tuple(_RULES)


def rule_for(name: str) -> Rule:
    """The `Rule` of a loss name; raises ValueError naming the valid ones."""
    if name not in _RULES:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(NAMES)}")
    return _RULES[name]


def _is_hot(values: jax.Array) -> jax.Array:
    """Rule 1's test, elementwise."""
    return values >= HOT_THRESHOLD


def _base_weight(rule: Rule, here: jax.Array, before: jax.Array, after: jax.Array) -> jax.Array:
    """Weight of a layer's non-hot pixels (rules 2, 3, else) from its and its neighbours' flags."""
    if not rule.neighbours:
        return jnp.float32(1.0)
    return jnp.where(here, 1.0, jnp.where(before | after, BESIDE_WEIGHT, EMPTY_WEIGHT))


def _layer_weight(
    rule: Rule, layer: jax.Array, peak: jax.Array | None, base: jax.Array
) -> jax.Array:
    """Weights [H, W] of one layer: its targets [H, W], the all-layer maximum [H, W], base []."""
    tested = peak if rule.hot_over_all_layers else layer
    return jnp.where(_is_hot(tested), rule.hot_weight, base)


def _base_weights(rule: Rule, labeled: jax.Array) -> jax.Array:
    """`_base_weight` of each layer of one example: labeled [K] bool -> [K]."""
    padded = jnp.pad(labeled, 1)  # layers outside 0..K-1 are unlabelled
    return jax.vmap(functools.partial(_base_weight, rule))(labeled, padded[:-2], padded[2:])


def _layer_weights(
    rule: Rule, targets: jax.Array, peak: jax.Array | None, base: jax.Array
) -> jax.Array:
    """`_layer_weight` of each layer of one example: [H, W, K], [H, W], [K] -> [H, W, K]."""
    per_layer = functools.partial(_layer_weight, rule)
    return jax.vmap(per_layer, in_axes=(2, None, 0), out_axes=2)(targets, peak, base)


def _example_weights(rule: Rule, targets: jax.Array, labeled: jax.Array) -> jax.Array:
    """Weights [H, W, K] of one example from its targets [H, W, K] and labeled [K]."""
    peak = jnp.max(targets, axis=-1)
    return _layer_weights(rule, targets, peak, _base_weights(rule, labeled))


def _example_loss(
    rule: Rule, predictions: jax.Array, targets: jax.Array, labeled: jax.Array
) -> jax.Array:
    """The loss of one example: mean over (H, W, K) of w * (y - p)^2."""
    weight = _example_weights(rule, targets, labeled)
    return jnp.sum(weight * (targets - predictions) ** 2) / targets.size


def checked(
    predictions: jax.Array, targets: jax.Array, labeled: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The inputs as float32, float32, bool, after checking their shapes."""
    if predictions.shape != targets.shape or predictions.ndim != 4:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must both be [B, H, W, K]"
        )
    if labeled.shape != targets.shape[:1] + targets.shape[3:]:
        raise ValueError(f"labeled {labeled.shape} must be [B, K] for targets {targets.shape}")
    return (
        jnp.asarray(predictions).astype(jnp.float32),
        jnp.asarray(targets).astype(jnp.float32),
        jnp.asarray(labeled).astype(bool),
    )


def _reference_loss(
    *, predictions: jax.Array, targets: jax.Array, labeled: jax.Array, rule: Rule
) -> jax.Array:
    return jax.vmap(functools.partial(_example_loss, rule))(*checked(predictions, targets, labeled))


def reference(name: str) -> LossFn:
    """The definition of a loss: `fn(*, predictions, targets, labeled) -> [B]`.

    predictions and targets are [B, H, W, K] float, labeled is [B, K] bool;
    the result is the per-example loss [B] float32. Same values as `get`,
    but plain autodiff: slower, for tests and reading.
    """
    return functools.partial(_reference_loss, rule=rule_for(name))


def weights(name: str, *, targets: jax.Array, labeled: jax.Array) -> jax.Array:
    """Per-pixel weights of a loss.

    Args:
      name: one of NAMES.
      targets: [B, H, W, K] float target heatmaps.
      labeled: [B, K] bool.

    Returns:
      [B, H, W, K] float32 weights.
    """
    _, targets, labeled = checked(targets, targets, labeled)
    return jax.vmap(functools.partial(_example_weights, rule_for(name)))(targets, labeled)


def base_weights(rule: Rule, labeled: jax.Array) -> jax.Array:
    """The weight of each layer's non-hot pixels (rules 2, 3, else): labeled [B, K] -> [B, K]."""
    return jnp.broadcast_to(
        jax.vmap(functools.partial(_base_weights, rule))(labeled), labeled.shape
    ).astype(jnp.float32)


def _loss(
    *, predictions: jax.Array, targets: jax.Array, labeled: jax.Array, rule: Rule
) -> jax.Array:
    predictions, targets, labeled = checked(predictions, targets, labeled)
    return _weighted_mse(predictions, targets, base_weights(rule, labeled), rule)


def _sum_pair(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return a[0] + b[0], a[1] + b[1]


def _max_sum_sum(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return jnp.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2]


def _value_and_peak(
    predictions: jax.Array, targets: jax.Array, base: jax.Array, rule: Rule
) -> tuple[jax.Array, jax.Array | None]:
    """Per-example loss [B] and, for l3, the all-layer maximum [B, H, W] of the targets."""
    count = np.prod(targets.shape[1:])
    error = targets - predictions
    squares = error * error
    zero = np.float32(0.0)
    based = base[:, None, None, :] * squares
    if rule.hot_over_all_layers:
        # Per pixel: the all-layer maximum, sum_k se and sum_k base_k * se;
        # a hot pixel weighs rule 1's weight in every layer.
        peak, plain, weighted = jax.lax.reduce(
            (targets, squares, based), (np.float32(-np.inf), zero, zero), _max_sum_sum, (3,)
        )
        per_pixel = jnp.where(_is_hot(peak), rule.hot_weight * plain, weighted)
        return jnp.sum(per_pixel, axis=(1, 2)) / count, peak
    hot = _is_hot(targets)
    cold_sum, hot_sum = jax.lax.reduce(
        (jnp.where(hot, zero, based), jnp.where(hot, squares, zero)), (zero, zero), _sum_pair, (3,)
    )
    return jnp.sum(cold_sum + rule.hot_weight * hot_sum, axis=(1, 2)) / count, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_mse(
    predictions: jax.Array, targets: jax.Array, base: jax.Array, rule: Rule
) -> jax.Array:
    """sum(w * (y - p)^2) / (H * W * K): [B, H, W, K] x2, base [B, K] -> [B]."""
    return _value_and_peak(predictions, targets, base, rule)[0]


def _weighted_mse_fwd(predictions, targets, base, rule):
    value, peak = _value_and_peak(predictions, targets, base, rule)
    return value, (predictions, targets, base, peak)


def _weighted_mse_bwd(rule, residuals, cotangent):
    predictions, targets, base, peak = residuals
    # The barrier keeps XLA from sharing y - p with the value pass, which
    # would make it store the difference as a full array.
    predictions, targets = jax.lax.optimization_barrier((predictions, targets))
    weight = jax.vmap(functools.partial(_layer_weights, rule))(targets, peak, base)
    scale = (2.0 / np.prod(targets.shape[1:])) * cotangent[:, None, None, None]
    grad = scale * weight * (predictions - targets)
    # The weights are piecewise constant in y, so d/dy = -d/dp.
    return grad, -grad, None


_weighted_mse.defvjp(_weighted_mse_fwd, _weighted_mse_bwd)


def get(name: str) -> LossFn:
    """Returns the fast `fn(*, predictions, targets, labeled) -> [B]` of a loss name.

    predictions and targets are [B, H, W, K] float, labeled is [B, K] bool;
    the result is the per-example loss [B] float32, equal to
    `reference(name)`'s.
    """
    return functools.partial(_loss, rule=rule_for(name))


def mean(per_example: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Batch mean of a per-example loss [B]; `mask` [B] bool drops padded entries.

    With a mask the mean runs over the unmasked entries only (0 when none).
    """
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
