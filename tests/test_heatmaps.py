"""Tests for vertjax.heatmaps: rendering targets and decoding them back."""

import jax
import numpy as np
import pytest

from vertjax import heatmaps


def test_render_matches_pixel_loop():
    centroids = np.array([[[3.2, 4.7], [0.0, 0.0]]], np.float32)
    labeled = np.array([[True, False]])
    got = np.asarray(heatmaps.render(centroids, labeled, height=7, width=6, sigma=1.5))
    assert got.shape == (1, 7, 6, 2) and got.dtype == np.float32
    want = np.zeros((7, 6))
    for i in range(7):
        for j in range(6):
            d2 = (j + 0.5 - 3.2) ** 2 + (i + 0.5 - 4.7) ** 2
            want[i, j] = np.exp(-d2 / (2 * 1.5**2))
    np.testing.assert_allclose(got[0, :, :, 0], want, rtol=1e-5, atol=1e-7)
    assert np.all(got[0, :, :, 1] == 0.0)


def test_render_peak_is_one_at_pixel_centre():
    got = heatmaps.render(np.array([[[2.5, 1.5]]]), np.array([[True]]), height=4, width=5, sigma=2)
    assert float(got[0, 1, 2, 0]) == 1.0


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0, 4.0])
def test_render_then_decode_recovers_subpixel_points(sigma):
    rng = np.random.default_rng(int(sigma * 10))
    size = 48
    centroids = rng.uniform(3.0, size - 3.0, size=(3, 13, 2)).astype(np.float32)
    labeled = np.ones((3, 13), bool)
    maps = heatmaps.render(centroids, labeled, height=size, width=size + 8, sigma=sigma)
    points, confidence = jax.jit(heatmaps.decode)(maps)
    assert points.shape == (3, 13, 2) and confidence.shape == (3, 13)
    assert np.max(np.abs(np.asarray(points) - centroids)) < 0.1
    assert np.all(np.asarray(confidence) > 0.85)  # peak within half a pixel of the centre


def test_decode_all_zero_layers():
    maps = np.zeros((2, 8, 9, 13), np.float32)
    maps[1, 3, 4, 5] = 0.7  # one single-pixel peak: no curvature to fit on a log scale
    points, confidence = heatmaps.decode(maps)
    points, confidence = np.asarray(points), np.asarray(confidence)
    assert np.all(np.isfinite(points))
    assert confidence[0].tolist() == [0.0] * 13
    np.testing.assert_allclose(points[1, 5], [4.5, 3.5], atol=0.5)
    assert confidence[1, 5] == pytest.approx(0.7)


def test_decode_negative_and_border_peaks_stay_finite():
    rng = np.random.default_rng(0)
    maps = -np.abs(rng.normal(size=(1, 6, 6, 13))).astype(np.float32)
    maps[0, 0, 0, 0] = 0.9  # corner peak
    points, confidence = heatmaps.decode(maps)
    assert np.all(np.isfinite(np.asarray(points)))
    np.testing.assert_allclose(np.asarray(points)[0, 0], [0.5, 0.5])
    assert float(confidence[0, 0]) == pytest.approx(0.9)
    assert np.all(np.asarray(confidence)[0, 1:] <= 0.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[B, K, 2\]"):
        heatmaps.render(np.zeros((1, 13, 3)), np.ones((1, 13), bool), height=4, width=4, sigma=1)
    with pytest.raises(ValueError, match=r"\[B, H, W, K\]"):
        heatmaps.decode(np.zeros((4, 4, 13)))
