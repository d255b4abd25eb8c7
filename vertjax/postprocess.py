"""Anatomical clean-up of decoded heatmaps: one label per vertebra, in order.

The paper (Sec. 4) suggests post-processing for l3's double predictions (two
layers on one vertebra). This module picks, for every layer, one of its top-M
local maxima or nothing, maximising

    sum over picked layers of log(peak / min_confidence)
    + spacing_weight * sum over consecutive picked layers j < k of
      log N(|p_k - p_j|; mean_jk, sd_jk)    (unnormalised, 0 at the mean)

subject to anatomical order: p_k - p_j must point along the spine's mean
direction from vertebra j to k (downwards in an upright radiograph). The
spacing prior (mean and sd of the distance between consecutive vertebrae, per
pair, in model pixels) is fitted on the training labels; a pair j < k that
skips absent layers uses the summed means and variances of the pairs between.

Two layers on one vertebra are then unlikely (distance near 0, far below the
mean), and so are labels out of order. The exact optimum is found by dynamic
programming (Viterbi) over the layers with `lax.scan`. Its state is the last
picked (layer, candidate), so absent layers do not break the chain.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vertjax import heatmaps as heatmap_ops

_IMPOSSIBLE = -1e9  # finite, so that sums of impossible scores stay ordered


class SpacingPrior(NamedTuple):
    """Spacing between consecutive vertebrae k, k+1 in model pixels (a pytree).

    Attributes:
      mean: [K-1] mean centroid distance.
      std: [K-1] its standard deviation (floored).
      direction: [K-1, 2] mean unit vector (x, y) from vertebra k to k+1.
    """

    mean: np.ndarray
    std: np.ndarray
    direction: np.ndarray


def fit_prior(centroids: np.ndarray, labeled: np.ndarray, *, min_std: float = 1.0) -> SpacingPrior:
    """Fits the spacing prior on training labels (host, numpy).

    Args:
      centroids: [N, K, 2] labelled (x, y) in model pixels.
      labeled: [N, K] bool.
      min_std: floor on each standard deviation, in model pixels.

    Returns:
      A SpacingPrior. Pairs never labelled together take the average over
      the pairs that were.

    Raises:
      ValueError: bad shapes, non-finite labelled centroids, or no two
        consecutive vertebrae labelled on any image.
    """
    centroids = np.asarray(centroids, np.float64)
    labeled = np.asarray(labeled, bool)
    if centroids.ndim != 3 or centroids.shape[-1] != 2 or labeled.shape != centroids.shape[:2]:
        raise ValueError(
            f"centroids {centroids.shape} must be [N, K, 2] and labeled {labeled.shape} [N, K]"
        )
    bad = labeled & ~np.all(np.isfinite(centroids), axis=-1)
    if np.any(bad):
        row, layer = np.argwhere(bad)[0]
        raise ValueError(f"centroids[{row}, {layer}] is labelled but not finite")
    step = centroids[:, 1:] - centroids[:, :-1]  # [N, K-1, 2]
    pair = labeled[:, 1:] & labeled[:, :-1]
    if not np.any(pair):
        raise ValueError("no image has two consecutive vertebrae labelled: cannot fit spacing")
    count = pair.sum(axis=0)
    dist = np.linalg.norm(step, axis=-1)
    seen = count > 0
    safe = np.maximum(count, 1)
    mean = np.where(pair, dist, 0.0).sum(axis=0) / safe
    var = np.where(pair, (dist - mean) ** 2, 0.0).sum(axis=0) / safe
    unit = step / np.maximum(dist, 1e-9)[..., None]
    direction = np.where(pair[..., None], unit, 0.0).sum(axis=0)
    mean = np.where(seen, mean, mean[seen].mean())
    var = np.where(seen & (count > 1), var, var[seen].mean())
    direction = np.where(seen[:, None], direction, direction[seen].sum(axis=0))
    direction = direction / np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-9)
    std = np.maximum(np.sqrt(var), min_std)
    return SpacingPrior(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        direction=direction.astype(np.float32),
    )


def _candidates(layer: jax.Array, top_m: int, window: int) -> tuple[jax.Array, jax.Array]:
    """Top-M local maxima of one layer [H, W]: points [M, 2] (x, y) and values [M].

    A local maximum is a pixel equal to the max-pool of its window x window
    box. `lax.top_k` alone would return the 2-4 tied pixels of one peak that
    sits between pixel centres as separate candidates, so the maxima are taken
    greedily instead: each pick blanks its box before the next argmax.
    """
    height, width = layer.shape
    pooled = lax.reduce_window(layer, -jnp.inf, lax.max, (window, window), (1, 1), "SAME")
    peaks = jnp.where(layer >= pooled, layer, -jnp.inf)
    rows_all = jnp.arange(height)[:, None]
    cols_all = jnp.arange(width)[None, :]
    half = window // 2

    def pick(scores, _):
        flat = jnp.argmax(scores)
        row, col = flat // width, flat % width
        value = scores[row, col]
        near = (jnp.abs(rows_all - row) <= half) & (jnp.abs(cols_all - col) <= half)
        return jnp.where(near, -jnp.inf, scores), (row, col, value)

    _, (rows, cols, values) = lax.scan(pick, peaks, None, length=top_m)
    points = jax.vmap(heatmap_ops.subpixel, in_axes=(None, 0, 0))(layer, rows, cols)
    return points, values


def _span_tables(prior: SpacingPrior) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cumulative mean, variance and displacement [K(, 2)], so spans j..k are differences."""
    mean = jnp.asarray(prior.mean, jnp.float32)
    var = jnp.square(jnp.asarray(prior.std, jnp.float32))
    shift = mean[:, None] * jnp.asarray(prior.direction, jnp.float32)

    def cumulative(x):
        return jnp.concatenate([jnp.zeros_like(x[:1]), jnp.cumsum(x, axis=0)])

    return cumulative(mean), cumulative(var), cumulative(shift)


