"""Tests for vertjax.metrics on a hand-worked batch."""

import math

import jax
import numpy as np
import pytest

from vertjax import metrics

S = 10  # model size: model px = original px / width (or height) * 10


def hand_batch():
    """Three entries: a worked image, a one-labelled-vertebra image, and padding."""
    b, k = 3, 13
    points = np.zeros((b, k, 2), np.float32)
    confidence = np.zeros((b, k), np.float32)
    centroids = np.zeros((b, k, 2), np.float32)
    labeled = np.zeros((b, k), bool)
    visible = np.zeros((b, k), bool)
    # Image 0: 200 high, 100 wide; T4, T5, T6 labelled at y = 20, 40, 80 (x = 50):
    # neighbour distances 20 and 40, mean 30, radius 15.
    labeled[0, :3] = True
    visible[0, :4] = True  # T7 visible but unlabelled
    centroids[0, :3] = [[0.5, 0.1], [0.5, 0.2], [0.5, 0.4]]
    # Predictions in original px: T4 (50, 23) error 3, correct and closest to T4;
    # T5 (50, 29) error 11, correct, but closest to T4 (9): not VerSe-identified;
    # T6 (50, 41) error 39, wrong.
    points[0, :3] = [[5.0, 1.15], [5.0, 1.45], [5.0, 2.05]]
    confidence[0, :4] = [0.9, 0.9, 0.9, 0.8]
    confidence[0, 4:12] = 0.1
    confidence[0, 12] = 0.7  # present but not visible: a false positive
    # Image 1: 100 x 100, only T9 labelled at (50, 50): no neighbour spacing.
    labeled[1, 5] = True
    visible[1, 5] = True
    centroids[1, 5] = [0.5, 0.5]
    points[1, 5] = [5.0, 5.2]  # error 2
    confidence[1, 5] = 0.9
    # Entry 2: padding full of values that must not count.
    labeled[2] = visible[2] = True
    confidence[2] = 1.0
    centroids[2] = np.linspace(0, 1, k)[:, None]
    return dict(
        points=points,
        confidence=confidence,
        centroids=centroids,
        labeled=labeled,
        truth_centroids=centroids,
        truth_visible=visible,
        original_size=np.array([[200, 100], [100, 100], [50, 50]], np.int32),
        # (row, column) mm: image 0's errors are along y, so its row spacing counts.
        pixel_spacing_mm=np.array([[0.5, 0.25], [0.0, 0.0], [1.0, 1.0]], np.float32),
        mask=np.array([True, True, False]),
    )


def test_hand_worked_batch_without_fallback():
    sums = metrics.batch_sums(**hand_batch(), image_size=S, threshold=0.5)
    out = metrics.summarize(metrics.accumulate(None, sums))
    assert out["n_images"] == 2
    assert out["n_labelled"] == 4
    assert out["n_scored"] == 3
    assert out["n_without_spacing"] == 1 and out["n_images_without_spacing"] == 1
    assert out["id_accuracy"] == pytest.approx(2 / 3)
    assert out["rmse_px"] == pytest.approx(math.sqrt((9 + 121) / 2), rel=1e-5)
    assert out["mean_error_px"] == pytest.approx((3 + 11 + 39 + 2) / 4, rel=1e-5)
    assert out["mean_error_mm"] == pytest.approx((3 + 11 + 39) * 0.5 / 3, rel=1e-5)
    assert out["id_rate"] == pytest.approx(1 / 3)
    assert out["level_slip_share"] == pytest.approx(1 / 3)  # T6 sits on T5 (1 px off)
    assert out["presence_precision"] == pytest.approx(5 / 6)
    assert out["presence_recall"] == pytest.approx(1.0)
    assert out["unlabelled_visible_recall"] == pytest.approx(1.0)
    assert out["all_correct_share"] == 0.0
    table = out["per_vertebra"]
    assert table["T4"]["id_accuracy"] == 1.0 and table["T4"]["rmse_px"] == pytest.approx(
        3, rel=1e-5
    )
    assert table["T5"]["rmse_px"] == pytest.approx(11, rel=1e-5)
    assert table["T6"]["id_accuracy"] == 0.0 and math.isnan(table["T6"]["rmse_px"])
    assert table["T9"]["n"] == 0 and table["T9"]["n_labelled"] == 1
    assert math.isnan(table["T9"]["id_accuracy"])
    assert table["T9"]["mean_error_px"] == pytest.approx(2, rel=1e-5)


