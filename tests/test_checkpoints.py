"""Tests for vertjax.checkpoints: round trip, data position, keep/best logic."""

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.training import train_state

from vertjax import checkpoints


def _state(features: int = 3, seed: int = 0) -> train_state.TrainState:
    model = nn.Dense(features)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 2)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(0.1))


def _trained(state: train_state.TrainState, steps: int) -> train_state.TrainState:
    for _ in range(steps):
        grads = jax.tree.map(jnp.ones_like, state.params)
        state = state.apply_gradients(grads=grads)
    return state


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).repeat(None).batch(3).to_iter_dataset())


def _config():
    config = ml_collections.ConfigDict()
    config.name = "unit"
    config.model = ml_collections.ConfigDict({"features": 3})
    return config


def test_round_trip_restores_state_structure_and_data_position(tmp_path):
    state = _trained(_state(), 3)
    data = _iterator()
    for _ in range(4):
        next(data)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(3, state=state, data_iterator=data, config=_config(), meta={"train_seconds": 1.5})
    expected_next = [next(data).tolist() for _ in range(2)]

    fresh_data = _iterator()
    restored, meta = ckpt.restore(3, state=_state(seed=1), data_iterator=fresh_data)
    assert isinstance(restored, train_state.TrainState)
    assert int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
    assert meta == {"train_seconds": 1.5}
    assert [next(fresh_data).tolist() for _ in range(2)] == expected_next
    assert ckpt.restore_config(3)["model"] == {"features": 3}
    ckpt.close()


def test_keeps_latest_n_and_the_best(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    state, data = _state(), _iterator()
    accuracies = {1: 0.1, 2: 0.9, 3: 0.3, 4: None, 5: 0.2, 6: 0.4}
    for step, acc in accuracies.items():
        metrics = None if acc is None else {"id_accuracy": acc, "rmse_px": 1.0}
        ckpt.save(step, state=state, data_iterator=data, config=_config(), meta={}, metrics=metrics)
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert ckpt.resolve("best") == 2
    assert ckpt.resolve("latest") == 6
    assert ckpt.resolve("5") == 5
    with pytest.raises(ValueError, match="not in"):
        ckpt.resolve("3")
    with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
        ckpt.resolve("newest")
    ckpt.close()
    # A new manager over the same directory sees the same steps and best.
    for read_only in (False, True):
        again = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2, read_only=read_only)
        assert again.all_steps() == [2, 5, 6] and again.best_step() == 2
        again.close()


def test_empty_directory_has_nothing_to_resolve(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    assert ckpt.latest_step() is None
    with pytest.raises(ValueError, match="no checkpoints"):
        ckpt.resolve("best")
    ckpt.close()


def test_restoring_into_a_different_model_is_a_clear_error(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(1, state=_state(3), data_iterator=_iterator(), config=_config(), meta={})
    with pytest.raises(
        ValueError, match=r"params.bias is \(3,\) in the checkpoint and \(5,\) in the model"
    ):
        ckpt.restore(1, state=_state(5))
    ckpt.close()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints"):
        checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=0)


def test_restores_into_an_abstract_template_without_shardings(tmp_path):
    state = _trained(_state(), 2)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(2, state=state, data_iterator=_iterator(), config=_config(), meta={"a": 1})
    ckpt.close()
    reader = checkpoints.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    template = jax.eval_shape(_state)
    restored, meta = reader.restore(reader.resolve("latest"), state=template)
    reader.close()
    assert meta == {"a": 1} and int(restored.step) == 2
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_an_undefined_accuracy_is_never_the_best(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    for step, acc in ((1, 0.0), (2, float("nan")), (3, 0.0)):
        ckpt.save(
            step,
            state=_state(),
            data_iterator=_iterator(),
            config=_config(),
            meta={},
            metrics={"id_accuracy": acc},
        )
    assert ckpt.best_step() in (1, 3) and 2 not in ckpt.all_steps()
    ckpt.close()
