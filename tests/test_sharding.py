"""Tests for vertjax.sharding and data-parallel training on 8 host devices.

The rules (mesh, batch check, parameter sharding, distributed start-up) are
tested in this process. The 1-device vs 8-device comparison runs this file
as a script in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts
(the pytest process has already started JAX with one CPU device): the same
batches must give the same losses, parameters and evaluation metrics, with
parameters replicated and with the 'fsdp' rule, and checkpoints must move
between 1 and 8 devices.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from vertjax import checkpoints, evaluate, input_pipeline, run_log, sharding, train
from vertjax import runs as run_lib  # `runs` names the fixture below

REPO = Path(__file__).resolve().parents[1]
S = 32  # model input side: small, so that the child compiles in seconds
STEPS = 3
P = jax.sharding.PartitionSpec


def _records(n: int, seed: int) -> list[dict]:
    """`n` records with a bright dot at each labelled centroid."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, size=(S, S, 1)).astype(np.uint8)
        y = np.linspace(0.1, 0.9, 13) + rng.uniform(-0.03, 0.03, 13)
        x = 0.5 + rng.uniform(-0.1, 0.1, 13)
        centroids = np.stack([x, y], axis=-1).astype(np.float32)
        labeled = rng.uniform(size=13) < 0.8
        for (cx, cy), on in zip(centroids, labeled, strict=True):
            if on:
                image[int(cy * S), int(cx * S), 0] = 255
        out.append(
            {
                "image": image,
                "centroids": centroids * labeled[:, None],
                "labeled": labeled,
                "truth_centroids": centroids,
                "truth_visible": np.ones(13, bool),
                "original_size": np.array([400 + i, 300], np.int32),
                "pixel_spacing_mm": np.full(2, 0.1 if i % 2 else 0.0, np.float32),
                "participant_id": f"p{i}".encode(),
                "image_id": f"i{i}".encode(),
            }
        )
    return out


TRAIN = _records(16, seed=0)
# 11 records in batches of 8: the second batch is padded, and on 8 devices
# some devices hold only padding.
VALIDATION = _records(11, seed=1)
MEAN = float(np.mean([r["image"] for r in TRAIN]))
STD = float(np.std([r["image"] for r in TRAIN]))


def _config(rule: str = "replicated") -> ml_collections.ConfigDict:
    config = test_config.get_config()
    config.image_size = S
    config.batch_size = 8
    config.eval_batch_size = 8
    config.train_steps = STEPS
    # Every step updates every layer: no warm-up, no zero-initialised output.
    config.optimizer.warmup_steps = 0
    config.model.zero_init_output = False
    config.mesh.param_sharding = rule
    # Low enough that the tiny model's wider kernels are split under 'fsdp'.
    config.mesh.fsdp_min_size = 64
    return config


