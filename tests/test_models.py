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


@pytest.mark.parametrize("stem", models.STEMS)
@pytest.mark.parametrize("upsample", models.UPSAMPLES)
@pytest.mark.parametrize("size", [(264, 264), (100, 72)])
def test_output_shape_and_finite_gradients(stem, upsample, size):
    model = models.tiny(upsample=upsample, stem=stem)
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


@pytest.mark.parametrize("stem", models.STEMS)
def test_padding_keeps_image_content_aligned(stem):
    # A one-pixel impulse must influence the output around its own position
    # (the centroid of the change), not a shifted one, whatever the padding
    # to a multiple of 2**depth.
    model = models.tiny(norm="none", stem=stem)
    images = jnp.zeros((1, 30, 22, 1))
    params = fast_jit(model.init)(jax.random.PRNGKey(0), images)
    apply = fast_jit(model.apply)
    base = apply(params, images)
    # Poked both ways: the patch stem sees a pixel through one kernel tap per
    # channel, which the activation may zero for one sign but not for both.
    change = sum(
        np.abs(np.asarray(apply(params, images.at[0, 10, 7, 0].set(value)) - base)).sum(axis=(0, 3))
        for value in (50.0, -50.0)
    )
    rows, cols = np.indices(change.shape)
    row, col = (rows * change).sum() / change.sum(), (cols * change).sum() / change.sum()
    assert abs(row - 10) <= 3 and abs(col - 7) <= 3


def test_patch_stem_convolves_nothing_at_full_resolution():
    model = models.tiny(stem="patch", zero_init_output=True)
    images = jnp.zeros((1, 16, 24, 1))
    params = fast_jit(model.init)(jax.random.PRNGKey(0), images)["params"]
    # In: one 2x2 stride-2 convolution from the image to the first width.
    assert params["PatchStem"]["kernel"].shape == (2, 2, 1, 4)
    # Conv blocks at half resolution and below only: the first one (level 1)
    # reads the patch features and widens them.
    assert params["ConvBlock_0"]["Conv_0"]["kernel"].shape == (3, 3, 4, 8)
    assert len([k for k in params if k.startswith("ConvBlock")]) == 3  # levels 1, 2, up 1
    # Out: a sub-pixel layer, 4 x 13 channels per half-resolution cell; pixel
    # (2i + dy, 2j + dx) of heatmap k reads channel (2 dy + dx) * 13 + k.
    (output,) = [
        k for k, v in params.items() if v.get("kernel", np.zeros(0)).shape == (1, 1, 8, 52)
    ]
    params[output]["bias"] = jnp.arange(52.0)
    out = np.asarray(fast_jit(model.apply)({"params": params}, images))
    for dy in range(2):
        for dx in range(2):
            expected = (2 * dy + dx) * 13 + np.arange(13.0)
            np.testing.assert_array_equal(
                out[0, dy::2, dx::2], np.broadcast_to(expected, (8, 12, 13))
            )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("norm", "batch", "config.model.norm: unknown norm 'batch': expected one of group, layer"),
        ("upsample", "bilinear", "unknown upsample 'bilinear': expected one of resize, transpose"),
        ("activation", "tanh", "unknown activation 'tanh'"),
        ("dtype", "float16", "unknown dtype 'float16': expected one of bfloat16, float32"),
        ("depth", 7, "config.model.depth must be between 1 and 6"),
        ("stem", "pixel", "config.model.stem: unknown stem 'pixel': expected one of conv, patch"),
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
