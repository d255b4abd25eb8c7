"""End-to-end tests of `python -m vertjax.main` with configs/test.py.

The command runs in subprocesses, as a user runs it, on `synthetic_small`
built once per session into a temporary data_dir. A shared persistent
compilation cache lets the later runs skip most of XLA's compile time.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import test as test_config
from vertjax import checkpoints, evaluate, run_log, runs, sharding

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {
    "config",
    "loss",
    "dataset",
    "split",
    "id_accuracy",
    "rmse_px",
    "mean_error_px",
    "n_labelled",
    "steps",
    "train_seconds",
    "per_vertebra",
}
# The command, with validation ID accuracy 0.9 at step 3 and 0.1 at step 6
# (the test config's two validations) whatever the model scores: the best
# checkpoint is then 3, the latest 6. The final test evaluation keeps its
# real scores.
_SCRIPTED_VALIDATION = """
import sys
from absl import app
from vertjax import evaluate, main, train
run, train_run = evaluate.Evaluator.run, train.train
scores = []  # filled while training only
def scripted_run(self, *args, **kwargs):
    summary = run(self, *args, **kwargs)
    return {**summary, 'id_accuracy': scores.pop(0)} if scores else summary
def scripted_train(*args, **kwargs):
    scores[:] = [0.9, 0.1]
    try:
        return train_run(*args, **kwargs)
    finally:
        scores.clear()