def test_millimetres_scale_x_by_column_and_y_by_row_spacing():
    batch = hand_batch()
    batch["points"][0, 0, 0] += 0.3  # T4 also 3 original px off in x (100 px wide, S = 10)
    sums = metrics.batch_sums(**batch, image_size=S, threshold=0.5)
    out = metrics.summarize(metrics.accumulate(None, sums))
    t4_mm = math.hypot(3 * 0.25, 3 * 0.5)
    assert out["mean_error_mm"] == pytest.approx((t4_mm + (11 + 39) * 0.5) / 3, rel=1e-5)


def test_one_labelled_vertebra_uses_fallback_spacing():
    sums = metrics.batch_sums(**hand_batch(), image_size=S, threshold=0.5, fallback_spacing_px=10.0)
    out = metrics.summarize(sums)
    assert out["n_scored"] == 4 and out["n_without_spacing"] == 0
    assert out["id_accuracy"] == pytest.approx(3 / 4)  # T9: error 2 < radius 5
    assert out["rmse_px"] == pytest.approx(math.sqrt((9 + 121 + 4) / 3), rel=1e-5)
    assert out["id_rate"] == pytest.approx(2 / 4)
    assert out["all_correct_share"] == pytest.approx(1 / 2)
    assert out["per_vertebra"]["T9"]["id_accuracy"] == 1.0


def test_jit_and_accumulate_over_batches_equal_one_batch():
    batch = hand_batch()
    fn = jax.jit(lambda **kw: metrics.batch_sums(**kw, image_size=S, threshold=0.5))
    whole = metrics.summarize(fn(**batch))
    total = None
    for part in (slice(0, 1), slice(1, 3)):
        total = metrics.accumulate(total, fn(**{key: v[part] for key, v in batch.items()}))
    split = metrics.summarize(total)
    for key in ("id_accuracy", "rmse_px", "mean_error_px", "id_rate", "presence_precision"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6), key
    assert split["n_images"] == whole["n_images"] == 2


def test_empty_totals_give_nan_not_errors():
    batch = hand_batch()
    batch["mask"] = np.zeros(3, bool)
    out = metrics.summarize(metrics.batch_sums(**batch, image_size=S, threshold=0.5))
    assert out["n_images"] == 0
    assert math.isnan(out["id_accuracy"]) and math.isnan(out["rmse_px"])
    assert math.isnan(out["mean_error_mm"])


def test_bad_shape_names_the_field():
    batch = hand_batch()
    batch["original_size"] = batch["original_size"][:, :1]
    with pytest.raises(ValueError, match="original_size"):
        metrics.batch_sums(**batch, image_size=S, threshold=0.5)


def test_level_slips_need_a_visible_neighbour_under_the_point():
    batch = hand_batch()
    batch["truth_visible"][0, 1] = False  # T5 hidden: T6 on it is wrong, not a slip
    out = metrics.summarize(metrics.batch_sums(**batch, image_size=S, threshold=0.5))
    assert out["id_accuracy"] == pytest.approx(2 / 3) and out["level_slip_share"] == 0.0
    batch = hand_batch()
    batch["points"][0, 2] = [5.0, 5.0]  # T6 predicted at y = 100, 20 px from any centroid
    out = metrics.summarize(metrics.batch_sums(**batch, image_size=S, threshold=0.5))
    assert out["level_slip_share"] == 0.0
    batch = hand_batch()
    batch["points"][0, 0] = [5.0, 2.0]  # T4 at y = 40, on T5 below it; T6 still on T5
    out = metrics.summarize(metrics.batch_sums(**batch, image_size=S, threshold=0.5))
    assert out["id_accuracy"] == pytest.approx(1 / 3)
    assert out["level_slip_share"] == pytest.approx(2 / 3)
