"""Training loses nothing: a killed run resumes exactly, a non-finite loss and a
failed checkpoint write stop the run cleanly and keep the last good checkpoint.

Every run is the real command, `python -m vertjax.main --config=configs/test.py`,
in a subprocess, on a 12-radiograph `folder` dataset built once for this
module; a persistent compilation cache shared by the runs keeps each short.
Waiting for a checkpoint polls the workdir; a kill comes at a random moment
within half a second after a chosen checkpoint, many steps before the end of
the run at any speed this CPU config reaches.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vertjax import checkpoints, datasets, evaluate, run_log, runs, sharding, train, vertebrae

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
# Checkpoints every 2 steps, validation every 5: a kill can land in a step,
# a save or a validation, and the best-checkpoint ranking must survive it.
TRAIN_FLAGS = (
    f"--config.train_steps={STEPS}",
    "--config.checkpoint_every=2",
    "--config.log_every=2",
    "--config.eval_every=5",
    "--config.keep_checkpoints=2",
)
# results.json fields that measure wall-clock time, not the model: they differ
# between any two runs, interrupted or not.
WALL_CLOCK_RESULTS = frozenset({"train_seconds"})
# metrics.jsonl fields of the same kind (progress rate and time left).
WALL_CLOCK_METRICS = frozenset({"steps_per_second", "eta_seconds"})
RUN_TIMEOUT_S = 240
# The file-size limit that plays a full disk: above any log file of these
# runs, below the checkpointed arrays (about 100 kB for the test model).
FULL_DISK_BYTES = 20_000


def _write_folder(root: Path) -> None:
    """12 noise radiographs of 96 x 48 px, all of T4-L4 labelled; splits 8/2/2."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i in range(12):
        split = "train" if i < 8 else ("validation" if i < 10 else "test")
        image = rng.integers(0, 255, (96, 48), dtype=np.uint8)
        Image.fromarray(image).save(root / f"r{i}.png")
        for k, name in enumerate(vertebrae.NAMES):
            x, y = 24 + rng.uniform(-3, 3), 5 + 6.5 * k
            rows.append(
                {"image": f"r{i}.png", "participant": f"p{i}", "vertebra": name}
                | {"x": x, "y": y, "split": split}
            )
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def dataset_flags(tmp_path_factory) -> list[str]:
    base = tmp_path_factory.mktemp("resume_data")
    _write_folder(base / "folder")
    datasets.get_builder("folder", data_dir=str(base / "tfds"), manual_dir=str(base / "folder"))
    return [
        "--config.dataset.name=folder",
        f"--config.dataset.manual_dir={base / 'folder'}",
        f"--config.dataset.data_dir={base / 'tfds'}",
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("resume_jax_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _command(dataset_flags, workdir, *flags, script=None) -> list[str]:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "vertjax.main"]
    return [
        *head,
        "--config=configs/test.py",
        *dataset_flags,
        f"--workdir={workdir}",
        "--alsologtostderr",
        *flags,
    ]


def _run(command, env, *, expect=0) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert done.returncode == expect, done.stderr[-4000:]
    return done.stderr


def _saved_steps(workdir: Path) -> list[int]:
    """Finished checkpoint steps of a run that may still be writing or deleting them.

    orbax writes a step into a temporary folder and renames it to the bare step
    number when complete, so a folder named by digits alone is finished. The
    listing is read without opening a manager, which would race the trainer's
    own deletion of old steps.
    """
    try:
        names = os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if name.isdigit())


def _run_and_kill(command, env, workdir: Path, *, after: int, rng: random.Random) -> str:
    """Starts `command`, waits for checkpoint `after` (or later), then SIGKILLs it at a
    random moment up to half a second later: mid-step, mid-save or mid-validation."""
    log_path = workdir.parent / f"{workdir.name}-killed-after-{after}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not any(s >= after for s in _saved_steps(workdir)):
                assert proc.poll() is None, (
                    f"run ended before checkpoint {after}: " + (log_path.read_text()[-4000:])
                )
                assert time.monotonic() < deadline, f"no checkpoint {after} in time"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill: {text[-3000:]}"
    return text


def _state(workdir: Path, step: int):
    """Params and optimiser state of checkpoint `step`, on the host."""
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        state, _ = ckpt.restore(
            step, state=runs.abstract_train_state(config, sharding.make_mesh(1))
        )
    finally:
        ckpt.close()
    return jax.device_get({"params": state.params, "opt_state": state.opt_state})


def _assert_bitwise_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit for bit: -0.0 != 0.0, NaN payloads count


def _events(workdir: Path) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k not in WALL_CLOCK_METRICS}
        for e in run_log.read_metrics(str(workdir))
    ]


def _results(workdir: Path) -> dict:
    """results.json without wall-clock fields and without the run folder's name."""
    record = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert record["provenance"].pop("model") == str(workdir)
    return {k: v for k, v in record.items() if k not in WALL_CLOCK_RESULTS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env, dataset_flags) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run(_command(dataset_flags, workdir, *TRAIN_FLAGS), env)
    return workdir


