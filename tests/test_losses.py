"""Tests for vertjax.losses: hand-worked values, a pixel-loop reference, kernel == reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vertjax import losses


def table_weights(name: str, targets: np.ndarray, labeled: np.ndarray) -> np.ndarray:
    """Appendix B's weights [B, H, W, K], pixel by pixel from the table (first rule wins)."""
    b_size, height, width, k_size = targets.shape
    weights = np.ones(targets.shape)
    for b in range(b_size):

        def is_labelled(k, b=b):
            return 0 <= k < k_size and bool(labeled[b, k])

        for k in range(k_size):
            here, before, after = is_labelled(k), is_labelled(k - 1), is_labelled(k + 1)
            for i in range(height):
                for j in range(width):
                    y = targets[b, i, j, :].max() if name == "l3" else targets[b, i, j, k]
                    if name != "mse" and y >= 0.5:
                        weights[b, i, j, k] = 10.0
                    elif name in ("l2", "l3") and not here and not before and not after:
                        weights[b, i, j, k] = 5.0
                    elif name in ("l2", "l3") and not here and (before or after):
                        weights[b, i, j, k] = 0.0
    return weights


def reference_loss(name: str, targets: np.ndarray, predictions: np.ndarray, labeled: np.ndarray):
    """Per-example loss [B] in float64 from `table_weights`."""
    error = targets.astype(np.float64) - predictions.astype(np.float64)
    per_pixel = table_weights(name, targets, labeled) * error**2
    return per_pixel.sum(axis=(1, 2, 3)) / np.prod(targets.shape[1:])


def random_case(seed: int, b_size: int = 5, size: int = 5, k_size: int = 13):
    rng = np.random.default_rng(seed)
    labeled = rng.uniform(size=(b_size, k_size)) < 0.5
    labeled[0] = True  # all labelled
    labeled[1] = False  # none labelled
    labeled[2] = False
    labeled[2, [0, 5, 6, 12]] = True  # both ends and an inner pair
    # Values on both sides of 0.5 in every layer, labelled or not, so that l3's
    # all-layer maximum differs from the layer's own value.
    targets = rng.uniform(0.0, 1.0, size=(b_size, size, size, k_size)).astype(np.float32)
    targets[rng.uniform(size=targets.shape) < 0.3] = 0.5  # exactly on the threshold
    predictions = rng.normal(0.3, 0.5, size=targets.shape).astype(np.float32)
    return targets, predictions, labeled


def gaussian_case(seed: int, b_size: int = 4, size: int = 10, k_size: int = 13):
    """Targets as training renders them: one Gaussian (peak up to 1.0) per labelled layer.

    Rows: all labelled, none labelled, then random. Half the centres sit on a
    pixel (value 1.0 there), the rest between pixels, so that values fill
    (0, 1]; a few pixels hold values just at and above 0.5 in one layer only.
    """
    rng = np.random.default_rng(seed)
    labeled = rng.uniform(size=(b_size, k_size)) < 0.5
    labeled[0] = True
    labeled[1] = False
    centres = rng.uniform(0.0, size - 1.0, size=(b_size, k_size, 2))
    centres[:, ::2] = np.round(centres[:, ::2])
    sigma = rng.uniform(1.0, 2.5, size=(b_size, k_size))
    grid = np.arange(size, dtype=np.float64)
    dy = grid[None, :, None, None] - centres[:, None, None, :, 0]
    dx = grid[None, None, :, None] - centres[:, None, None, :, 1]
    gauss = np.exp(-(dy**2 + dx**2) / (2.0 * sigma[:, None, None, :] ** 2))
    targets = (gauss * labeled[:, None, None, :]).astype(np.float32)
    targets[2:, 0, 0, 3] = 0.5
    targets[2:, 0, 1, 3] = 0.55
    predictions = (targets + rng.normal(0.0, 0.3, size=targets.shape)).astype(np.float32)
    return targets, predictions, labeled


def test_gaussian_case_exercises_rule_1():
    targets, _, labeled = gaussian_case(0)
    assert labeled[0].all() and not labeled[1].any() and labeled[2:].any()
    assert targets.max() == 1.0
    peak = targets.max(axis=-1, keepdims=True)
    # Pixels where l3's shared test differs from the layer's own test, and
    # all-layer maxima between 0.5 and 0.6.
    assert np.any((peak >= 0.5) & (targets < 0.5) & labeled[:, None, None, :])
    assert np.any((peak >= 0.5) & ~labeled[:, None, None, :])
    assert np.any((peak >= 0.5) & (peak < 0.6))


