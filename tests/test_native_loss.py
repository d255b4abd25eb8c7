"""The one-sweep CPU loss kernel equals the definition (`losses.reference`)."""

from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from vertjax import config_checks, losses, native_loss, train

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler"
)


def _inputs(batch: int, height: int, width: int, layers: int, seed: int = 0):
    """Predictions near Gaussian targets (hot pixels included) and a labelled run of layers."""
    rng = np.random.default_rng(seed)
    labeled = np.zeros((batch, layers), bool)
    for b in range(batch):
        first = rng.integers(0, layers - 2)
        labeled[b, first : first + rng.integers(2, layers - first + 1)] = True
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    centres = rng.uniform(0.2, 0.8, (batch, layers, 2)) * (height, width)
    targets = (
        np.exp(
            -((yy[None, :, :, None] - centres[:, None, None, :, 0]) ** 2) / 8.0
            - (xx[None, :, :, None] - centres[:, None, None, :, 1]) ** 2 / 8.0
        ).astype(np.float32)
        * labeled[:, None, None, :]
    )
    predictions = targets + rng.normal(0.0, 0.2, targets.shape).astype(np.float32)
    return jnp.asarray(predictions), jnp.asarray(targets), jnp.asarray(labeled)


@pytest.mark.parametrize("layers", [13, 5])
@pytest.mark.parametrize("name", losses.NAMES)
def test_value_and_gradients_equal_the_reference(name, layers):
    predictions, targets, labeled = _inputs(3, 21, 34, layers)
    assert bool(jnp.any(targets >= losses.HOT_THRESHOLD))  # rule 1 is exercised
    for mask in (None, jnp.array([True, False, True])):

        def reference(p, y, mask=mask):
            return losses.mean(
                losses.reference(name)(predictions=p, targets=y, labeled=labeled), mask
            )

        def native(p, y, mask=mask):
            return native_loss.batch_mean(name)(
                predictions=p, targets=y, labeled=labeled, mask=mask
            )

        value, (d_pred, d_target) = jax.jit(jax.value_and_grad(native, argnums=(0, 1)))(
            predictions, targets
        )
        ref_value, (ref_pred, ref_target) = jax.value_and_grad(reference, argnums=(0, 1))(
            predictions, targets
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        scale = float(jnp.max(jnp.abs(ref_pred)))
        np.testing.assert_allclose(d_pred, ref_pred, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(d_target, ref_target, rtol=0, atol=1e-6 * scale)
        if mask is not None:  # the padded example gets no gradient
            assert not np.any(np.asarray(d_pred[1]))


def test_the_train_steps_loss_is_the_same_with_either_kernel():
    config = test_config.get_config()
    config.loss = "l2"
    predictions, targets, labeled = _inputs(2, 16, 16, 13, seed=1)
    step = {}
    for kernel in config_checks.LOSS_KERNELS:
        config.loss_kernel = kernel
        loss = functools.partial(train.batch_loss(config), targets=targets, labeled=labeled)
        step[kernel] = jax.jit(jax.value_and_grad(lambda p, loss=loss: loss(predictions=p)))(
            predictions
        )
    np.testing.assert_allclose(step["native"][0], step["xla"][0], rtol=1e-6)
    np.testing.assert_allclose(step["native"][1], step["xla"][1], rtol=1e-5, atol=1e-9)


def test_an_unknown_kernel_is_refused():
    config = test_config.get_config()
    config.loss_kernel = "fast"
    with pytest.raises(ValueError, match="config.loss_kernel: unknown loss kernel 'fast'"):
        config_checks.check(config)


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("VERTJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(native_loss.NativeLossError, match="no-such-compiler\\+\\+.*not found"):
        native_loss.library_path()
    assert not any(tmp_path.rglob("*.so"))


def test_the_kernel_is_refused_off_a_single_cpu_device(monkeypatch):
    config = test_config.get_config()
    config.loss_kernel = "native"
    config_checks.checked_mesh(config)  # one CPU device here: accepted
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="runs on one CPU device.*use loss_kernel='xla'"):
        config_checks.checked_mesh(config)
