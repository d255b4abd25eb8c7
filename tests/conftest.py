"""Shared test fixtures: writers for small synthetic image files, a built dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_dicom():
    """A function writing a small DICOM file; see `vertjax.imaging.write_dicom`."""
    from vertjax import imaging

    return imaging.write_dicom


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding spine_radiographs/synthetic_small, built once per session."""
    path = tmp_path_factory.getbasetemp() / "vertjax_tfds"
    # Built in a child process: the builder's workers must not fork this
    # process, where JAX's threads already run.
    command = [sys.executable, "-m", "vertjax.data", "build", "--config=synthetic_small"]
    done = subprocess.run(
        [*command, f"--data_dir={path}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(path)
