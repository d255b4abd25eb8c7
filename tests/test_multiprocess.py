"""A real two-process run of `vertjax.main` on this machine, against one process.

Two child processes, each with 2 CPU devices, join through
`jax.distributed.initialize(coordinator_address='127.0.0.1:PORT',
num_processes=2, process_id=i)` (the `config.mesh.*` fields) into one mesh
of 4 devices and train configs/test.py for a few steps at a small image
size, on an in-memory dataset in place of the TFDS builder. Each process
reads its own half of the records and feeds its half of every global batch.

This process (1 device) then replays the same global batches and checks the
per-step losses, the validation metrics, the checkpointed parameters (as
restored here on one device) and the final test results, and that the log
and result files were written once, by process 0.

The children run under a deadline and are killed when it passes or when one
of them fails, so that a stuck coordinator cannot hang the suite.
"""

import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import app

from configs import test as test_config
from vertjax import checkpoints, evaluate, input_pipeline, main, run_log, runs, sharding, train

REPO = Path(__file__).resolve().parents[1]
S = 32
STEPS = 4
NUM_PROCESSES = 2
DEADLINE_S = 240


def _records(n: int, seed: int) -> list[dict]:
    """`n` records with a bright dot at each labelled centroid."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, size=(S, S, 1)).astype(np.uint8)
        centroids = np.stack(
            [0.5 + rng.uniform(-0.1, 0.1, 13), np.linspace(0.1, 0.9, 13)], axis=-1
        ).astype(np.float32)
        labeled = rng.uniform(size=13) < 0.8
        for cx, cy in centroids[labeled]:
            image[int(cy * S), int(cx * S), 0] = 255
        out.append(
            {
                "image": image,
                "centroids": centroids * labeled[:, None],
                "labeled": labeled,
                "truth_centroids": centroids,
                "truth_visible": np.ones(13, bool),
                "original_size": np.array([500, 300 + i], np.int32),
                "pixel_spacing_mm": np.full(2, 0.1, np.float32),
                "participant_id": f"p{i}".encode(),
                "image_id": f"i{i}".encode(),
            }
        )
    return out


SPLITS = {"train": _records(24, 0), "validation": _records(10, 1), "test": _records(7, 2)}
MEAN = float(np.mean([r["image"] for r in SPLITS["train"]]))
STD = float(np.std([r["image"] for r in SPLITS["train"]]))
OVERRIDES = {
    "image_size": S,
    "batch_size": 8,
    "eval_batch_size": 8,
    "train_steps": STEPS,
    "log_every": 1,
    "eval_every": 2,
    "checkpoint_every": 2,
    "val_max_batches": 0,
    "keep_checkpoints": 2,
}


class _MemoryBuilder:
    """Stands in for the TFDS builder: SPLITS as data sources, their pixel statistics."""

    data_dir = "memory"
    info = types.SimpleNamespace(metadata={"pixel_mean": MEAN, "pixel_std": STD})

    def as_data_source(self, split: str) -> list[dict]:
        return SPLITS[split]


def _child(process_id: str, port: str, workdir: str) -> None:
    """One process of the run (as a script): `vertjax.main` on the in-memory data."""
    runs.open_dataset = lambda config, build=None: _MemoryBuilder()
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    flags += [
        "--config.mesh.distributed=True",
        f"--config.mesh.coordinator_address=127.0.0.1:{port}",
        f"--config.mesh.num_processes={NUM_PROCESSES}",
        f"--config.mesh.process_id={process_id}",
    ]
    sys.argv = ["vertjax.main", f"--config={REPO / 'configs' / 'test.py'}", *flags]
    sys.argv.append(f"--workdir={workdir}")
    app.run(main.main)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(workdir: Path, log_dir: Path) -> list[str]:
    """Runs the NUM_PROCESSES children to the end; returns their logs.

    Fails (after killing the rest) as soon as one exits non-zero, or when
    DEADLINE_S passes.
    """
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    port = _free_port()
    procs, logs = [], []
    for i in range(NUM_PROCESSES):
        log = open(log_dir / f"process_{i}.log", "w")  # closed in the finally below
        logs.append(log)
        command = [sys.executable, __file__, str(i), str(port), str(workdir)]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + DEADLINE_S
    failure = None
    try:
        while failure is None and any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                failure = f"a process failed: exit codes {codes}"
            elif time.monotonic() > deadline:
                failure = f"the run did not finish within {DEADLINE_S} s"
            else:
                try:
                    procs[codes.index(None)].wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        if failure is None and any(p.returncode != 0 for p in procs):
            failure = f"a process failed: exit codes {[p.returncode for p in procs]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    texts = [(log_dir / f"process_{i}.log").read_text() for i in range(NUM_PROCESSES)]
    if failure:
        pytest.fail(
            failure + "\n" + "\n".join(f"--- process {i}\n{t[-3000:]}" for i, t in enumerate(texts))
        )
    return texts


def _config():
    config = test_config.get_config()
    config.update(OVERRIDES)
    return config


def _replay(config):
    """The run on one device: the global batches that the two processes formed.

    Returns per-step losses, params after each step, and the validation summary
    at each eval step.
    """
    mesh = sharding.make_mesh(1)
    state = jax.device_put(
        runs.create_train_state(config, runs.init_key(config.seed)), sharding.replicated(mesh)
    )
    step_fn = train.make_train_step(config, mesh)
    rng = sharding.replicated_key(config.seed + 1, mesh)
    streams = [
        iter(
            input_pipeline.train_dataset(
                SPLITS["train"],
                batch_size=config.batch_size,
                seed=config.seed,
                mean=MEAN,
                std=STD,
                image_size=S,
                read_threads=config.read_threads,
                process_index=i,
                process_count=NUM_PROCESSES,
            )
        )
        for i in range(NUM_PROCESSES)
    ]
    evaluator = evaluate.Evaluator(config, mesh, apply_fn=state.apply_fn, mean=MEAN, std=STD)
    losses, params, validation = {}, {}, {}
    for step in range(1, STEPS + 1):
        # Process i's rows sit at global rows [i*b, (i+1)*b): its devices come
        # i-th in the mesh.
        parts = [next(s) for s in streams]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = step_fn(state, input_pipeline.put_batch(batch, mesh), rng)
        losses[step] = float(metrics["loss"])
        params[step] = jax.device_get(state.params)
        if step % config.eval_every == 0:
            validation[step] = evaluator.run(state.params, SPLITS["validation"])
    return types.SimpleNamespace(
        mesh=mesh, losses=losses, params=params, validation=validation, evaluator=evaluator
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("two_processes")
    workdir = base / "workdir"
    logs = _run_processes(workdir, base)
    return types.SimpleNamespace(workdir=workdir, logs=logs, reference=_replay(_config()))


def _assert_metrics_close(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if np.isnan(value):
            assert actual[key] is None, key  # written to JSON as null
        else:
            assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_both_processes_saw_the_whole_mesh(run):
    for i, log in enumerate(run.logs):
        assert f"process {i} of 2: 2 local and 4 global device(s)" in log


def test_losses_match_one_process(run):
    events = run_log.read_metrics(str(run.workdir))
    losses = {e["step"]: e["loss"] for e in events if e["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))  # each step logged once
    for step, loss in run.reference.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


def test_validation_metrics_match_one_process(run):
    events = run_log.read_metrics(str(run.workdir))
    validation = {e["step"]: e for e in events if e["kind"] == "validation"}
    assert sorted(validation) == sorted(run.reference.validation)
    for step, summary in run.reference.validation.items():
        assert validation[step]["n_labelled"] == sum(
            int(r["labeled"].sum()) for r in SPLITS["validation"]
        )
        _assert_metrics_close(validation[step], summary)


def test_checkpoint_of_both_processes_restores_on_one_device(run):
    config = _config()
    ckpt = checkpoints.Checkpointer(str(run.workdir / "checkpoints"), read_only=True)
    try:
        assert ckpt.latest_step() == STEPS
        state, _ = ckpt.restore(STEPS, state=runs.abstract_train_state(config, run.reference.mesh))
    finally:
        ckpt.close()
    expected = run.reference.params[STEPS]
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
    # The grain position of each process is saved beside the state.
    data_dir = run.workdir / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_results_match_one_process_and_are_written_once(run):
    with open(run.workdir / evaluate.RESULTS_JSON) as f:
        record = json.load(f)
    step = record["steps"]
    assert step in run.reference.params
    expected = run.reference.evaluator.run(run.reference.params[step], SPLITS["test"])
    _assert_metrics_close(record, expected)
    assert record["n_labelled"] == sum(int(r["labeled"].sum()) for r in SPLITS["test"])
    # Process 0 alone writes the TensorBoard and JSON logs.
    assert len(os.listdir(run.workdir / "tensorboard")) == 1
    assert not list(run.workdir.glob("*.tmp"))


def test_resuming_with_another_process_count_is_refused(run):
    config = _config()
    data = input_pipeline.train_dataset(
        SPLITS["train"], batch_size=config.batch_size, seed=config.seed, mean=MEAN, std=STD
    )
    ckpt = checkpoints.Checkpointer(str(run.workdir / "checkpoints"), read_only=True)
    try:
        with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1"):
            ckpt.restore(
                STEPS,
                state=runs.abstract_train_state(config, run.reference.mesh),
                data_iterator=iter(data),
            )
    finally:
        ckpt.close()


if __name__ == "__main__":
    _child(*sys.argv[1:])
