"""Resizing to the model's uint8 input, exactly alike in NumPy and in JAX.

`imaging.to_model_input` (what `predict`, evaluation and the records use)
and the exported model (`vertjax.export`) must turn a radiograph into the
same S x S uint8 image bit for bit, or a checkpoint and its exported file
would name slightly different points. Float32 sums are not reproducible
across libraries and devices (summation order, fused multiply-adds), so
every step here is integer arithmetic, written once over an array module
`xp` (numpy or jax.numpy; with jax.numpy, H and W may be symbolic):

1. grey values [0, 1] -> integers (round half to even): 0..65535 for BOX,
   0..255 for BILINEAR, whose weighted sums must stay within int32;
2. both sides >= S: BOX, the mean of the pixels whose centres fall in each
   output pixel's footprint (i, i + 1] * in / S, summed per footprint and
   rounded once to 0..255; otherwise BILINEAR, a triangle filter (widened to
   in / S on a side that shrinks) with integer weights, down the rows and
   then along the columns, rounded after each pass.

This is PIL's `Image.resize` (BOX or BILINEAR) up to rounding: at most one
grey level apart, except that a pixel whose centre sits exactly on a
footprint's edge, which PIL's double arithmetic places on either side,
here always belongs to the footprint below it. Every sum stays below 2**31
for images up to 8192 px a side (imaging.MAX_PIXELS).
"""

from __future__ import annotations

from typing import Any

import numpy as np

LEVELS = 255  # uint8
FINE_LEVELS = 65535  # = 255 * 257: BOX sums in 16-bit steps, then one rounding


def exact_numpy_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matrix product through float64 BLAS: exact, as every sum here is < 2**53.

    NumPy's own integer matmul has no BLAS and is ~100x slower.
    """
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def footprints(xp: Any, in_size: Any, out_size: int) -> tuple[Any, Any]:
    """(first, end) [out] int32: input x lies in output i's footprint iff first <= x < end.

    Centre x + 0.5 in (i, i + 1] * in / out, i.e. 2 * i * in < (2x + 1) * out
    <= 2 * (i + 1) * in: integers, so no rounding can move a pixel across.
    """
    i = xp.arange(out_size, dtype=xp.int32)
    n = xp.asarray(in_size, dtype=xp.int32)
    first = (2 * i * n - out_size) // (2 * out_size) + 1
    end = (2 * (i + 1) * n - out_size) // (2 * out_size) + 1
    return first, end


def triangle_weights(xp: Any, in_size: Any, out_size: int) -> Any:
    """int32 [out, in]: PIL's BILINEAR triangle, in units of 1 / (2 * max(in, out)).

    The distance between centres, |x + 0.5 - (i + 0.5) * in / out|, times
    2 * out is the integer |(2x + 1) * out - (2i + 1) * in|; the triangle's
    half-width, max(in / out, 1), times 2 * out is 2 * max(in, out).
    """
    n = xp.asarray(in_size, dtype=xp.int32)
    distance = xp.abs(
        (2 * xp.arange(in_size, dtype=xp.int32)[None, :] + 1) * out_size
        - (2 * xp.arange(out_size, dtype=xp.int32)[:, None] + 1) * n
    )
    return xp.maximum(2 * xp.maximum(n, out_size) - distance, 0)


def _divide_rounding(total: Any, count: Any) -> Any:
    """round(total / count) for non-negative integers, halves up."""
    return (2 * total + count) // (2 * count)


def _box(xp: Any, pixels: Any, size: int) -> Any:
    """The mean of each footprint, rounded once to 0..255 (sides >= size)."""
    grey = _levels(xp, pixels, FINE_LEVELS)
    height, width = grey.shape
    rows, cols = footprints(xp, height, size), footprints(xp, width, size)
    sums = _footprint_sums(xp, _footprint_sums(xp, grey, rows, 0, size), cols, 1, size)
    count = (rows[1] - rows[0])[:, None] * (cols[1] - cols[0])[None, :]
    return _divide_rounding(sums, count * (FINE_LEVELS // LEVELS))


def _footprint_sums(xp: Any, values: Any, ends: tuple[Any, Any], axis: int, size: int) -> Any:
    """Integer sums of `values` over each footprint along `axis` (exact in any order)."""
    if xp is np:
        return np.add.reduceat(values, ends[0], axis=axis)
    import jax

    # Each input index's footprint: the i with first_i <= x < end_i.
    index = xp.arange(values.shape[axis], dtype=xp.int32)
    owner = xp.searchsorted(ends[1], index, side="right").astype(xp.int32)
    moved = xp.moveaxis(values, axis, 0)
    summed = jax.ops.segment_sum(moved, owner, num_segments=size, indices_are_sorted=True)
    return xp.moveaxis(summed, 0, axis)


def _levels(xp: Any, pixels: Any, levels: int) -> Any:
    return xp.rint(xp.clip(pixels, 0.0, 1.0) * levels).astype(xp.int32)


def _bilinear(xp: Any, pixels: Any, size: int, matmul: Any) -> Any:
    grey = _levels(xp, pixels, LEVELS)
    height, width = grey.shape
    rows, cols = triangle_weights(xp, height, size), triangle_weights(xp, width, size)
    down = _divide_rounding(matmul(rows, grey), xp.sum(rows, axis=1)[:, None])
    return _divide_rounding(matmul(down, cols.T), xp.sum(cols, axis=1)[None, :])


def resize(xp: Any, pixels: Any, size: int, matmul: Any = exact_numpy_matmul) -> Any:
    """float [H, W] in [0, 1] -> integers [size, size] in 0..255 (see the module doc).

    `matmul(a, b)` multiplies integer matrices exactly: `exact_numpy_matmul`
    for NumPy, an int32 dot for JAX (`vertjax.export`).
    """
    height, width = pixels.shape
    if xp is np:
        if min(height, width) >= size:
            return _box(np, pixels, size)
        return _bilinear(np, pixels, size, matmul)
    import jax

    # Symbolic sizes: the branch is chosen when the function runs.
    shrink = (xp.asarray(height) >= size) & (xp.asarray(width) >= size)
    return jax.lax.cond(
        shrink,
        lambda p: _box(xp, p, size),
        lambda p: _bilinear(xp, p, size, matmul),
        pixels,
    )