evaluate.Evaluator.run = scripted_run
train.train = scripted_train
sys.argv = ['vertjax.main'] + sys.argv[1:]
app.run(main.main)
"""


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _run(env, data_dir, workdir, *flags, script=None, expect=0):
    command = [sys.executable]
    command += ["-c", script] if script else ["-m", "vertjax.main"]
    command += [
        "--config=configs/test.py",
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
        "--alsologtostderr",
        *flags,
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env, data_dir):
    """A finished 6-step run of configs/test.py, drawing one validation radiograph
    into TensorBoard at each validation (do not modify; copy it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    log = _run(env, data_dir, workdir, "--config.tensorboard_examples=1")
    return workdir, log


def _params(workdir, step):
    config = test_config.get_config()
    mesh = sharding.make_mesh(1)
    ckpt = checkpoints.Checkpointer(str(Path(workdir) / "checkpoints"), keep=1)
    state, _ = ckpt.restore(step, state=runs.abstract_train_state(config, mesh))
    ckpt.close()
    return jax.device_get(state.params)


def test_train_writes_checkpoints_logs_and_results(trained):
    workdir, log = trained
    assert "training steps 1 to 6" in log
    results = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert RESULT_KEYS <= set(results)
    assert results["config"] == "test" and results["loss"] == "l3"
    assert results["dataset"] == "synthetic_small" and results["split"] == "test"
    assert results["steps"] in (3, 6) and results["train_seconds"] > 0
    assert results["n_labelled"] > 0 and 0.0 <= results["id_accuracy"] <= 1.0
    assert len(results["per_vertebra"]) == 13
    table = (workdir / evaluate.RESULTS_MD).read_text()
    assert "| T4 |" in table and "| L4 |" in table
    events = run_log.read_metrics(str(workdir))
    assert [e["step"] for e in events if e["kind"] == "train"] == [2, 4, 6]
    assert [e["step"] for e in events if e["kind"] == "validation"] == [3, 6]
    assert all(np.isfinite(e["loss"]) for e in events if e["kind"] == "train")
    (events_file,) = (workdir / "tensorboard").glob("events.out.tfevents*")
    # Scalars, and at each validation one drawn radiograph (a PNG image summary).
    written = events_file.read_bytes()
    assert b"validation/id_accuracy" in written
    assert b"validation/examples/0" in written and written.count(b"\x89PNG") == 2
    # keep_checkpoints=1: the latest, plus the best by validation ID accuracy.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and set(steps) <= {3, 6}


def test_rerun_in_the_same_workdir_resumes(trained, tmp_path, env, data_dir):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    log = _run(env, data_dir, workdir, "--config.train_steps=8")
    assert "at step 6" in log and "training steps 7 to 8" in log
    assert "training steps 1 to" not in log
    events = run_log.read_metrics(str(workdir))
    assert [e["step"] for e in events if e["kind"] == "train"] == [2, 4, 6, 8]
    assert json.loads((workdir / evaluate.RESULTS_JSON).read_text())["steps"] in (3, 6, 8)


def test_evaluate_mode_reads_the_chosen_checkpoint(trained, tmp_path, env, data_dir):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    (workdir / evaluate.RESULTS_JSON).unlink()
    _run(env, data_dir, workdir, "--mode=evaluate", "--split=validation", "--checkpoint=latest")
    results = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert RESULT_KEYS <= set(results)
    assert results["split"] == "validation" and results["steps"] == 6
    assert not (workdir / "checkpoints" / "7").exists()


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_rerun_of_a_finished_run_only_evaluates(trained, tmp_path, env, data_dir):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    metrics_log = (workdir / run_log.METRICS_FILE).read_text()
    saved = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    results = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    (workdir / evaluate.RESULTS_JSON).unlink()
    (workdir / evaluate.RESULTS_MD).unlink()
    log = _run(env, data_dir, workdir, "--config.tensorboard_examples=1")  # trained's config
    assert "at step 6" in log and "training steps" not in log
    # No step ran: no checkpoint written or removed, no line logged.
    assert _checkpoint_steps(workdir) == _checkpoint_steps(trained[0])
    assert {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")} == saved
    assert (workdir / run_log.METRICS_FILE).read_text() == metrics_log
    # The evaluation ran again and wrote the same results, naming the copy's folder.
    again = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert again["provenance"].pop("model") == str(workdir)
    assert results["provenance"].pop("model") == str(trained[0])
    assert again == results
    assert (workdir / evaluate.RESULTS_MD).read_text() == (
        trained[0] / evaluate.RESULTS_MD
    ).read_text().replace(str(trained[0]), str(workdir))


@pytest.fixture(scope="module")
def best_before_latest(tmp_path_factory, env, data_dir):
    """A finished 6-step run whose validation ranks checkpoint 3 above the latest, 6."""
    workdir = tmp_path_factory.mktemp("best_before_latest") / "run"
    _run(env, data_dir, workdir, script=_SCRIPTED_VALIDATION)
    return workdir


def test_final_evaluation_uses_the_best_checkpoint(best_before_latest):
    workdir = best_before_latest
    validation = {
        e["step"]: e["id_accuracy"]
        for e in run_log.read_metrics(str(workdir))
        if e["kind"] == "validation"
    }
    assert validation == {3: 0.9, 6: 0.1}
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        assert ckpt.all_steps() == [3, 6] and ckpt.best_step() == 3
    finally:
        ckpt.close()
    results = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert (results["split"], results["steps"]) == ("test", 3)


def test_final_evaluation_uses_the_latest_checkpoint_when_configured(
    best_before_latest, tmp_path, env, data_dir
):
    workdir = tmp_path / "run"
    shutil.copytree(best_before_latest, workdir)
    log = _run(env, data_dir, workdir, "--config.eval_checkpoint=latest")
    assert "training steps" not in log
    results = json.loads((workdir / evaluate.RESULTS_JSON).read_text())
    assert (results["split"], results["steps"]) == ("test", 6)


def test_config_faults_exit_with_a_message(tmp_path, env, data_dir):
    log = _run(env, data_dir, tmp_path / "run", "--config.loss=l9", expect=1)
    assert "unknown loss 'l9'" in log


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path, data_dir):
    config = test_config.get_config()
    config.dataset.data_dir = data_dir
    with pytest.raises(ValueError, match="no checkpoints folder .*train first"):
        evaluate.evaluate_checkpoint(config, str(tmp_path), split="test")


def test_init_from_a_run_starts_from_its_weights(trained, tmp_path, env, data_dir):
    workdir = tmp_path / "finetuned"
    # A learning rate of ~0 keeps the weights where they started.
    log = _run(
        env,
        data_dir,
        workdir,
        f"--config.init_from={trained[0]}",
        "--config.optimizer.learning_rate=1e-12",
        "--config.train_steps=3",
        "--mode=train",
    )
    assert f"initial parameters from {trained[0]}" in log
    started, source = _params(workdir, 3), _params(trained[0], 6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), started, source)
    refused = _run(
        env,
        data_dir,
        tmp_path / "wider",
        f"--config.init_from={trained[0]}",
        "--config.model.features=8",
        expect=1,
    )
    assert "parameter" in refused and "configured network" in refused
    assert not (tmp_path / "wider").exists()
