"""Tests for benchmarks.ensemble: the members' heatmaps are averaged, not picked or summed."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state

from benchmarks import ensemble
from configs import test as test_config
from vertjax import checkpoints, runs, vertebrae


def _constant_run(path, data_dir, level, *, features=4):
    """A run folder whose network outputs `level` everywhere, in every heatmap.

    The output layer's kernel is zeroed and its bias set to `level`, so each
    vertebra's confidence is exactly `level`: present alone when level >= 0.5.
    """
    config = test_config.get_config()
    config.dataset.data_dir = data_dir
    config.model.features = features
    # Shapes from the real model, values drawn here: no compilation to initialise.
    shapes = jax.eval_shape(lambda: runs.create_train_state(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), dict(shapes.params)
    )
    (out_layer,) = [
        k for k, v in params.items() if v.get("bias", np.zeros(0)).shape == (vertebrae.K,)
    ]
    params[out_layer] = {
        "kernel": jnp.zeros_like(params[out_layer]["kernel"]),
        "bias": jnp.full((vertebrae.K,), level, jnp.float32),
    }
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=runs.make_optimizer(config)
    )
    ckpt = checkpoints.Checkpointer(str(path / "checkpoints"), keep=1)
    ckpt.save(
        6,
        state=state,
        data_iterator=iter(grain.MapDataset.range(4).to_iter_dataset()),
        config=config,
        meta={"train_seconds": 1.0, "validation": None},
        metrics={"id_accuracy": 0.0},
    )
    ckpt.close()
    return str(path)


def _recall(rows, weights):
    (row,) = [r for r in rows if r["weights"] == weights]
    return row["presence_recall"]


def test_the_ensemble_averages_the_members_heatmaps(tmp_path, data_dir):
    high, low = (_constant_run(tmp_path / n, data_dir, v) for n, v in (("a", 0.9), ("b", 0.3)))
    rows = ensemble.evaluate_ensemble([high, low], "latest", ["validation"])
    # 0.9 alone is present, 0.3 alone is not; their mean, 0.6, is.
    assert (_recall(rows, "0"), _recall(rows, "1"), _recall(rows, "ensemble")) == (1.0, 0.0, 1.0)

    mid, lower = (_constant_run(tmp_path / n, data_dir, v) for n, v in (("c", 0.6), ("d", 0.2)))
    rows = ensemble.evaluate_ensemble([mid, lower], "latest", ["validation"])
    # 0.6 alone is present; the mean 0.4 is not (a maximum or a sum would be).
    assert (_recall(rows, "0"), _recall(rows, "ensemble")) == (1.0, 0.0)
    assert {r["split"] for r in rows} == {"validation"} and len(rows) == 3


def test_runs_of_another_shape_are_refused_by_name(tmp_path, data_dir):
    a = _constant_run(tmp_path / "a", data_dir, 0.9)
    wider = _constant_run(tmp_path / "wider", data_dir, 0.9, features=8)
    with pytest.raises(ValueError, match=r"wider: config.model differs"):
        ensemble.evaluate_ensemble([a, wider], "latest", ["validation"])
