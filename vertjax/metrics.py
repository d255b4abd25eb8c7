"""Evaluation metrics for vertebra localisation and naming, as sums and counts.

`batch_sums` runs under `jax.jit` once per batch and returns only sums and
counts (global, and per vertebra [K]); the host adds them over batches
(`accumulate`) and `summarize` divides once. Errors are measured in original
pixels: model pixels / image_size * (width, height).

The paper's rule (Gartland et al. 2025, Sec. 2): a labelled vertebra is
correctly identified when its predicted point lies closer to its own ground
truth than half the mean distance between neighbouring labelled centroids of
that image ("the radius"); ID accuracy = correct / scored labelled vertebrae
(see below), RMSE over the correctly identified ones. Neighbours are
consecutive layers k, k+1 that are both labelled.

The VerSe-style identification rate (Sekuboyina et al. 2021) counts a
labelled vertebra as identified when its layer is present (confidence >=
threshold: a missing prediction is a miss, as in VerSe), its point lies
within the radius of its own ground truth, and that ground truth is the
closest labelled one to the point. The level-slip share counts the scored
vertebrae named one level off: not within the radius of their own centroid
but within it of a visible neighbour's (k - 1 or k + 1), labelled or not.
Errors in mm multiply original pixels by the (isotropic) pixel spacing,
over the images where it is known.

An image without such a pair (one labelled vertebra, or only non-adjacent
ones) has no radius of its own. By default its vertebrae are left out of the
identification metrics (ID accuracy, RMSE, id-rate, all-correct share) and
counted in `n_without_spacing`; they still count in the localisation error
and the presence metrics. Passing `fallback_spacing_px` (for instance the
dataset's mean neighbour distance in original pixels) scores them with that
spacing instead.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vertjax import vertebrae


def _neighbour_spacing(gt: jax.Array, labeled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean distance between consecutive labelled centroids of one image, and the pair count."""
    pair = labeled[:-1] & labeled[1:]
    step = jnp.linalg.norm(gt[1:] - gt[:-1], axis=-1)
    count = jnp.sum(pair)
    total = jnp.sum(jnp.where(pair, step, 0.0))
    return total / jnp.maximum(count, 1), count


def _check_shapes(bk: tuple[int, int], **fields: jax.Array) -> None:
    """ValueError naming the first field whose shape does not fit B, K = `bk`."""
    b, k = bk
    expected = {
        "points": (b, k, 2),
        "confidence": (b, k),
        "centroids": (b, k, 2),
        "truth_centroids": (b, k, 2),
        "truth_visible": (b, k),
        "original_size": (b, 2),
        "pixel_spacing_mm": (b, 2),
        "mask": (b,),
    }
    for field, value in fields.items():
        if np.shape(value) != expected[field]:
            raise ValueError(
                f"{field} has shape {np.shape(value)}, expected {expected[field]} (B, K = {b}, {k})"
            )


def _closest_is_own(pred: jax.Array, gt: jax.Array, labeled: jax.Array) -> jax.Array:
    """[B, K]: the labelled ground truth closest to prediction k is vertebra k's."""
    to_all = jnp.linalg.norm(pred[:, :, None, :] - gt[:, None, :, :], axis=-1)  # [B, K, K]
    to_all = jnp.where(labeled[:, None, :], to_all, jnp.inf)
    return jnp.argmin(to_all, axis=-1) == jnp.arange(labeled.shape[1])


def _on_a_neighbour(
    pred: jax.Array, truth: jax.Array, visible: jax.Array, radius: jax.Array
) -> jax.Array:
    """[B, K]: prediction k lies within the radius of visible vertebra k - 1's or k + 1's centroid."""
    r = radius[:, None]
    on_next = visible[:, 1:] & (jnp.linalg.norm(pred[:, :-1] - truth[:, 1:], axis=-1) < r)
    on_previous = visible[:, :-1] & (jnp.linalg.norm(pred[:, 1:] - truth[:, :-1], axis=-1) < r)
    none = jnp.zeros_like(visible[:, :1])
    return jnp.concatenate([on_next, none], axis=1) | jnp.concatenate([none, on_previous], axis=1)


