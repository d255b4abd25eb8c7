"""Tests for vertjax.train: schedules, augmentation, the train step, the loop."""

import functools
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from configs import test as test_config
from vertjax import augment, checkpoints, config_checks, datasets, losses, runs, sharding, train

S = 32


class _Tiny(nn.Module):
    """A 3x3 convolution to 13 layers: enough to exercise the train step."""

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        return nn.Conv(13, (3, 3))(images)


def _batch(seed=0, b=2):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(b, S, S, 1)).astype(np.float32),
        "centroids": rng.uniform(0.2, 0.8, size=(b, 13, 2)).astype(np.float32),
        "labeled": rng.uniform(size=(b, 13)) < 0.7,
    }


def _state(lr=1e-2):
    model = _Tiny()
    params = model.init(jax.random.key(0), jnp.zeros((1, S, S, 1)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(lr))
    return state.replace(step=jnp.zeros((), jnp.int32))


def _step(aug=None, loss="l3"):
    return functools.partial(
        train.train_step,
        batch_loss=lambda **inputs: losses.mean(losses.get(loss)(**inputs)),
        image_size=S,
        sigma=2.0,
        sigma_start=2.0,
        sigma_decay_steps=0,
        learning_rate_fn=lambda step: 1e-2,
        aug=aug,
    )


def test_learning_rate_warms_up_then_decays():
    config = test_config.get_config()
    config.train_steps = 110
    config.optimizer.learning_rate = 1.0
    config.optimizer.warmup_steps = 10
    config.optimizer.end_learning_rate_factor = 0.1
    for decay, end in (("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)):
        config.optimizer.decay = decay
        lr = runs.make_learning_rate(config)
        assert float(lr(0)) == 0.0
        assert float(lr(5)) == pytest.approx(0.5)
        assert float(lr(10)) == pytest.approx(1.0)
        assert float(lr(110)) == pytest.approx(end, rel=1e-5)
    config.optimizer.decay = "step"
    with pytest.raises(ValueError, match="config.optimizer.decay: unknown decay 'step'"):
        config_checks.check(config)


def test_sigma_schedule_narrows_linearly_then_holds():
    at = functools.partial(train.sigma_at, sigma=2.0, sigma_start=10.0, decay_steps=100)
    assert float(at(jnp.array(0))) == 10.0
    assert float(at(jnp.array(50))) == pytest.approx(6.0)
    assert float(at(jnp.array(500))) == 2.0
    assert float(train.sigma_at(jnp.array(7), sigma=3.0, sigma_start=9.0, decay_steps=0)) == 3.0


def test_augment_with_zero_ranges_is_the_identity():
    batch = _batch()
    images, points, labeled = augment.augment(
        jax.random.key(0),
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["centroids"] * S),
        jnp.asarray(batch["labeled"]),
        augment.Augment(),
    )
    np.testing.assert_allclose(images, batch["image"], atol=1e-5)
    np.testing.assert_allclose(points, batch["centroids"] * S, atol=1e-4)
    np.testing.assert_array_equal(labeled, batch["labeled"])


def test_augment_moves_image_and_centroids_together():
    # A bright 3x3 spot at pixel (row 8, col 20): centre (20.5, 8.5).
    image = np.zeros((1, S, S, 1), np.float32)
    image[0, 7:10, 19:22, 0] = 1.0
    points = np.zeros((1, 13, 2), np.float32)
    points[0, 0] = (20.5, 8.5)
    aug = augment.Augment(rotate_degrees=20.0, scale=0.2, shift=0.1)
    for seed in range(3):
        out, moved, _ = augment.augment(
            jax.random.key(seed),
            jnp.asarray(image),
            jnp.asarray(points),
            jnp.ones((1, 13), bool),
            aug,
        )
        out = np.asarray(out[0, ..., 0])
        rows, cols = np.nonzero(out > 0.5 * out.max())
        weights = out[rows, cols]
        spot = np.array(
            [np.average(cols + 0.5, weights=weights), np.average(rows + 0.5, weights=weights)]
        )
        np.testing.assert_allclose(spot, np.asarray(moved[0, 0]), atol=0.6)
        assert not np.allclose(moved[0, 0], points[0, 0], atol=0.5)


def test_augment_unlabels_centroids_moved_outside():
    points = np.full((1, 13, 2), S / 2, np.float32)
    points[0, 0] = (0.5, 0.5)  # at the corner: any inward push keeps it, outward loses it
    aug = augment.Augment(shift=0.3)
    outside = []
    for seed in range(20):
        _, moved, labeled = augment.augment(
            jax.random.key(seed),
            jnp.zeros((1, S, S, 1)),
            jnp.asarray(points),
            jnp.ones((1, 13), bool),
            aug,
        )
        inside = bool(np.all((np.asarray(moved[0, 0]) >= 0) & (np.asarray(moved[0, 0]) < S)))
        assert bool(labeled[0, 0]) == inside
        outside.append(not inside)
    assert any(outside) and not all(outside)


def test_train_step_reduces_the_loss_and_reports_metrics():
    step = jax.jit(_step(), donate_argnums=0)
    state, batch = _state(), jax.tree.map(jnp.asarray, _batch())
    rng = jax.random.key(0)
    state, first = step(state, batch, rng)
    for _ in range(20):
        state, m = step(state, batch, rng)
    assert set(first) == {"loss", "grad_norm", "learning_rate", "sigma"}
    assert int(state.step) == 21
    assert step._cache_size() == 1  # the step number and sigma are traced, not retraced
    assert float(m["loss"]) < float(first["loss"])
    assert float(first["sigma"]) == 2.0


def test_train_step_matches_the_loss_module_on_rendered_targets():
    from vertjax import heatmaps

    state, batch = _state(), jax.tree.map(jnp.asarray, _batch(seed=3))
    _, m = jax.jit(_step(loss="l2"))(state, batch, jax.random.key(0))
    targets = heatmaps.render(
        batch["centroids"] * S, batch["labeled"], height=S, width=S, sigma=2.0
    )
    predictions = state.apply_fn({"params": state.params}, batch["image"])
    expected = losses.mean(
        losses.get("l2")(predictions=predictions, targets=targets, labeled=batch["labeled"])
    )
    np.testing.assert_allclose(float(m["loss"]), float(expected), rtol=1e-5)


def test_train_step_with_augmentation_depends_on_the_step_only():
    aug = augment.Augment(rotate_degrees=5.0, shift=0.05, contrast=0.1, gamma=0.2)
    step = jax.jit(_step(aug=aug))
    batch, rng = jax.tree.map(jnp.asarray, _batch()), jax.random.key(1)
    _, a = step(_state(), batch, rng)
    _, b = step(_state(), batch, rng)
    later = _state().replace(step=jnp.asarray(5, jnp.int32))
    _, c = step(later, batch, rng)
    assert float(a["loss"]) == float(b["loss"])
    assert float(a["loss"]) != float(c["loss"])


def test_non_finite_loss_names_the_first_bad_step():
    pending = [
        (4, {"loss": jnp.array(1.0)}),
        (5, {"loss": jnp.array(jnp.nan)}),
        (6, {"loss": jnp.array(jnp.inf)}),
    ]
    with pytest.raises(train.NonFiniteLossError, match="at step 5"):
        train._check_finite(pending)
    ok = train._check_finite([(1, {"loss": jnp.array(2.0)})])
    assert ok == [(1, {"loss": 2.0})]


def test_batch_size_must_divide_over_the_data_axis():
    mesh = types.SimpleNamespace(shape={"data": 8})
    sharding.check_batch_size(16, mesh)
    with pytest.raises(
        ValueError, match=r"config.batch_size=12 must be a positive multiple of the 8"
    ):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="available"):
        sharding.make_mesh(jax.device_count() + 1)


def test_unknown_loss_is_refused_before_any_work(tmp_path):
    config = test_config.get_config()
    config.loss = "l4"
    with pytest.raises(ValueError, match="unknown loss 'l4'"):
        train.train(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path, monkeypatch, data_dir):
    # A NaN pixel mean makes every image NaN, so the loss is NaN from step 1.
    monkeypatch.setattr(datasets, "pixel_stats", lambda builder: (float("nan"), 1.0))
    config = test_config.get_config()
    config.dataset.data_dir = data_dir
    with pytest.raises(train.NonFiniteLossError, match="at step 1"):
        train.train(config, str(tmp_path))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    assert ckpt.all_steps() == []
    ckpt.close()


def test_augment_flip_mirrors_image_and_centroids_together():
    image = np.zeros((1, S, S, 1), np.float32)
    image[0, 7:10, 4:7, 0] = 1.0  # a spot centred at (5.5, 8.5)
    points = np.zeros((1, 13, 2), np.float32)
    points[0, 0] = (5.5, 8.5)
    mirrored = []
    for seed in range(12):
        out, moved, labeled = augment.augment(
            jax.random.key(seed),
            jnp.asarray(image),
            jnp.asarray(points),
            jnp.ones((1, 13), bool),
            augment.Augment(flip=True),
        )
        flipped = bool(np.asarray(moved[0, 0, 0]) > S / 2)
        mirrored.append(flipped)
        expected_image = image[:, :, ::-1] if flipped else image
        expected_point = (S - 5.5, 8.5) if flipped else (5.5, 8.5)
        np.testing.assert_allclose(np.asarray(out), expected_image, atol=1e-5)
        np.testing.assert_allclose(np.asarray(moved[0, 0]), expected_point, atol=1e-4)
        assert bool(labeled[0, 0])
    assert any(mirrored) and not all(mirrored)


def test_augment_without_flip_keeps_its_random_stream():
    """Turning the mirror off draws exactly the numbers it drew before the mirror existed."""
    aug = augment.Augment(rotate_degrees=10.0, shift=0.1)
    points = jnp.full((1, 13, 2), S / 2.0)
    _, moved, _ = augment.augment(
        jax.random.key(4), jnp.zeros((1, S, S, 1)), points, jnp.ones((1, 13), bool), aug
    )
    u = jax.random.uniform(jax.random.split(jax.random.key(4), 1)[0], (7,), minval=-1.0, maxval=1.0)
    np.testing.assert_allclose(
        np.asarray(moved[0, 0]), S / 2.0 + np.asarray(u[2:4]) * 0.1 * S, atol=1e-4
    )


def test_train_step_keeps_a_moving_average_of_the_parameters():
    model = _Tiny()
    params = model.init(jax.random.key(0), jnp.zeros((1, S, S, 1)))["params"]
    state = runs.EmaTrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.adam(1e-2),
        ema_params=jax.tree.map(jnp.copy, params),
    ).replace(step=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(_step(), ema_decay=0.9))
    batch, rng = jax.tree.map(jnp.asarray, _batch()), jax.random.key(0)
    first, _ = step(state, batch, rng)
    # Step 0 averages with weight min(0.9, 1/10) on the old average.
    expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, params, first.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), first.ema_params, expected
    )
    later = first
    for _ in range(30):
        later, _ = step(later, batch, rng)
    assert runs.inference_params(later) is later.ema_params
    gap = jax.tree.leaves(
        jax.tree.map(lambda e, p: float(jnp.abs(e - p).max()), later.ema_params, later.params)
    )
    assert max(gap) > 0  # the average lags the parameters
    plain = runs.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
    assert runs.inference_params(plain) is plain.params


