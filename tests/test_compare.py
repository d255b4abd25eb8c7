"""Tests for vertjax.compare: run commands, resuming, and the report at the end."""

import json
import sys
from pathlib import Path

import pytest

from vertjax import compare

REPO = Path(__file__).resolve().parents[1]


def _fake_results(workdir: Path, loss: str, seed: int, id_accuracy: float) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "config": loss,
        "loss": loss,
        "dataset": "aasce_fov",
        "split": "test",
        "steps": 2,
        "seed": seed,
        "id_accuracy": id_accuracy,
        "rmse_px": 3.0,
    }
    (workdir / "results.json").write_text(json.dumps(results))


def test_plan_builds_one_main_command_per_loss_and_seed(tmp_path):
    jobs = compare.plan(
        dataset="aasce_fov",
        seeds=2,
        root=tmp_path,
        overrides=["train_steps=50", "--config.optimizer.learning_rate=3e-4"],
        manual_dir="../shared/data/aasce",
        config_dir=REPO / "configs",
        python="py",
    )
    assert [(j.loss, j.seed) for j in jobs] == [
        (loss, seed) for loss in ("mse", "l1", "l2", "l3") for seed in (0, 1)
    ]
    l2_seed1 = jobs[5]
    assert l2_seed1.workdir == tmp_path / "aasce_fov" / "l2" / "seed1"
    assert l2_seed1.command == (
        "py",
        "-m",
        "vertjax.main",
        f"--config={REPO / 'configs' / 'l2.py'}",
        "--config.dataset.name=aasce_fov",
        "--config.dataset.manual_dir=../shared/data/aasce",
        "--config.seed=1",
        "--config.train_steps=50",
        "--config.optimizer.learning_rate=3e-4",
        f"--workdir={tmp_path / 'aasce_fov' / 'l2' / 'seed1'}",
    )
    # Without a manual dir the flag is left out (synthetic data needs none).
    (job,) = compare.plan(
        dataset="synthetic", seeds=1, losses=["l1"], root=tmp_path, config_dir=REPO / "configs"
    )
    assert not any("manual_dir" in part for part in job.command)
    assert job.command[0] == sys.executable


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seeds": 0}, "at least 1"),
        ({"losses": ["l4"]}, r"unknown loss\(es\) \['l4'\]"),
        ({"overrides": ["train_steps"]}, "expected FIELD=VALUE"),
        ({"overrides": ["seed=3"]}, "set by compare itself"),
        ({"config_dir": "/nonexistent"}, "mse.py: config file"),
    ],
)
def test_plan_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"dataset": "aasce_fov", "seeds": 1, "root": tmp_path, "config_dir": REPO / "configs"}
    with pytest.raises(ValueError, match=message):
        compare.plan(**{**args, **kwargs})


def test_run_jobs_skips_finished_runs_and_reports_failures(tmp_path):
    jobs = compare.plan(
        dataset="aasce_fov",
        seeds=2,
        losses=["l1", "l2"],
        root=tmp_path,
        config_dir=REPO / "configs",
    )
    _fake_results(jobs[0].workdir, "l1", 0, 0.5)  # l1 seed 0 finished earlier
    ran = []

    def runner(job):
        ran.append(job.command)
        if job.loss == "l2" and job.seed == 1:
            return 3  # this run crashes
        if job.loss == "l1" and job.seed == 1:
            return 0  # exits cleanly but writes no results: also a failure
        _fake_results(job.workdir, job.loss, job.seed, 0.9)
        return 0

    skipped, failed = compare.run_jobs(jobs, runner=runner)
    assert skipped == [jobs[0]]
    assert ran == [j.command for j in jobs[1:]]
    assert [(j.loss, j.seed) for j in failed] == [("l1", 1), ("l2", 1)]

    # Resuming runs only what is still missing.
    ran.clear()
    skipped, _ = compare.run_jobs(jobs, runner=runner)
    assert [(j.loss, j.seed) for j in skipped] == [("l1", 0), ("l2", 0)]
    assert ran == [jobs[1].command, jobs[3].command]


def test_dry_run_prints_commands(tmp_path):
    import subprocess

    _fake_results(tmp_path / "aasce_fov" / "mse" / "seed0", "mse", 0, 0.5)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vertjax.compare",
            "--dataset=aasce_fov",
            "--seeds=1",
            f"--root={tmp_path}",
            "--dry_run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 4
    assert out[0].startswith("# done: ")
    assert "--config=configs/mse.py" in out[0]
    assert "--config.dataset.name=aasce_fov" in out[1]
    assert out[3].endswith(f"--workdir={tmp_path}/aasce_fov/l3/seed0")


def test_finished_comparison_goes_straight_to_the_report(tmp_path):
    import subprocess

    for seed, loss in enumerate(compare.LOSSES):
        _fake_results(tmp_path / "aasce_fov" / loss / "seed0", loss, 0, 0.5 + 0.1 * seed)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vertjax.compare",
            "--dataset=aasce_fov",
            "--seeds=1",
            f"--root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "aasce_fov" / "report" / "table.md").read_text()
    assert "| l3 | l3 | aasce_fov (test) | 1 (0) | 80.0 % |" in table
    assert table in result.stdout


def test_run_logged_keeps_the_output_of_each_run(tmp_path, capsys):
    job = compare.Job(
        loss="l1",
        seed=0,
        workdir=tmp_path / "run",
        command=(sys.executable, "-c", "print('step 1'); import sys; sys.exit(4)"),
    )
    assert compare.run_logged(job) == 4
    log = (tmp_path / "run" / compare.LOG_FILE).read_text().splitlines()
    assert log[0].startswith("$ ") and log[1] == "step 1"
    assert "step 1" in capsys.readouterr().err
