"""Shared test fixtures: writers for small synthetic image files, a built dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _write_dicom(
    path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] | None = (0.2, 0.2),
    spacing_tag: str = "PixelSpacing",
    slope: float = 1.0,
    intercept: float = 0.0,
    with_pixels: bool = True,
    frames: int = 1,
) -> None:
    """Writes uint16 pixels ([H, W], or [F, H, W] when frames > 1) as a DICOM file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    pixels = np.asarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if spacing is not None:
        setattr(ds, spacing_tag, list(spacing))
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def write_dicom():
    """A function writing a small DICOM file; see `_write_dicom`."""
    return _write_dicom


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