def test_warm_start_takes_trained_weights_and_refuses_another_network(tmp_path):
    from vertjax import shipped

    config = test_config.get_config()
    shapes = jax.eval_shape(lambda: runs.create_train_state(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes.params)
    folder = shipped.write(
        tmp_path / "mine",
        config=config,
        params=params,
        pixel_mean=100.0,
        pixel_std=50.0,
        prior=None,
        step=6,
    )
    where = f"config.init_from={folder}"
    config.ema_decay = 0.99
    state = runs.create_train_state(config, runs.init_key(1))
    warm = train.warm_start(
        state,
        runs.trained_params(str(folder), state.params, where=where),
    )
    jax.tree.map(np.testing.assert_array_equal, warm.params, params)
    jax.tree.map(np.testing.assert_array_equal, warm.ema_params, params)
    config.ema_decay = 0.0
    plain = runs.create_train_state(config, runs.init_key(1))
    plain = train.warm_start(
        plain,
        runs.trained_params(str(folder), plain.params, where=where),
    )
    jax.tree.map(np.testing.assert_array_equal, plain.params, params)
    wider = test_config.get_config()
    wider.model.features = 8
    other = runs.create_train_state(wider, runs.init_key(1))
    with pytest.raises(ValueError, match=r"config.init_from=.*mine: parameter .* but .*configured"):
        runs.trained_params(str(folder), other.params, where=where)
    with pytest.raises(ValueError, match="neither a shipped model"):
        runs.trained_params(
            str(tmp_path / "nothing"),
            state.params,
            where=f"config.init_from={str(tmp_path / 'nothing')}",
        )