def _apply_one(
    layers: jax.Array,
    prior: SpacingPrior,
    *,
    top_m: int,
    min_confidence: float,
    window: int,
    spacing_weight: float,
) -> tuple[jax.Array, jax.Array]:
    """One example: layers [H, W, K] -> (points [K, 2], confidence [K])."""
    num_layers = layers.shape[-1]
    points, values = jax.vmap(_candidates, in_axes=(2, None, None))(layers, top_m, window)
    valid = values >= min_confidence  # [K, M]; -inf (no maximum left) is never valid
    score_of_peak = jnp.log(jnp.maximum(values, min_confidence) / min_confidence)
    reward = jnp.where(valid, score_of_peak, _IMPOSSIBLE)
    cum_mean, cum_var, cum_shift = _span_tables(prior)

    # States: 0 = nothing picked yet; 1 + k * M + c = layer k last picked, at candidate c.
    state_layer = jnp.concatenate([jnp.array([-1]), jnp.repeat(jnp.arange(num_layers), top_m)])
    state_point = jnp.concatenate([jnp.zeros((1, 2)), points.reshape(-1, 2)])
    from_layer = jnp.maximum(state_layer, 0)

    def step(score, k):
        mu = cum_mean[k] - cum_mean[from_layer]  # [S]
        var = cum_var[k] - cum_var[from_layer]
        heading = cum_shift[k] - cum_shift[from_layer]  # [S, 2]
        move = points[k][None, :, :] - state_point[:, None, :]  # [S, M, 2]
        dist = jnp.linalg.norm(move, axis=-1)
        log_prior = -0.5 * jnp.square(dist - mu[:, None]) / jnp.maximum(var, 1e-6)[:, None]
        in_order = jnp.sum(move * heading[:, None, :], axis=-1) > 0.0
        pair = jnp.where(in_order, spacing_weight * log_prior, _IMPOSSIBLE)
        pair = jnp.where((state_layer == -1)[:, None], 0.0, pair)
        pair = jnp.where((state_layer >= k)[:, None], _IMPOSSIBLE, pair)
        total = score[:, None] + pair  # [S, M]
        back = jnp.argmax(total, axis=0)
        best = jnp.max(total, axis=0) + reward[k]
        score = lax.dynamic_update_slice(score, best, (1 + k * top_m,))
        return score, back

    initial = jnp.full(state_layer.shape, _IMPOSSIBLE).at[0].set(0.0)
    score, back = lax.scan(step, initial, jnp.arange(num_layers))  # back [K, M]

    def trace(state, k):
        here = state_layer[state] == k
        pick = jnp.where(here, (state - 1) % top_m, -1)
        state = jnp.where(here, back[k, jnp.maximum(pick, 0)], state)
        return state, pick

    _, picks = lax.scan(trace, jnp.argmax(score), jnp.arange(num_layers), reverse=True)
    picked = picks >= 0
    index = jnp.maximum(picks, 0)[:, None]
    fallback, _ = jax.vmap(heatmap_ops.decode_layer, in_axes=2)(layers)
    chosen = jnp.take_along_axis(points, index[..., None], axis=1)[:, 0]
    out_points = jnp.where(picked[:, None], chosen, fallback)
    confidence = jnp.where(picked, jnp.take_along_axis(values, index, axis=1)[:, 0], 0.0)
    return out_points, confidence