def _named(tree) -> dict[str, np.ndarray]:
    """Host copies of a pytree's arrays by path name."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _train_and_evaluate(config, mesh, ckpt_dir=None):
    """STEPS train steps on TRAIN and one pass over VALIDATION, as `train.train` runs them.

    Returns (losses [STEPS], state, validation summary).
    """
    state = run_lib.create_train_state(config, run_lib.init_key(config.seed))
    state = jax.device_put(state, run_lib.state_sharding(config, mesh, state))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = train.make_train_step(config, mesh, shardings)
    rng = sharding.replicated_key(config.seed + 1, mesh)
    data = iter(
        input_pipeline.train_dataset(
            TRAIN,
            batch_size=config.batch_size,
            seed=config.seed,
            mean=MEAN,
            std=STD,
            image_size=S,
            read_threads=1,
        )
    )
    losses = []
    for _ in range(STEPS):
        state, metrics = step_fn(state, input_pipeline.put_batch(next(data), mesh), rng)
        losses.append(float(metrics["loss"]))
    evaluator = evaluate.Evaluator(
        config, mesh, apply_fn=state.apply_fn, mean=MEAN, std=STD, param_sharding=shardings.params
    )
    summary = evaluator.run(state.params, VALIDATION)
    if ckpt_dir is not None:
        ckpt = checkpoints.Checkpointer(ckpt_dir, keep=1)
        ckpt.save(STEPS, state=state, data_iterator=data, config=config, meta={})
        ckpt.close()
    return losses, state, summary


def _restore(config, mesh, ckpt_dir):
    ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
    try:
        state, _ = ckpt.restore(STEPS, state=run_lib.abstract_train_state(config, mesh))
    finally:
        ckpt.close()
    return state


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def _child(out: str, ckpt_1: str) -> None:
    """The 8-device side (run as a script): writes out/result.json and params npz files."""
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh()
    result = {}
    losses, state, summary = _train_and_evaluate(_config(), mesh, os.path.join(out, "ckpt_8"))
    result["replicated"] = {"losses": losses, "summary": _scalars(summary)}
    np.savez(os.path.join(out, "params_8.npz"), **_named(state.params))
    result["param_devices"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state)})
    batch = input_pipeline.put_batch({"image": np.zeros((8, S, S, 1), np.float32)}, mesh)
    result["batch_rows"] = sorted(s.data.shape[0] for s in batch["image"].addressable_shards)

    losses, state, summary = _train_and_evaluate(_config("fsdp"), mesh)
    result["fsdp"] = {"losses": losses, "summary": _scalars(summary)}
    np.savez(os.path.join(out, "params_fsdp.npz"), **_named(state.params))
    result["fsdp_split"] = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(state.params)
        if sharding.DATA_AXIS in x.sharding.spec
    ]

    restored = _restore(_config(), mesh, ckpt_1)
    np.savez(os.path.join(out, "restored_on_8.npz"), **_named(restored.params))
    result["restored_devices"] = sorted(
        {len(x.sharding.device_set) for x in jax.tree.leaves(restored)}
    )
    try:
        sharding.check_batch_size(12, mesh)
        result["batch_12"] = "accepted"
    except ValueError as e:
        result["batch_12"] = str(e)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


def _env_8() -> dict[str, str]:
    """The environment of a child process with 8 CPU devices."""
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-device run here, then the 8-device child; both sides' results."""
    base = tmp_path_factory.mktemp("mesh")
    mesh = sharding.make_mesh(1)
    losses, state, summary = _train_and_evaluate(_config(), mesh, str(base / "ckpt_1"))
    command = [sys.executable, __file__, str(base), str(base / "ckpt_1")]
    done = subprocess.run(
        command, cwd=REPO, env=_env_8(), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with open(base / "result.json") as f:
        child = json.load(f)
    return types.SimpleNamespace(
        base=base, losses=losses, state=state, summary=summary, child=child, mesh=mesh
    )


def _assert_params_close(expected: dict, actual, rtol=1e-5, atol=1e-6):
    assert set(expected) == set(actual)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def test_8_devices_hold_the_state_replicated_and_split_the_batch(runs):
    assert runs.child["param_devices"] == [8]  # every array replicated on all 8
    assert runs.child["batch_rows"] == [1] * 8  # the batch of 8 split one row per device


# `train.train` itself, on 8 devices in a child process and on 1 here. Every
# step updates every layer (see `_config`) and augments with keys folded from
# the step, so that a difference anywhere in the loop shows in the logged
# metrics or the saved parameters.
LOOP_STEPS = 5


class _MemoryBuilder:
    """Stands in for the TFDS builder: TRAIN and VALIDATION with their pixel statistics."""

    data_dir = "memory"
    info = types.SimpleNamespace(metadata={"pixel_mean": MEAN, "pixel_std": STD})

    def as_data_source(self, split: str) -> list[dict]:
        return {"train": TRAIN, "validation": VALIDATION}[split]


def _loop_config() -> ml_collections.ConfigDict:
    config = _config()
    config.train_steps = LOOP_STEPS
    # The smallest U-Net (one pooling, no normalisation): compiles in seconds.
    config.model.depth = 1
    config.model.norm = "none"
    config.augment.enabled = True
    config.log_every = 1
    config.eval_every = LOOP_STEPS
    config.checkpoint_every = LOOP_STEPS
    config.val_max_batches = 0  # all 11 records: the second batch is mostly padding
    return config


def _train_in_memory(workdir: str) -> None:
    """`train.train(_loop_config(), workdir)` on TRAIN and VALIDATION."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_lib, "open_dataset", lambda config, **kwargs: _MemoryBuilder())
        train.train(_loop_config(), workdir)


def _train_child(workdir: str) -> None:
    """The 8-device side of `loops` (run as a script)."""
    assert jax.device_count() == 8, jax.devices()
    _train_in_memory(workdir)


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    """Workdirs of the same training run on 1 device (this process) and on 8 (a child)."""
    base = tmp_path_factory.mktemp("loops")
    one, eight = base / "one", base / "eight"
    log_path = base / "child.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "train", str(eight)],
            cwd=REPO,
            env=_env_8(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _train_in_memory(str(one))  # meanwhile, the child trains too
            child.wait(timeout=400)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, log_path.read_text()[-4000:]
    return one, eight


def _events(workdir: Path, kind: str) -> dict[int, dict]:
    return {e["step"]: e for e in run_log.read_metrics(str(workdir)) if e["kind"] == kind}


def _saved_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The parameters of checkpoint `step`, read from its orbax files as numpy arrays."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return _named(reader.restore(path, restore_args=as_numpy)["params"])


def test_train_on_8_devices_logs_and_saves_what_1_device_does(loops):
    one, eight = loops
    steps_1, steps_8 = _events(one, "train"), _events(eight, "train")
    assert sorted(steps_1) == sorted(steps_8) == list(range(1, LOOP_STEPS + 1))
    assert steps_1[1]["learning_rate"] > 0  # the first step updates as well
    assert len({e["loss"] for e in steps_1.values()}) == LOOP_STEPS
    for step, logged in steps_1.items():
        for key in ("loss", "grad_norm", "learning_rate"):
            assert steps_8[step][key] == pytest.approx(logged[key], rel=1e-4), (step, key)

    (validation_1,), (validation_8,) = (
        list(_events(w, "validation").values()) for w in (one, eight)
    )
    assert validation_1["n_labelled"] == sum(int(r["labeled"].sum()) for r in VALIDATION)
    assert set(validation_8) == set(validation_1)
    for key, value in validation_1.items():
        if value is None:  # NaN, written as null
            assert validation_8[key] is None, key
        elif isinstance(value, (int, float)):
            assert validation_8[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    _assert_params_close(
        _saved_params(one, LOOP_STEPS), _saved_params(eight, LOOP_STEPS), rtol=1e-4, atol=1e-6
    )


def test_fsdp_rule_splits_parameters_and_trains_the_same(runs):
    assert runs.child["fsdp_split"], "no parameter was split over the data axis"
    np.testing.assert_allclose(runs.child["fsdp"]["losses"], runs.losses, rtol=1e-5)
    # Split parameters reduce their gradients in another order; where Adam's
    # step rides on a near-zero gradient that moves a weight by a few 1e-5,
    # still far below one step's 1e-3 that a lost or doubled shard would move it.
    _assert_params_close(
        _named(runs.state.params), np.load(runs.base / "params_fsdp.npz"), rtol=1e-4, atol=1e-4
    )
    for key, value in runs.child["replicated"]["summary"].items():
        assert runs.child["fsdp"]["summary"][key] == pytest.approx(value, rel=1e-5, nan_ok=True)


def test_checkpoint_written_on_8_devices_restores_on_1(runs):
    restored = _restore(_config(), runs.mesh, str(runs.base / "ckpt_8"))
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(restored)} == {1}
    saved = np.load(runs.base / "params_8.npz")
    for name, value in _named(restored.params).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    assert int(restored.step) == STEPS


def test_checkpoint_written_on_1_device_restores_on_8(runs):
    assert runs.child["restored_devices"] == [8]
    restored = np.load(runs.base / "restored_on_8.npz")
    for name, value in _named(runs.state.params).items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_batch_not_divisible_by_the_devices_is_a_config_error(runs, tmp_path):
    assert (
        "config.batch_size=12 must be a positive multiple of the 8 device(s)"
        in (runs.child["batch_12"])
    )
    config = _config()
    config.eval_batch_size = 0
    with pytest.raises(ValueError, match="config.eval_batch_size=0 must be a positive multiple"):
        train.train(config, str(tmp_path))
    config = _config("zero")
    with pytest.raises(ValueError, match="config.mesh.param_sharding='zero'"):
        train.train(config, str(tmp_path))


def test_make_mesh_has_one_auto_data_axis_and_checks_the_count():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == jax.device_count()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match=r"config.mesh.data=2 but 1 device\(s\)"):
        sharding.make_mesh(2, devices=jax.devices()[:1])


def test_param_spec_rules():
    spec = sharding.param_spec
    assert spec((3, 3, 16, 32), rule="replicated", num_shards=8, min_size=1) == P()
    # Largest dimension the axis divides; the last one on ties.
    assert spec((3, 3, 16, 32), rule="fsdp", num_shards=8, min_size=1) == P(
        None, None, None, "data"
    )
    assert spec((3, 3, 32, 16), rule="fsdp", num_shards=8, min_size=1) == P(
        None, None, "data", None
    )
    assert spec((3, 3, 16, 16), rule="fsdp", num_shards=8, min_size=1) == P(
        None, None, None, "data"
    )
    assert spec((3, 3, 5, 7), rule="fsdp", num_shards=8, min_size=1) == P()  # nothing divides
    assert spec((32,), rule="fsdp", num_shards=8, min_size=64) == P()  # too small to split
    assert spec((), rule="fsdp", num_shards=8, min_size=0) == P()  # scalars
    with pytest.raises(ValueError, match="param_sharding='zero'.*replicated, fsdp"):
        spec((8,), rule="zero", num_shards=8, min_size=1)


def test_state_shardings_give_adam_moments_their_parameters_sharding():
    config = _config("fsdp")
    shapes = jax.eval_shape(lambda: run_lib.create_train_state(config, run_lib.init_key(0)))
    mesh = jax.sharding.AbstractMesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = sharding.state_shardings(shapes, mesh, rule="fsdp", min_size=64)
    specs = jax.tree.map(lambda s: s.spec, shardings)
    adam = specs.opt_state[1][0]  # (clip, (ScaleByAdamState, ...))
    assert adam.mu == specs.params and adam.nu == specs.params
    assert adam.count == P() and specs.step == P()
    kernels = {
        jax.tree_util.keystr(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(
            specs.params, is_leaf=lambda x: isinstance(x, P)
        )
    }
    split = [name for name, s in kernels.items() if "data" in s]
    assert split and all("kernel" in name for name in split)
    replicated = sharding.state_shardings(shapes, mesh, rule="replicated")
    assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def _mesh_config(**fields) -> ml_collections.ConfigDict:
    config = _config().mesh
    config.update(fields)
    return config


def test_initialize_distributed_passes_the_coordinator_on(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert sharding.initialize_distributed(_mesh_config(distributed=False)) is False
    assert calls == []
    assert sharding.initialize_distributed(_mesh_config(distributed=True)) is True
    assert calls == [{}]  # on Cloud TPU, JAX finds the hosts itself
    address = "10.0.0.2:1234"
    config = _mesh_config(
        distributed=True, coordinator_address=address, num_processes=4, process_id=3
    )
    assert sharding.initialize_distributed(config) is True
    assert calls[-1] == {"coordinator_address": address, "num_processes": 4, "process_id": 3}
    bad = _mesh_config(distributed=True, coordinator_address=address, num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="process_id < num_processes.*process_id=2"):
        sharding.initialize_distributed(bad)
    forgotten = _mesh_config(coordinator_address=address, num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="distributed is False"):
        sharding.initialize_distributed(forgotten)
    assert len(calls) == 2


def test_tpu_config_splits_its_batches_over_v5e_8_and_v4_32():
    from configs import tpu

    config = tpu.get_config()
    assert config.mesh.distributed and config.mesh.data == -1
    assert config.mesh.param_sharding in sharding.PARAM_RULES
    for devices in (8, 16):  # v5e-8: 8 chips; v4-32: 16 chips on 4 hosts
        mesh = types.SimpleNamespace(shape={"data": devices})
        sharding.check_batch_size(config.batch_size, mesh)
        sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _train_child(*sys.argv[2:])
    else:
        _child(*sys.argv[1:])
