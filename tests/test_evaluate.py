"""Tests for vertjax.evaluate: the Evaluator's metrics end to end, on heatmaps with known answers.

The stand-in network returns heatmaps rendered beforehand with
`heatmaps.render`, one set per record (each record's image shows its index),
so that everything after the network is the real code: batching and padding,
decoding, scaling to original pixels, the metric sums and their summary.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from vertjax import evaluate, heatmaps, sharding

S = 64  # model input side
K = 13


def _spine(seed: int) -> np.ndarray:
    """[K, 2] normalised (x, y) of T4..L4: top to bottom, on a gentle curve."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.1, 0.9, K) + rng.uniform(-0.01, 0.01, K)
    x = 0.5 + 0.15 * np.sin(3 * y) + rng.uniform(-0.02, 0.02, K)
    return np.stack([x, y], axis=-1).astype(np.float32)


def _layers(*ranges: range) -> np.ndarray:
    """[K] bool, True on the given layer ranges."""
    out = np.zeros(K, bool)
    for r in ranges:
        out[list(r)] = True
    return out


def _record(index: int, *, labeled, visible, height: int, width: int, spacing: float) -> dict:
    centroids = _spine(index)
    return {
        "image": np.full((S, S, 1), index, np.uint8),
        "centroids": centroids * labeled[:, None],
        "labeled": labeled,
        "truth_centroids": centroids,
        "truth_visible": visible,
        "original_size": np.array([height, width], np.int32),
        "pixel_spacing_mm": np.full(2, spacing, np.float32),
        "participant_id": f"p{index}".encode(),
        "image_id": f"i{index}".encode(),
    }


def _lookup_network(variables, images, **kwargs):
    """Heatmaps [B, S, S, K] of each image: the rendered ones of the record it shows."""
    index = jnp.round(images[:, 0, 0, 0]).astype(jnp.int32)
    return variables["params"][index]


def _evaluate(records: list[dict], shown: list[np.ndarray]) -> dict:
    """The Evaluator's summary of `records`, where the network shows the layers
    `shown[i]` [K] of record i as peak-1 Gaussians at their true centroids."""
    config = test_config.get_config()
    config.image_size = S
    config.eval_batch_size = 2
    config.read_threads = 1
    config.presence_threshold = 0.5
    config.fallback_spacing_px = 0.0
    config.postprocess.enabled = False
    config.test_time_flip = False
    points = np.stack([r["truth_centroids"] for r in records]) * S
    rendered = heatmaps.render(
        jnp.asarray(points), jnp.asarray(np.stack(shown)), height=S, width=S, sigma=2.0
    )
    evaluator = evaluate.Evaluator(
        config, sharding.make_mesh(1), apply_fn=_lookup_network, mean=0.0, std=1.0
    )
    return evaluator.run(rendered, records)


def test_perfect_heatmaps_score_full_marks():
    # Non-square radiographs, tall and wide, so that x and y scale differently;
    # three records in batches of 2: the second batch is padded.
    # (labelled layers, visible layers, height, width, pixel spacing in mm)
    layout = [
        (range(13), range(13), 3000, 1200, 0.1),
        (range(4, 11), range(2, 13), 2400, 2000, 0.143),
        (range(7), range(9), 900, 1500, 0.0),
    ]
    records = [
        _record(i, labeled=_layers(lab), visible=_layers(vis), height=h, width=w, spacing=mm)
        for i, (lab, vis, h, w, mm) in enumerate(layout)
    ]
    # Every visible vertebra drawn where it is, nothing else.
    out = _evaluate(records, [r["truth_visible"] for r in records])
    assert out["n_images"] == 3  # the padding counts nowhere
    assert out["n_labelled"] == out["n_scored"] == 13 + 7 + 7
    assert out["id_accuracy"] == 1.0 and out["id_rate"] == 1.0
    assert out["all_correct_share"] == 1.0
    # Sub-pixel decoding of a Gaussian is exact up to float32 rounding.
    assert out["rmse_px"] == pytest.approx(0.0, abs=0.01)
    assert out["mean_error_px"] == pytest.approx(0.0, abs=0.01)
    assert out["mean_error_mm"] == pytest.approx(0.0, abs=0.001)
    assert out["presence_precision"] == out["presence_recall"] == 1.0
    assert out["unlabelled_visible_recall"] == 1.0
    for name, row in out["per_vertebra"].items():
        assert row["id_accuracy"] == 1.0, name
        assert row["rmse_px"] == pytest.approx(0.0, abs=0.01), name
    per_layer = [row["n"] for row in out["per_vertebra"].values()]
    assert per_layer == [2, 2, 2, 2, 3, 3, 3, 2, 2, 2, 2, 1, 1]


def test_presence_recalls_count_visible_and_unlabelled_visible_vertebrae():
    labeled = _layers(range(6))  # T4..T9
    visible = _layers(range(9))  # T4..T12: T10, T11, T12 visible but unlabelled
    # Shown: 3 of the 6 labelled, 2 of the 3 unlabelled visible, and 2 that
    # are not visible (false positives).
    shown = _layers(range(3), range(6, 8), range(10, 12))
    record = _record(0, labeled=labeled, visible=visible, height=2000, width=800, spacing=0.1)
    out = _evaluate([record], [shown])
    assert out["n_images"] == 1 and out["n_labelled"] == 6
    # Present and visible / visible. Wrong denominators give other values:
    # labelled 3/6, present 5/7, all layers 5/13.
    assert out["presence_recall"] == pytest.approx(5 / 9)
    assert out["presence_precision"] == pytest.approx(5 / 7)
    # Present among the visible unlabelled / visible unlabelled; others give
    # 2/9 (over visible), 2/7 (over unlabelled), 2/4 (over present unlabelled).
    assert out["unlabelled_visible_recall"] == pytest.approx(2 / 3)
    # The three labelled vertebrae not shown decode far from their truth.
    assert out["id_accuracy"] == pytest.approx(3 / 6)