def apply(
    heatmaps: jax.Array,
    prior: SpacingPrior,
    *,
    top_m: int = 4,
    min_confidence: float,
    window: int = 5,
    spacing_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Decodes heatmaps with one label per vertebra, in anatomical order.

    Args:
      heatmaps: [B, H, W, K] predicted heatmaps.
      prior: from `fit_prior` (K-1 pairs).
      top_m: candidates per layer (local maxima in a window x window box).
      min_confidence: candidates below this peak value are ignored; > 0.
      window: side of the local-maximum box in pixels (odd).
      spacing_weight: weight of the spacing log-prior against the peak scores.

    Returns:
      points: [B, K, 2] (x, y) model pixels; a layer left absent keeps its
        plain argmax point.
      confidence: [B, K] the picked peak value, 0 for layers left absent.
    """
    if min_confidence <= 0:
        raise ValueError(f"min_confidence must be > 0, got {min_confidence}")
    if window < 1 or window % 2 == 0 or top_m < 1:
        raise ValueError(f"window {window} must be odd and top_m {top_m} at least 1")
    if heatmaps.ndim != 4 or np.shape(prior.mean) != (heatmaps.shape[-1] - 1,):
        raise ValueError(
            f"heatmaps {heatmaps.shape} must be [B, H, W, K] with K - 1 = {np.shape(prior.mean)[0]} "
            "prior pairs"
        )
    one = functools.partial(
        _apply_one,
        top_m=top_m,
        min_confidence=min_confidence,
        window=window,
        spacing_weight=spacing_weight,
    )
    return jax.vmap(one, in_axes=(0, None))(heatmaps.astype(jnp.float32), prior)


def locate(
    heatmaps: jax.Array,
    prior: SpacingPrior | None,
    *,
    enabled: bool,
    top_m: int,
    min_confidence: float,
) -> tuple[jax.Array, jax.Array]:
    """(points [B, K, 2] model px, confidence [B, K]) of predicted heatmaps.

    With `enabled`, the anatomical-order decoding (`apply`, needing `prior`);
    otherwise each layer's own peak (`heatmaps.decode`). Evaluation and
    prediction both decode through here, with `settings(config)`.
    """
    if not enabled:
        return heatmap_ops.decode(heatmaps)
    return apply(heatmaps, prior, top_m=top_m, min_confidence=min_confidence)


def settings(config) -> dict[str, Any]:
    """The keyword arguments of `locate` from a run config's `postprocess` group."""
    p = config.postprocess
    return {
        "enabled": bool(p.enabled),
        "top_m": int(p.top_m),
        "min_confidence": float(p.min_confidence),
    }
