"""Draw a radiograph with its named vertebral centroids, coloured by confidence.

Shared by `vertjax.predict` (one overlay per input image) and `vertjax.report`
(example overlays of a run's test predictions). Points are given in original
pixels (x right, y down, origin at the top-left corner of the top-left pixel);
the image may be drawn downscaled, but the axes keep original-pixel
coordinates (`imshow(extent=(0, W, H, 0))`), so every mark lands where the
point is, whatever the display size.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cm, colors
from matplotlib.figure import Figure

from vertjax import files, vertebrae

# Longest side of the drawn image: enough to read 13 labels on a 3,000 px
# radiograph while keeping an overlay PNG well under a megabyte.
MAX_DISPLAY_PX = 1024
# Red (low) to green (high): every shade stays readable on a dark radiograph.
COLORMAP = "RdYlGn"


def downscale(pixels: np.ndarray, max_side: int = MAX_DISPLAY_PX) -> tuple[np.ndarray, int]:
    """Block-averages `pixels` [H, W] so that its longest side is at most `max_side`.

    Integer factors only, so each displayed pixel covers the same original
    area; the remainder of fewer than `factor` rows and columns at the
    bottom and right is dropped (`draw` places the image accordingly).

    Returns:
      (image [H // factor, W // factor], factor).
    """
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image [H, W], got shape {pixels.shape}")
    factor = max(1, int(np.ceil(max(pixels.shape) / max_side)))
    if factor == 1:
        return pixels, 1
    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3)), factor


def draw(
    pixels: np.ndarray,
    points: np.ndarray,
    confidence: np.ndarray,
    present: np.ndarray,
    *,
    names: Sequence[str] = vertebrae.NAMES,
    truth: np.ndarray | None = None,
    truth_mask: np.ndarray | None = None,
    title: str | None = None,
    size: tuple[int, int] | None = None,
) -> Figure:
    """Figure of a radiograph with each present vertebra's name at its centroid.

    Args:
      pixels: float [H, W] in [0, 1], the radiograph at its original size.
      points: float [K, 2] predicted (x, y) in original pixels.
      confidence: float [K] heatmap peak per vertebra; sets the colour (0 to 1).
      present: bool [K]; only present vertebrae are drawn.
      names: K vertebra names, layer order.
      truth: optional float [K, 2] ground-truth (x, y) in original pixels,
        drawn as hollow white circles where `truth_mask` [K] is true.
      title: optional figure title.
      size: (width, height) of the original image when `pixels` is a resized
        copy (e.g. a dataset record's S x S image); it is stretched back over
        the original extent. None: `pixels` is the original.

    Returns:
      A matplotlib Figure (not registered with pyplot); `save` writes it.
    """
    rows, cols = np.shape(pixels)
    width, height = (cols, rows) if size is None else (int(size[0]), int(size[1]))
    points = np.asarray(points, np.float64).reshape(len(names), 2)
    confidence = np.asarray(confidence, np.float64).reshape(len(names))
    present = np.asarray(present, bool).reshape(len(names))

    # Lay the figure out in inches so the image fills its axes at its own
    # aspect ratio, with a fixed strip on the right for the colour bar.
    # Tall radiographs get 8 in of height, wide ones 12 in of width.
    scale = min(8.0 / height, 12.0 / width)
    img_w, img_h = max(1.5, width * scale), max(1.5, height * scale)
    margin, bar_strip, top = 0.1, 1.2, 0.35 if title else 0.1
    fig_w, fig_h = margin + img_w + bar_strip, margin + img_h + top
    # A bare Figure (no pyplot) renders with Agg, opens no window and keeps no
    # global state, so thousands of overlays do not accumulate open figures.
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((margin / fig_w, margin / fig_h, img_w / fig_w, img_h / fig_h))
    show_image(ax, pixels, width=width, height=height)
    cmap = matplotlib.colormaps[COLORMAP]
    norm = colors.Normalize(vmin=0.0, vmax=1.0)
    if truth is not None:
        truth = np.asarray(truth, np.float64).reshape(len(names), 2)
        mask = np.ones(len(names), bool) if truth_mask is None else np.asarray(truth_mask, bool)
        ax.scatter(
            truth[mask, 0],
            truth[mask, 1],
            s=70,
            facecolors="none",
            edgecolors="white",
            linewidths=1.2,
            label="ground truth",
        )
    ax.scatter(
        points[present, 0],
        points[present, 1],
        c=confidence[present],
        cmap=cmap,
        norm=norm,
        s=26,
        edgecolors="white",
        linewidths=0.5,
        label="prediction",
        zorder=3,
    )
    label_points(ax, points, names, present, [cmap(norm(c)) for c in confidence])
    cax = fig.add_axes(
        (
            (margin + img_w + 0.15) / fig_w,
            0.1 + 0.1 * img_h / fig_h,
            0.15 / fig_w,
            0.8 * img_h / fig_h,
        )
    )
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("confidence (heatmap peak)")
    if truth is not None:
        ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def show_image(ax: Any, pixels: np.ndarray, *, width: int, height: int) -> None:
    """Draws `pixels` (float [H, W] in [0, 1]) over the extent width x height, axes off.

    The image is block-averaged to at most MAX_DISPLAY_PX a side; the axes keep
    original-pixel coordinates, so marks land where their points are.
    """
    rows, cols = np.shape(pixels)
    shown, factor = downscale(pixels)
    # The block average drops a remainder of fewer than `factor` pixels; the
    # drawn image covers exactly the pixels it averaged, scaled to the extent.
    shown_w = shown.shape[1] * factor * width / cols
    shown_h = shown.shape[0] * factor * height / rows
    ax.imshow(
        shown,
        cmap="gray",
        vmin=0.0,
        vmax=1.0,
        extent=(0.0, shown_w, shown_h, 0.0),
        interpolation="bilinear",
    )
    ax.set_xlim(0.0, width)
    ax.set_ylim(height, 0.0)
    ax.set_axis_off()


def label_points(
    ax: Any,
    points: np.ndarray,
    names: Sequence[str],
    mask: np.ndarray,
    fills: Sequence[Any],
    *,
    fontsize: float = 8,
) -> None:
    """Writes names[k] in a box of colour fills[k] beside points[k] where mask[k]."""
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    # Labels sit to the right of the point so they do not hide the centroid.
    offset = 0.01 * max(abs(xlim[1] - xlim[0]), abs(ylim[1] - ylim[0]))
    for k in np.flatnonzero(mask):
        fill = colors.to_rgba(fills[k])
        # Black text on light fills, white on dark ones (ITU-R BT.601 luma).
        luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        ax.text(
            points[k, 0] + offset,
            points[k, 1],
            names[k],
            color="black" if luma > 0.5 else "white",
            fontsize=fontsize,
            fontweight="bold",
            va="center",
            ha="left",
            bbox={"facecolor": fill, "alpha": 0.9, "pad": 1.0, "edgecolor": "none"},
            zorder=4,
        )


def text(value: Any) -> str:
    """A record's string field (TFDS gives bytes) as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def preview(records: Sequence[dict[str, Any]], *, title: str) -> Figure:
    """A grid of dataset records with their centroids marked by name.

    Labelled centroids are drawn in green, visible-but-unlabelled ones
    (`truth_visible & ~labeled`) in orange, in the records' S x S pixels.
    """
    cols = min(4, len(records))
    rows = -(-len(records) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.5 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    handles = {}
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, record in zip(axes.flat, records, strict=False):
        image = np.asarray(record["image"])[:, :, 0] / 255.0
        size = image.shape[0]
        show_image(ax, image, width=size, height=size)
        labeled = np.asarray(record["labeled"], bool)
        for mask, key, colour, kind in (
            (labeled, "centroids", "lime", "labelled"),
            (
                np.asarray(record["truth_visible"]) & ~labeled,
                "truth_centroids",
                "orange",
                "visible, unlabelled",
            ),
        ):
            points = np.asarray(record[key]) * size
            if mask.any():
                handles[kind] = ax.scatter(*points[mask].T, marker="+", c=colour, s=50)
            label_points(ax, points, vertebrae.NAMES, mask, [colour] * len(mask), fontsize=6)
        ax.set_title(text(record["image_id"])[-28:], fontsize=7)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def write_preview(builder: Any, out: str, *, split: str = "train", count: int = 8) -> str:
    """Writes `preview` of the first `count` records of a dataset split to the PNG `out`.

    Raises:
      ValueError: no such split, or it is empty.
    """
    if split not in builder.info.splits:
        raise ValueError(f"no split {split!r}; this dataset has {', '.join(builder.info.splits)}")
    source = builder.as_data_source(split)
    records = [source[i] for i in range(min(count, len(source)))]
    if not records:
        raise ValueError(f"split {split!r} is empty")
    fig = preview(records, title=f"{builder.info.full_name} / {split}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files.write_atomic(out, to_png(fig))
    return out


def draw_record(
    record: dict[str, Any],
    points: np.ndarray,
    confidence: np.ndarray,
    *,
    image_size: int,
    threshold: float,
    title: str,
) -> Figure:
    """`draw` of a dataset record's S x S image, stretched back to its original
    shape, with predictions `points` [K, 2] in model pixels and the labelled
    ground truth as hollow circles."""
    height, width = (int(v) for v in record["original_size"])
    scale = np.array([width, height], np.float64)
    return draw(
        np.asarray(record["image"]).reshape(image_size, image_size) / 255.0,
        np.asarray(points, np.float64) * scale / image_size,
        confidence,
        np.asarray(confidence) >= threshold,
        truth=np.asarray(record["centroids"], np.float64) * scale,
        truth_mask=np.asarray(record["labeled"], bool),
        title=title,
        size=(width, height),
    )


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (callers write them atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