@pytest.mark.parametrize("make", [losses.get, losses.reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("name", losses.NAMES)
def test_matches_loop_reference_on_random_inputs(name, make):
    for seed in range(3):
        targets, predictions, labeled = random_case(seed)
        got = make(name)(predictions=predictions, targets=targets, labeled=labeled)
        want = reference_loss(name, targets, predictions, labeled)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", losses.NAMES)
def test_kernel_matches_reference_in_value_and_gradient(name):
    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(fn, predictions, targets, labeled, cotangent):
        value, pullback = jax.vjp(
            lambda p, y: fn(predictions=p, targets=y, labeled=labeled), predictions, targets
        )
        return (value, *pullback(cotangent))

    kernel, reference = losses.get(name), losses.reference(name)
    rng = np.random.default_rng(0)
    for case in (gaussian_case(0), gaussian_case(1), random_case(0)):
        targets, predictions, labeled = (jnp.asarray(a) for a in case)
        cotangent = jnp.asarray(rng.uniform(0.5, 2.0, size=labeled.shape[0]), jnp.float32)
        got = value_and_grads(kernel, predictions, targets, labeled, cotangent)
        want = value_and_grads(reference, predictions, targets, labeled, cotangent)
        for what, g, w in zip(("value", "d/dp", "d/dy"), got, want, strict=True):
            g, w = np.asarray(g), np.asarray(w)
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=what)


@pytest.mark.parametrize("name", losses.NAMES)
def test_gradient_is_twice_table_weight_times_error(name):
    # d/dp of the batch sum is 2 w (p - y) / (H W K), w straight from the table.
    for seed in range(2):
        targets, predictions, labeled = gaussian_case(seed)
        grad = jax.jit(
            jax.grad(
                lambda p, y, lab: jnp.sum(losses.get(name)(predictions=p, targets=y, labeled=lab))
            )
        )(predictions, targets, labeled)
        error = predictions.astype(np.float64) - targets
        want = 2.0 * table_weights(name, targets, labeled) * error / targets[0].size
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", losses.NAMES)
def test_weights_match_table(name):
    for targets, _, labeled in (gaussian_case(0), random_case(0)):
        got = losses.weights(name, targets=targets, labeled=labeled)
        np.testing.assert_array_equal(np.asarray(got), table_weights(name, targets, labeled))


def test_hand_computed_values():
    # One example, 1x2 pixels, K = 3; only layer 0 labelled.
    targets = np.zeros((1, 1, 2, 3), np.float32)
    targets[0, 0, 0, 0] = 0.8  # hot pixel of layer 0
    targets[0, 0, 1, 0] = 0.2
    predictions = np.zeros_like(targets)
    predictions[0, 0, :, 1] = 1.0  # layer 1: unlabelled, next to layer 0
    predictions[0, 0, :, 2] = 2.0  # layer 2: unlabelled, neighbours 1 and (outside) 3 unlabelled
    labeled = np.array([[True, False, False]])
    n = 6.0
    # mse: 0.64 + 0.04 + 1 + 1 + 4 + 4
    # l1: layer 0 hot x10: 6.4 + 0.04, rest weight 1
    # l2: layer 1 weight 0, layer 2 weight 5
    # l3: the hot pixel (0, 0) weighs 10 in every layer, also in layer 1 and 2
    want = {
        "mse": (0.64 + 0.04 + 1 + 1 + 4 + 4) / n,
        "l1": (6.4 + 0.04 + 1 + 1 + 4 + 4) / n,
        "l2": (6.4 + 0.04 + 0 + 0 + 5 * 4 + 5 * 4) / n,
        "l3": (6.4 + 0.04 + 10 * 1 + 0 + 10 * 4 + 5 * 4) / n,
    }
    for name, value in want.items():
        got = losses.get(name)(predictions=predictions, targets=targets, labeled=labeled)
        np.testing.assert_allclose(np.asarray(got), [value], rtol=1e-6, err_msg=name)


def test_edge_layers_count_missing_neighbours_as_unlabelled():
    # K = 3, only the middle layer labelled: the ends are next to it -> weight 0.
    # Only layer 0 labelled: layer 2 has neighbours 1 (unlabelled) and 3 (outside) -> 5.
    targets = np.zeros((2, 1, 1, 3), np.float32)
    labeled = np.array([[False, True, False], [True, False, False]])
    w = np.asarray(losses.weights("l2", targets=targets, labeled=labeled))[:, 0, 0, :]
    np.testing.assert_array_equal(w, [[0.0, 1.0, 0.0], [1.0, 0.0, 5.0]])


@pytest.mark.parametrize("name", ["mse", "l1"])
def test_perfect_prediction_gives_zero(name):
    targets, _, labeled = random_case(7)
    got = losses.get(name)(predictions=targets, targets=targets, labeled=labeled)
    np.testing.assert_array_equal(np.asarray(got), 0.0)


@pytest.mark.parametrize("name", losses.NAMES)
def test_jit_equals_plain_and_does_not_retrace(name):
    fn = losses.get(name)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(predictions, targets, labeled):
        return fn(predictions=predictions, targets=targets, labeled=labeled)

    for seed in range(3):
        targets, predictions, labeled = random_case(seed)
        plain = fn(predictions=predictions, targets=targets, labeled=labeled)
        np.testing.assert_allclose(
            np.asarray(jitted(predictions, targets, labeled)), np.asarray(plain), rtol=1e-6
        )
    chex.clear_trace_counter()


def test_zero_weight_layer_gets_zero_gradient():
    targets, predictions, labeled = random_case(3)
    labeled[:] = False
    labeled[:, 4] = True
    targets = np.minimum(targets, 0.4)  # no hot pixel in any layer, so l3's rule 1 never fires
    targets[..., 3] = 0.0
    targets[..., 5] = 0.0
    for name in ("l2", "l3"):
        fn = losses.get(name)
        grad = jax.grad(
            lambda p, fn=fn: losses.mean(fn(predictions=p, targets=targets, labeled=labeled))
        )(jnp.asarray(predictions))
        grad = np.asarray(grad)
        assert np.all(grad[..., [3, 5]] == 0.0), name  # rule 3: weight 0 beside layer 4
        assert np.all(np.abs(grad[..., 4]) > 0.0), name


def test_l3_punishes_hotspot_copied_into_another_layer():
    size, k_size = 9, 13
    targets = np.zeros((1, size, size, k_size), np.float32)
    labeled = np.zeros((1, k_size), bool)
    labeled[0, 5:8] = True  # T9..T11 labelled, T8 and T12 unlabelled beside them
    for k, col in zip(range(5, 8), (1, 4, 7), strict=True):
        targets[0, 4, col, k] = 1.0
    clean = targets.copy()
    copied = targets.copy()
    copied[0, 4, 4, 4] = 1.0  # layer 4 (unlabelled, beside 5) copies layer 6's hotspot
    values = {}
    for name in ("l2", "l3"):
        fn = losses.get(name)
        values[name] = [
            float(fn(predictions=p, targets=targets, labeled=labeled)[0]) for p in (clean, copied)
        ]
    assert values["l2"][0] == values["l2"][1] == 0.0  # rule 3 ignores layer 4 entirely
    assert values["l3"][0] == 0.0
    np.testing.assert_allclose(values["l3"][1], 10.0 / (size * size * k_size), rtol=1e-6)


def test_unknown_name_lists_valid_ones():
    for make in (losses.get, losses.reference, losses.rule_for):
        with pytest.raises(ValueError, match=r"unknown loss 'l4': expected one of mse, l1, l2, l3"):
            make("l4")
    with pytest.raises(ValueError, match="mse, l1, l2, l3"):
        losses.weights("l4", targets=np.zeros((1, 2, 2, 3)), labeled=np.ones((1, 3), bool))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        losses.get("l2")(
            predictions=np.zeros((1, 2, 2, 3)),
            targets=np.zeros((1, 2, 2, 3)),
            labeled=np.ones((1, 2)),
        )


def test_mean_with_mask_skips_padding():
    per_example = jnp.array([1.0, 3.0, 100.0])
    assert float(losses.mean(per_example)) == pytest.approx(104.0 / 3)
    assert float(losses.mean(per_example, jnp.array([True, True, False]))) == pytest.approx(2.0)
    assert float(losses.mean(per_example, jnp.zeros(3, bool))) == 0.0
