"""Tests for vertjax.losses against hand-worked values and a slow loop reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vertjax import losses


def reference_loss(name: str, targets: np.ndarray, predictions: np.ndarray, labeled: np.ndarray):
    """Appendix B, pixel by pixel, straight from the table (first rule wins)."""
    b_size, height, width, k_size = targets.shape
    out = np.zeros(b_size)
    for b in range(b_size):

        def is_labelled(k, b=b):
            return 0 <= k < k_size and bool(labeled[b, k])

        total = 0.0
        for k in range(k_size):
            for i in range(height):
                for j in range(width):
                    y, p = float(targets[b, i, j, k]), float(predictions[b, i, j, k])
                    if name == "mse":
                        w = 1.0
                    elif name == "l1":
                        w = 10.0 if y >= 0.5 else 1.0
                    else:
                        hot = max(targets[b, i, j, :]) >= 0.5 if name == "l3" else y >= 0.5
                        here, before, after = is_labelled(k), is_labelled(k - 1), is_labelled(k + 1)
                        if hot:
                            w = 10.0
                        elif not here and not before and not after:
                            w = 5.0
                        elif not here and (before or after):
                            w = 0.0
                        else:
                            w = 1.0
                    total += w * (y - p) ** 2
        out[b] = total / (height * width * k_size)
    return out


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


@pytest.mark.parametrize("name", losses.NAMES)
def test_matches_loop_reference_on_random_inputs(name):
    for seed in range(3):
        targets, predictions, labeled = random_case(seed)
        got = losses.get(name)(predictions=predictions, targets=targets, labeled=labeled)
        want = reference_loss(name, targets, predictions, labeled)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


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
    with pytest.raises(ValueError, match="mse, l1, l2, l3"):
        losses.get("l4")


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
