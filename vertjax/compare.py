"""The paper's experiment in one command: the four losses x N seeds, then the report.

Command:
  python -m vertjax.compare --dataset=aasce_fov --seeds=3 \
      [--losses=mse,l1,l2,l3] [--root=runs/compare] [--manual_dir=DIR] \
      [--config_overrides=train_steps=2000 --config_overrides=batch_size=16] [--dry_run]

Each run trains and tests in its own process, one after the other, its
output appended to `<workdir>/main.log`:
  python -m vertjax.main --config=configs/<loss>.py --config.dataset.name=<dataset>
      [--config.dataset.manual_dir=<dir>] --config.seed=<seed>
      [--config.<field>=<value> ...] --workdir=<root>/<dataset>/<loss>/seed<seed>
A run whose folder already holds `results.json` is skipped, so an
interrupted comparison resumes where it stopped (and a run interrupted
mid-training resumes from its own checkpoints). A run that fails is
reported and the others still run; the report then covers every finished
run (`<root>/<dataset>/report/table.md`) and the exit status is 1.

`--seeds=N` trains seeds 0 .. N-1. `--manual_dir` is passed on as the
dataset's source folder when given; without it the AASCE datasets use
`vertjax.datasets`' default (`../shared/data/aasce` beside the repository).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import logging

from vertjax import report

LOSSES = report.LOSS_ORDER  # the paper's four, in its order


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the comparison."""

    loss: str
    seed: int
    workdir: Path
    command: tuple[str, ...]

    @property
    def done(self) -> bool:
        return (self.workdir / report.RESULTS_FILE).is_file()


def plan(
    *,
    dataset: str,
    seeds: int,
    losses: Sequence[str] = LOSSES,
    root: str | Path = "runs/compare",
    overrides: Sequence[str] = (),
    manual_dir: str = "",
    config_dir: str | Path = "configs",
    python: str = sys.executable,
) -> list[Job]:
    """The jobs of a comparison, in loss-major order (all seeds of mse first).

    Args:
      dataset: TFDS config name, e.g. 'aasce_fov'.
      seeds: number of seeds, 0 .. seeds - 1.
      losses: loss names; each needs `<config_dir>/<loss>.py`.
      root: runs go to `<root>/<dataset>/<loss>/seed<seed>`.
      overrides: 'field=value' config overrides, passed as --config.field=value.
      manual_dir: the dataset's source folder ('' = the config's).
      config_dir: folder of the per-loss config files.
      python: the interpreter that runs `vertjax.main`.

    Raises:
      ValueError: an unknown loss, a missing config file, seeds < 1 or a
        malformed override.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not losses:
        raise ValueError("no losses given")
    unknown = [loss for loss in losses if loss not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}: expected some of {', '.join(LOSSES)}")
    extra = []
    for item in overrides:
        field, sep, value = item.partition("=")
        field = field.strip().removeprefix("--").removeprefix("config.")
        if not sep or not field:
            raise ValueError(
                f"config override {item!r}: expected FIELD=VALUE, e.g. train_steps=500"
            )
        if field in ("seed", "dataset.name"):
            raise ValueError(f"config override {item!r}: {field} is set by compare itself")
        extra.append(f"--config.{field}={value}")
    jobs = []
    for loss in losses:
        config_file = Path(config_dir) / f"{loss}.py"
        if not config_file.is_file():
            raise ValueError(f"{config_file}: config file for loss {loss!r} not found")
        for seed in range(seeds):
            workdir = Path(root) / dataset / loss / f"seed{seed}"
            command = [
                python,
                "-m",
                "vertjax.main",
                f"--config={config_file}",
                f"--config.dataset.name={dataset}",
            ]
            if manual_dir:
                command.append(f"--config.dataset.manual_dir={manual_dir}")
            command += [f"--config.seed={seed}", *extra, f"--workdir={workdir}"]
            jobs.append(Job(loss=loss, seed=seed, workdir=workdir, command=tuple(command)))
    return jobs


LOG_FILE = "main.log"


def run_logged(job: Job) -> int:
    """Runs a job's command with its output appended to `<workdir>/main.log`.

    Returns the exit status; on failure the log's last lines go to stderr.
    """
    job.workdir.mkdir(parents=True, exist_ok=True)
    log_path = job.workdir / LOG_FILE
    with log_path.open("a") as log:
        log.write("$ " + " ".join(job.command) + "\n")
        log.flush()
        status = subprocess.run(
            list(job.command), stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    if status != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        print(f"--- last lines of {log_path}:", *tail, sep="\n", file=sys.stderr)
    return status


def run_jobs(
    jobs: Sequence[Job], *, runner: Callable[[Job], int] = run_logged
) -> tuple[list[Job], list[Job]]:
    """Runs the unfinished jobs one after the other.

    Args:
      jobs: from `plan`.
      runner: runs one job and returns its exit status; default `run_logged`.

    Returns:
      (skipped because already done, failed).
    """
    skipped, failed = [], []
    todo = [job for job in jobs if not job.done]
    for job in jobs:
        if job.done:
            skipped.append(job)
            logging.info(
                "skip %s seed %d: %s exists", job.loss, job.seed, job.workdir / report.RESULTS_FILE
            )
    for i, job in enumerate(todo, 1):
        logging.info(
            "run %d/%d: %s seed %d (log: %s)",
            i,
            len(todo),
            job.loss,
            job.seed,
            job.workdir / LOG_FILE,
        )
        status = runner(job)
        if status != 0 or not job.done:
            logging.error(
                "%s seed %d failed (exit status %d%s)",
                job.loss,
                job.seed,
                status,
                "" if status else ", no results.json",
            )
            failed.append(job)
    return skipped, failed


if __name__ == "__main__":
    from vertjax import cli

    cli.run_command("compare")
