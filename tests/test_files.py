"""`files.write_atomic`: the old file or the new one, never a part, even after a power cut."""

from __future__ import annotations

import os

import pytest

from vertjax import files


def test_the_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "annotations.csv"
    target.write_text("old\n")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"), target.read_text()))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_atomic(target, "new\n")

    assert target.read_text() == "new\n"
    # The temporary file is synced while the old content is still in place,
    # then renamed, then the folder is synced so that the rename persists.
    assert events == [
        ("fsync", False, "old\n"),
        ("replace", os.fspath(target)),
        ("fsync", True, "new\n"),
    ]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text('{"step": 1}\n')

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(target, '{"step": 2}\n')

    assert target.read_text() == '{"step": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
