"""Run folders on an object store (gs:// on Cloud TPU) go through etils.epath.

A fake bucket stands in for Cloud Storage: `epath.testing.mock_epath` sends
every gs:// path into a temporary folder and, as an object store does,
refuses appending and renaming. TensorBoard's gs:// writer is pointed at the
same folder through tensorboardX's writer registry. Orbax's arrays go through
TensorStore's own gs:// driver, which this machine cannot reach, so
checkpoints are covered by the local-path tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from etils.epath import testing as epath_testing
from tensorboardX import record_writer

from vertjax import datasets, evaluate, files, report, run_log

BUCKET = "gs://vertjax-test-bucket"


def _local(root: Path, path) -> str:
    path = os.fspath(path)
    if path.startswith("gs://"):
        return os.fspath(root / path.removeprefix("gs://"))
    return path


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local folder behind gs://vertjax-test-bucket while the test runs."""
    root = tmp_path / "store"
    root.mkdir()

    def mapped(original, path, *args, **kwargs):
        return original(_local(root, path), *args, **kwargs)

    def open_(original, path, mode):
        if os.fspath(path).startswith("gs://") and "a" in mode:
            raise OSError(f"{path}: an object store cannot append")
        return original(_local(root, path), mode)

    def no_rename(original, path, dst, *args, **kwargs):
        if os.fspath(path).startswith("gs://"):
            raise OSError(f"{path}: an object store has no rename")
        return original(path, dst, *args, **kwargs)

    class EventFiles:
        """tensorboardX's writer factory, for the fake bucket."""

        def open(self, path):
            local = Path(_local(root, path))
            local.parent.mkdir(parents=True, exist_ok=True)
            return open(local, "wb")

        def directory_check(self, path):
            pass

    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", EventFiles())
    monkeypatch.chdir(tmp_path)
    hooks = {n: mapped for n in ("exists", "isdir", "listdir", "glob", "makedirs", "mkdir")}
    hooks.update(stat=mapped, remove=mapped, rmtree=mapped)
    with epath_testing.mock_epath(open=open_, rename=no_rename, replace=no_rename, **hooks):
        yield root
    # Nothing landed on the local disk under a folder named 'gs:'.
    assert not (tmp_path / "gs:").exists()


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(files.as_path("runs/a")) == os.fspath(tmp_path / "runs" / "a")
    assert os.fspath(files.as_path(f"{BUCKET}/runs/a")) == f"{BUCKET}/runs/a"
    assert files.is_local("runs/a") and not files.is_local(f"{BUCKET}/a")


def test_files_write_and_append_on_an_object_store(bucket):
    path = f"{BUCKET}/run/notes.txt"
    files.as_path(f"{BUCKET}/run").mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, "first\n")
    files.append_text(path, "second\n")
    files.append_text(f"{BUCKET}/run/new.txt", "only\n")
    assert (bucket / "vertjax-test-bucket/run/notes.txt").read_text() == "first\nsecond\n"
    assert (bucket / "vertjax-test-bucket/run/new.txt").read_text() == "only\n"


def test_run_log_results_and_report_on_an_object_store(bucket):
    workdir = f"{BUCKET}/runs/l3"
    writer = run_log.MetricWriter(workdir, enabled=True)
    for step in (50, 100, 150):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.write(100, "validation", {"id_accuracy": 0.5})
    writer.drop_after(100)  # a resume from step 100 forgets what came later
    writer.close()
    record = {
        **dict(config="l3", loss="l3", dataset="synthetic", split="test", seed=0),
        **dict(steps=150, train_seconds=1.0, postprocess=False, id_accuracy=0.5),
    }
    evaluate.write_results(workdir, record)

    local = bucket / "vertjax-test-bucket" / "runs" / "l3"
    assert sorted(p.name for p in local.iterdir()) == [
        "metrics.jsonl",
        "results.json",
        "results.md",
        "tensorboard",
    ]
    assert any(local.joinpath("tensorboard").iterdir()), "no TensorBoard event file"
    events = run_log.read_metrics(workdir)
    assert [(e["step"], e["kind"]) for e in events] == [
        (50, "train"),
        (100, "train"),
        (100, "validation"),
    ]
    run = report.load_run(workdir)
    assert os.fspath(run.path) == workdir
    assert run.results["id_accuracy"] == 0.5 and run.seed == 0
    assert len(run.events) == 3


def test_a_dataset_on_an_object_store_is_refused_with_the_way_out():
    with pytest.raises(datasets.DataError, match="local disk only.*Cloud Storage FUSE"):
        datasets.get_builder("synthetic_small", data_dir=f"{BUCKET}/tensorflow_datasets")