def _total(x: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32))


def _per_k(x: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32), axis=0)


def batch_sums(
    *,
    points: jax.Array,
    confidence: jax.Array,
    centroids: jax.Array,
    labeled: jax.Array,
    truth_centroids: jax.Array,
    truth_visible: jax.Array,
    original_size: jax.Array,
    pixel_spacing_mm: jax.Array,
    mask: jax.Array,
    image_size: int,
    threshold: float,
    fallback_spacing_px: float | None = None,
) -> dict[str, jax.Array]:
    """Sums and counts of one batch.

    Args:
      points: [B, K, 2] decoded (x, y) in model pixels.
      confidence: [B, K] peak values; a layer is present when >= threshold.
      centroids: [B, K, 2] labelled (x, y), normalised to [0, 1].
      labeled: [B, K] bool.
      truth_centroids: [B, K, 2] normalised, every vertebra's (for level slips).
      truth_visible: [B, K] bool, the vertebra's centroid lies in the image.
      original_size: [B, 2] int (height, width) in original pixels.
      pixel_spacing_mm: [B, 2] (row, column) mm per original pixel, 0 when unknown.
      mask: [B] bool, False for padded batch entries.
      image_size: model input size S (model pixels per side).
      threshold: presence threshold on the confidence.
      fallback_spacing_px: neighbour spacing (original pixels) for images
        without a labelled neighbour pair; None leaves them out of the
        identification metrics.

    Returns:
      A dict of float32 scalars and [K] arrays (keys ending in `_k`).
    """
    _check_shapes(
        labeled.shape,
        points=points,
        confidence=confidence,
        centroids=centroids,
        truth_centroids=truth_centroids,
        truth_visible=truth_visible,
        original_size=original_size,
        pixel_spacing_mm=pixel_spacing_mm,
        mask=mask,
    )
    mask = mask.astype(bool)
    labeled = labeled.astype(bool) & mask[:, None]
    visible = truth_visible.astype(bool) & mask[:, None]
    present = (confidence >= threshold) & mask[:, None]
    size_xy = original_size[:, ::-1].astype(jnp.float32)[:, None, :]  # (width, height)
    pred = points.astype(jnp.float32) / image_size * size_xy
    gt = centroids.astype(jnp.float32) * size_xy

    error = jnp.linalg.norm(pred - gt, axis=-1)  # [B, K]
    # Columns scale x and rows scale y, so that non-square pixels measure right.
    mm_per_px_xy = pixel_spacing_mm.astype(jnp.float32)[:, None, ::-1]
    error_mm = jnp.linalg.norm((pred - gt) * mm_per_px_xy, axis=-1)
    spacing, pairs = jax.vmap(_neighbour_spacing)(gt, labeled)
    has_spacing = pairs > 0
    if fallback_spacing_px is not None:
        spacing = jnp.where(has_spacing, spacing, fallback_spacing_px)
        has_spacing = jnp.ones_like(has_spacing)
    radius = 0.5 * spacing  # [B]
    scored = labeled & has_spacing[:, None]
    correct = scored & (error < radius[:, None])
    truth = truth_centroids.astype(jnp.float32) * size_xy
    slipped = scored & ~correct & _on_a_neighbour(pred, truth, visible, radius)

    # VerSe-style: the closest labelled ground truth to a present prediction
    # must be its own, and within the radius.
    identified = correct & present & _closest_is_own(pred, gt, labeled)

    scored_images = jnp.any(scored, axis=1)
    all_correct = scored_images & jnp.all(correct | ~scored, axis=1)
    spacing_known = jnp.all(pixel_spacing_mm > 0, axis=1)[:, None] & labeled
    unlabelled_visible = visible & ~labeled
    total, per_k = _total, _per_k
    return {
        "n_images": total(mask),
        "n_labelled": total(labeled),
        "n_scored": total(scored),
        "n_without_spacing": total(labeled & ~scored),
        "n_images_without_spacing": total(mask & jnp.any(labeled, axis=1) & ~scored_images),
        "n_correct": total(correct),
        "sq_error_correct": total(jnp.where(correct, error**2, 0.0)),
        "error_sum": total(jnp.where(labeled, error, 0.0)),
        "error_mm_sum": total(jnp.where(spacing_known, error_mm, 0.0)),
        "n_mm": total(spacing_known),
        "n_identified": total(identified),
        "n_level_slip": total(slipped),
        "n_present": total(present),
        "n_visible": total(visible),
        "n_present_visible": total(present & visible),
        "n_unlabelled_visible": total(unlabelled_visible),
        "n_unlabelled_visible_present": total(unlabelled_visible & present),
        "n_scored_images": total(scored_images),
        "n_all_correct_images": total(all_correct),
        "n_scored_k": per_k(scored),
        "n_labelled_k": per_k(labeled),
        "n_correct_k": per_k(correct),
        "sq_error_correct_k": per_k(jnp.where(correct, error**2, 0.0)),
        "error_sum_k": per_k(jnp.where(labeled, error, 0.0)),
    }