def test_killed_twice_resumes_bit_for_bit(uninterrupted, tmp_path, env, dataset_flags):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    workdir = tmp_path / "run"
    command = _command(dataset_flags, workdir, *TRAIN_FLAGS)
    resumed_at = []
    latest = 0
    for _ in range(2):
        # A checkpoint one to three intervals past the last resume point, and
        # early enough that the run is still going when the kill arrives.
        after = rng.choice(range(latest + 2, min(latest + 6, STEPS - 8) + 1, 2))
        _run_and_kill(command, env, workdir, after=after, rng=rng)
        latest = max(_saved_steps(workdir))
        assert after <= latest < STEPS, f"seed {seed}"
        resumed_at.append(latest)
    log = _run(command, env)
    assert f"at step {latest}" in log and f"training steps {latest + 1} to {STEPS}" in log, (
        f"seed {seed}"
    )
    assert resumed_at[0] < resumed_at[1]

    final = max(_saved_steps(workdir))
    assert final == STEPS == max(_saved_steps(uninterrupted))
    _assert_bitwise_equal(_state(workdir, STEPS), _state(uninterrupted, STEPS))
    # The evaluation of the best checkpoint, the best-checkpoint choice itself
    # and the logged losses and validations are the same as well.
    assert _results(workdir) == _results(uninterrupted), f"seed {seed}, kills after {resumed_at}"
    assert _events(workdir) == _events(uninterrupted), f"seed {seed}, kills after {resumed_at}"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, env, dataset_flags):
    # A learning rate of 1e30 blows the weights up on the first real update
    # (step 1 has learning rate 0: warm-up), so a later loss is not finite.
    workdir = tmp_path / "run"
    command = _command(
        dataset_flags,
        workdir,
        "--config.optimizer.learning_rate=1e30",
        "--config.train_steps=8",
        "--config.checkpoint_every=1",
        "--config.log_every=4",
        "--config.eval_every=8",
        "--config.keep_checkpoints=8",
    )
    log = _run(command, env, expect=1)
    assert "Traceback" not in log
    message = [line for line in log.splitlines() if line.startswith("vertjax: ")]
    assert len(message) == 1 and "non-finite" in message[0], log[-3000:]
    bad_step = int(message[0].split(" at step ")[1].split(";")[0])
    assert 2 <= bad_step <= 8
    # Everything before the bad step was saved, nothing from it on.
    assert _saved_steps(workdir) == list(range(1, bad_step))
    good = _state(workdir, bad_step - 1)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
    assert all(e["step"] < bad_step for e in run_log.read_metrics(str(workdir)))
    assert not (workdir / evaluate.RESULTS_JSON).exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, env, dataset_flags):
    """The disk fills up mid-run: the next checkpoint write fails with a clear
    error, the one before stays loadable, and the same command resumes from it.

    A full disk is made real by lowering the running process's file-size limit
    (RLIMIT_FSIZE, which binds root too, unlike a read-only folder) once a
    checkpoint exists: the logs stay far below it, a checkpoint's arrays do not.
    """
    workdir = tmp_path / "run"
    command = _command(
        dataset_flags,
        workdir,
        "--config.train_steps=12",
        "--config.checkpoint_every=2",
        # Validation from step 2 on: its compilation is cached before the
        # limit, so only checkpoint writes can meet it.
        "--config.eval_every=2",
        "--config.keep_checkpoints=1",
    )
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # A pipe, not a file: the limit must not hit the log itself. Drained by a
    # thread so that the child never blocks on it.
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _saved_steps(workdir):
            assert proc.poll() is None, "".join(chunks)[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
        reader.join(timeout=10)
    log = "".join(chunks)
    assert proc.returncode == 1, log[-4000:]
    # No traceback through the project's code. (tensorstore's writes that were
    # still in flight print "Event loop is closed" from its own threads as the
    # process exits; that noise comes after the message and is not ours.)
    assert f'File "{REPO / "vertjax"}' not in log, log[-4000:]
    message = [line for line in log.splitlines() if line.startswith("vertjax: ")]
    assert len(message) == 1, log[-4000:]
    match = re.match(
        rf"vertjax: cannot write checkpoint (\d+) to {workdir / 'checkpoints'}: ", message[0]
    )
    assert match and "File too large" in message[0], message[0]
    failed = int(match.group(1))
    # The failed write left nothing that counts as a checkpoint; the one
    # before it is complete and loads.
    assert max(_saved_steps(workdir)) == failed - 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_state(workdir, failed - 2)))
    log = _run(command, env)
    assert f"at step {failed - 2}" in log and f"training steps {failed - 1} to 12" in log
    assert max(_saved_steps(workdir)) == 12


def test_non_finite_gradients_stop_the_run_even_with_a_finite_loss():
    # Parameters after such a step are NaN: the step must not reach a save.
    pending = [(6, {"loss": np.float32(0.5), "grad_norm": np.float32(2.0)})]
    pending.append((7, {"loss": np.float32(0.5), "grad_norm": np.float32(np.nan)}))
    with pytest.raises(train.NonFiniteLossError, match="non-finite gradient norm nan at step 7"):
        train._check_finite(pending)
