"""Tests for vertjax.models: output shapes, gradients and options of the U-Net."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from vertjax import config_checks, models

# These tests check shapes and gradients, not speed: XLA's backend optimisation
# costs more CPU time in compiling a U-Net than the tests spend running it.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def init_and_grad(model: models.UNet, height: int, width: int, batch: int = 1):
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, 1))
    # Jitted: op-by-op dispatch of a U-Net's init and backward pass is far slower.
    params = fast_jit(model.init)(jax.random.PRNGKey(1), images)

    def loss(p):
        out = model.apply(p, images, train=True)
        return jnp.mean(jnp.square(out - 0.5)), out

    (value, out), grads = fast_jit(jax.value_and_grad(loss, has_aux=True))(params)
    return params, out, value, grads


def assert_finite_nonzero(grads):
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0.0


@pytest.mark.parametrize("upsample", models.UPSAMPLES)
@pytest.mark.parametrize("size", [(264, 264), (100, 72)])
def test_output_shape_and_finite_gradients(upsample, size):
    model = models.tiny(upsample=upsample)
    _, out, value, grads = init_and_grad(model, *size)
    assert out.shape == (1, *size, 13) and out.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert_finite_nonzero(grads)


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_other_norms(norm):
    _, out, _, grads = init_and_grad(models.tiny(norm=norm, activation="gelu"), 12, 20)
    assert out.shape == (1, 12, 20, 13)
    assert_finite_nonzero(grads)


def test_deep_options():
    model = models.UNet(
        num_outputs=3,
        features=4,
        depth=6,
        max_features=8,
        activation="silu",
        bottleneck_dilations=(1, 2),
        global_context=True,
        coord_channels=True,
    )
    params, out, _, grads = init_and_grad(model, 37, 50, batch=2)
    assert out.shape == (2, 37, 50, 3)
    assert_finite_nonzero(grads)
    # max_features caps the deepest level's channels.
    assert params["params"]["ConvBlock_6"]["Conv_0"]["kernel"].shape[-1] == 8
    assert "Dense_0" in params["params"]  # the global-context block
    # The image plus its row and column channels.
    assert params["params"]["ConvBlock_0"]["Conv_0"]["kernel"].shape[2] == 3


def test_zero_init_output_starts_at_bias():
    model = models.tiny(zero_init_output=True, output_bias_init=-2.0)
    images = jnp.ones((1, 20, 24, 1))
    out = fast_jit(model.apply)(fast_jit(model.init)(jax.random.PRNGKey(0), images), images)
    np.testing.assert_array_equal(np.asarray(out), -2.0)


def test_padding_keeps_image_content_aligned():
    # A one-pixel impulse must influence the output around its own position,
    # not a shifted one, whatever the padding to a multiple of 2**depth.
    model = models.tiny(norm="none")
    images = jnp.zeros((1, 30, 22, 1))
    params = fast_jit(model.init)(jax.random.PRNGKey(0), images)
    apply = fast_jit(model.apply)
    base = apply(params, images)
    poked = apply(params, images.at[0, 10, 7, 0].set(50.0))
    change = np.abs(np.asarray(poked - base)).sum(axis=(0, 3))
    row, col = np.unravel_index(np.argmax(change), change.shape)
    assert abs(row - 10) <= 3 and abs(col - 7) <= 3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("norm", "batch", "config.model.norm: unknown norm 'batch': expected one of group, layer"),
        ("upsample", "bilinear", "unknown upsample 'bilinear': expected one of resize, transpose"),
        ("activation", "tanh", "unknown activation 'tanh'"),
        ("dtype", "float16", "unknown dtype 'float16': expected one of bfloat16, float32"),
        ("depth", 7, "config.model.depth must be between 1 and 6"),
    ],
)
def test_bad_model_options_are_refused_by_the_config_checks(field, value, message):
    config = test_config.get_config()
    config.model[field] = value
    with pytest.raises(ValueError, match=message):
        config_checks.check(config)


def test_transposed_up_sampling_keeps_the_parameter_names():
    model = models.tiny(upsample="transpose")
    params = fast_jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))["params"]
    assert {"ConvTranspose_0", "ConvTranspose_1"} <= set(params)
    assert params["ConvTranspose_0"]["kernel"].shape == (2, 2, 16, 8)


def test_heatmaps_of_averages_with_the_mirrored_image_mirrored_back():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)

    def apply(variables, x):  # a position-dependent "network": mirroring changes it
        return jnp.concatenate([x, x * variables["ramp"]], axis=-1)

    variables = {"ramp": jnp.arange(8.0)[None, None, :, None]}
    plain = models.heatmaps_of(apply, variables, images, flip=False)
    both = models.heatmaps_of(apply, variables, images, flip=True)
    np.testing.assert_allclose(both[..., 0], images[..., 0], rtol=1e-6)  # mirror-symmetric part
    expected = 0.5 * (images[..., 0] * jnp.arange(8.0) + images[..., 0] * jnp.arange(8.0)[::-1])
    np.testing.assert_allclose(both[..., 1], expected, rtol=1e-5)
    assert not np.allclose(plain[..., 1], both[..., 1])