def accumulate(
    total: Mapping[str, np.ndarray] | None, sums: Mapping[str, jax.Array]
) -> dict[str, np.ndarray]:
    """Adds one batch's sums to a running total on the host (float64)."""
    sums = {key: np.asarray(value, np.float64) for key, value in sums.items()}
    if total is None:
        return sums
    return {key: total[key] + sums[key] for key in sums}


def _ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )
    return float(out) if out.ndim == 0 else out


def summarize(sums: Mapping[str, np.ndarray]) -> dict:
    """Divides accumulated sums once into the reported metrics.

    Undefined ratios (nothing to count) are NaN. Distances are in original
    pixels (mm where the spacing is known).

    Returns:
      A dict with id_accuracy, rmse_px, mean_error_px, mean_error_mm, id_rate,
      level_slip_share,
      presence_precision, presence_recall, unlabelled_visible_recall,
      all_correct_share, the counts n_labelled, n_scored, n_without_spacing,
      n_images, and per_vertebra: name -> {id_accuracy, rmse_px,
      mean_error_px, n (scored), n_labelled}.
    """
    s = {key: np.asarray(value, np.float64) for key, value in sums.items()}
    per_accuracy = _ratio(s["n_correct_k"], s["n_scored_k"])
    per_rmse = np.sqrt(_ratio(s["sq_error_correct_k"], s["n_correct_k"]))
    per_error = _ratio(s["error_sum_k"], s["n_labelled_k"])
    return {
        "id_accuracy": _ratio(s["n_correct"], s["n_scored"]),
        "rmse_px": float(np.sqrt(_ratio(s["sq_error_correct"], s["n_correct"]))),
        "mean_error_px": _ratio(s["error_sum"], s["n_labelled"]),
        "mean_error_mm": _ratio(s["error_mm_sum"], s["n_mm"]),
        "id_rate": _ratio(s["n_identified"], s["n_scored"]),
        "level_slip_share": _ratio(s["n_level_slip"], s["n_scored"]),
        "presence_precision": _ratio(s["n_present_visible"], s["n_present"]),
        "presence_recall": _ratio(s["n_present_visible"], s["n_visible"]),
        "unlabelled_visible_recall": _ratio(
            s["n_unlabelled_visible_present"], s["n_unlabelled_visible"]
        ),
        "all_correct_share": _ratio(s["n_all_correct_images"], s["n_scored_images"]),
        "n_labelled": int(s["n_labelled"]),
        "n_scored": int(s["n_scored"]),
        "n_without_spacing": int(s["n_without_spacing"]),
        "n_images_without_spacing": int(s["n_images_without_spacing"]),
        "n_images": int(s["n_images"]),
        "per_vertebra": {
            name: {
                "id_accuracy": float(per_accuracy[k]),
                "rmse_px": float(per_rmse[k]),
                "mean_error_px": float(per_error[k]),
                "n": int(s["n_scored_k"][k]),
                "n_labelled": int(s["n_labelled_k"][k]),
            }
            for k, name in enumerate(vertebrae.NAMES)
        },
    }
