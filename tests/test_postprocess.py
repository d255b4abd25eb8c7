"""Tests for vertjax.postprocess: spacing prior and the ordered decoding."""

import functools

import jax
import numpy as np
import pytest

from vertjax import heatmaps, postprocess

K = 13
# Compiled once: every test below passes a batch of two [HEIGHT, WIDTH] examples.
fix = jax.jit(functools.partial(postprocess.apply, min_confidence=0.2))
HEIGHT, WIDTH, SIGMA = 176, 48, 2.0


def spine(top: float = 12.0, spacing: float = 12.0) -> np.ndarray:
    """[K, 2] centroids in model px of a straight, upright spine."""
    x = np.full(K, 24.3)
    return np.stack([x, top + 0.4 + spacing * np.arange(K)], axis=-1).astype(np.float32)


def training_prior() -> postprocess.SpacingPrior:
    rng = np.random.default_rng(0)
    centroids = np.stack([spine() + rng.normal(0, 1.0, (K, 2)) for _ in range(20)])
    labeled = rng.uniform(size=(20, K)) < 0.8
    return postprocess.fit_prior(centroids, labeled)


def blobs(points: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """One layer [H, W] with a Gaussian of each given peak height at each point."""
    layer = np.zeros((HEIGHT, WIDTH), np.float32)
    for point, peak in zip(points, peaks, strict=True):
        one = heatmaps.render(
            point[None, None], np.array([[True]]), height=HEIGHT, width=WIDTH, sigma=SIGMA
        )
        layer = np.maximum(layer, peak * np.asarray(one)[0, :, :, 0])
    return layer


def clean_maps(truth: np.ndarray) -> np.ndarray:
    maps = heatmaps.render(
        truth[None], np.ones((1, K), bool), height=HEIGHT, width=WIDTH, sigma=SIGMA
    )
    return np.array(maps[0]) * 0.9


def test_fit_prior_recovers_spacing_and_direction():
    prior = training_prior()
    assert prior.mean.shape == prior.std.shape == (K - 1,) and prior.direction.shape == (K - 1, 2)
    np.testing.assert_allclose(prior.mean, 12.0, atol=1.0)
    assert np.all(prior.std >= 1.0) and np.all(prior.std < 3.0)
    np.testing.assert_allclose(prior.direction, np.tile([0.0, 1.0], (K - 1, 1)), atol=0.1)


def test_fit_prior_fills_unseen_pairs_and_rejects_bad_input():
    centroids = np.stack([spine(), spine(top=20.0)])
    labeled = np.zeros((2, K), bool)
    labeled[:, :4] = True  # only pairs 0-1, 1-2, 2-3 seen
    prior = postprocess.fit_prior(centroids, labeled)
    np.testing.assert_allclose(prior.mean, 12.0, rtol=1e-6)
    with pytest.raises(ValueError, match="consecutive"):
        postprocess.fit_prior(centroids, np.eye(2, K, dtype=bool))
    centroids[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"centroids\[1, 2\]"):
        postprocess.fit_prior(centroids, labeled)


def test_clean_heatmaps_are_kept():
    truth = spine()
    batch = np.stack([clean_maps(truth), clean_maps(spine(top=14.0))])
    points, confidence = fix(batch, training_prior())
    np.testing.assert_allclose(np.asarray(points)[0], truth, atol=0.1)
    np.testing.assert_allclose(np.asarray(points)[1], spine(top=14.0), atol=0.1)
    _, plain = heatmaps.decode(batch)
    np.testing.assert_allclose(np.asarray(confidence), np.asarray(plain), rtol=1e-6)


def test_fixes_duplicated_and_swapped_pairs():
    truth = spine()
    maps = clean_maps(truth)
    # Duplicate: T10 (layer 6) peaks on T11's vertebra, its own spot is weaker.
    maps[..., 6] = blobs(truth[[7, 6]], np.array([1.0, 0.5]))
    # Swap: L1 (9) peaks on L2's vertebra and L2 (10) on L1's, each own spot weaker.
    maps[..., 9] = blobs(truth[[10, 9]], np.array([1.0, 0.6]))
    maps[..., 10] = blobs(truth[[9, 10]], np.array([1.0, 0.6]))
    batch = np.stack([maps, clean_maps(truth)])
    plain, _ = heatmaps.decode(batch)
    wrong = np.linalg.norm(np.asarray(plain)[0] - truth, axis=-1) > 5.0
    assert wrong.tolist() == [k in (6, 9, 10) for k in range(K)]  # the test case is a real one

    fixed, confidence = fix(batch, training_prior())
    np.testing.assert_allclose(np.asarray(fixed)[0], truth, atol=0.2)
    np.testing.assert_allclose(np.asarray(confidence)[0, [6, 9, 10]], [0.5, 0.6, 0.6], atol=0.05)
    np.testing.assert_allclose(np.asarray(fixed)[1], truth, atol=0.1)


def test_absent_layer_does_not_break_the_chain():
    truth = spine()
    maps = clean_maps(truth)
    maps[..., 4] = 0.0  # T8 absent
    maps[..., 5] = blobs(truth[[4, 5]], np.array([1.0, 0.5]))  # T9 peaks on the empty T8 spot
    points, confidence = fix(np.stack([maps, maps]), training_prior())
    points, confidence = np.asarray(points)[0], np.asarray(confidence)[0]
    assert confidence[4] == 0.0
    keep = np.arange(K) != 4
    np.testing.assert_allclose(points[keep], truth[keep], atol=0.2)


def test_bad_arguments_raise():
    prior = training_prior()
    with pytest.raises(ValueError, match="min_confidence"):
        postprocess.apply(np.zeros((1, 8, 8, K)), prior, min_confidence=0.0)
    with pytest.raises(ValueError, match="prior pairs"):
        postprocess.apply(np.zeros((1, 8, 8, 5)), prior, min_confidence=0.1)
    with pytest.raises(ValueError, match="odd"):
        postprocess.apply(np.zeros((1, 8, 8, K)), prior, min_confidence=0.1, window=4)
