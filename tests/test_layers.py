"""Tests for vertjax.layers: each layer computes what flax's or jax's own computes.

Values, input gradients and parameter gradients are compared, and for the
layers with parameters also the parameter names, shapes and initial values,
so that checkpoints carry over.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vertjax import layers


def _grad_of_weighted_sum(fn, x):
    weights = jax.random.normal(jax.random.PRNGKey(7), jax.eval_shape(fn, x).shape)
    return jax.grad(lambda v: jnp.sum(fn(v) * weights))(x)


def test_max_pool_matches_flax_including_ties():
    # Integers in a small range give many tied maxima in the 2x2 windows.
    x = jax.random.randint(jax.random.PRNGKey(0), (2, 6, 8, 3), 0, 3).astype(jnp.float32)
    reference = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(layers.max_pool_2x2(x), reference(x))
    np.testing.assert_array_equal(
        _grad_of_weighted_sum(layers.max_pool_2x2, x), _grad_of_weighted_sum(reference, x)
    )


def test_upsample_matches_nearest_resize():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))

    def reference(v):
        return jax.image.resize(v, (2, 10, 14, 3), method="nearest")

    np.testing.assert_array_equal(layers.upsample_2x(x), reference(x))
    # The gradient sums each 2x2 block, in another order than the scatter-add.
    np.testing.assert_allclose(
        _grad_of_weighted_sum(layers.upsample_2x, x),
        _grad_of_weighted_sum(reference, x),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: layers.GroupNorm(num_groups=4), "GroupNorm"),
        (lambda: layers.ConvTranspose2x2(5), "ConvTranspose"),
    ],
    ids=["group_norm", "conv_transpose"],
)
def test_layers_match_flax(ours, theirs):
    reference = {
        "GroupNorm": lambda: nn.GroupNorm(num_groups=4),
        "ConvTranspose": lambda: nn.ConvTranspose(5, (2, 2), strides=(2, 2)),
    }[theirs]()
    layer = ours()
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10, 8)) + 1.0
    # The same parameter tree and initial values: checkpoints carry over.
    params = reference.init(jax.random.PRNGKey(1), x)
    mine = layer.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Random parameters so that the scale/bias and kernel gradients are general.
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x), atol=2e-5)
    for ours_grad, their_grad in [
        (
            _grad_of_weighted_sum(lambda v: layer.apply(params, v), x),
            _grad_of_weighted_sum(lambda v: reference.apply(params, v), x),
        ),
        *zip(
            jax.tree.leaves(jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x))))(params)),
            jax.tree.leaves(jax.grad(lambda p: jnp.sum(jnp.sin(reference.apply(p, x))))(params)),
            strict=True,
        ),
    ]:
        np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (layers.max_pool_2x2, (1, 5, 8, 3), "even H and W"),
        (layers.max_pool_2x2, (5, 8, 3), "even H and W"),
        (
            lambda x: layers.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x),
            (1, 4, 4, 6),
            "divisible by 4",
        ),
    ],
    ids=["odd_height", "three_axes", "group_norm_channels"],
)
def test_bad_shapes_raise(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer(jnp.zeros(shape))
