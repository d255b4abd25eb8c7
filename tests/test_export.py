"""Tests for vertjax.export / vertjax.exported and the exact resize they share."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from vertjax import export, exported, inference, resample, runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor() -> inference.Predictor:
    """The tiny test network with drawn weights, decoded without post-processing."""
    config = test_config.get_config()
    shapes = jax.eval_shape(lambda: runs.create_train_state(config, jax.random.key(0)).params)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    trained = runs.Trained(
        config=config,
        params=params,
        pixel_mean=110.0,
        pixel_std=55.0,
        prior=None,
        step=7,
        source="test run",
    )
    return inference.from_trained(trained)


@pytest.fixture(scope="module")
def model_file(predictor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exported") / "test.vjx"
    export.export_model(predictor, path)
    return path


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth film with 8-bit grey levels: many exact ties for the resize's rounding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = 0.5 + 0.3 * np.sin(6 * yy + 3 * xx) + 0.1 * rng.standard_normal((height, width))
    return (np.rint(np.clip(smooth, 0, 1) * 255) / 255).astype(np.float32)


@pytest.mark.parametrize("size", [(700, 300), (2375, 891), (100, 80), (150, 400)])
def test_resize_is_the_same_in_numpy_and_jax(size):
    pixels = _image(*size, seed=1)
    matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.int32)
    in_jax = jax.jit(lambda p: resample.resize(jnp, p, 264, matmul=matmul))(pixels)
    np.testing.assert_array_equal(np.asarray(in_jax), resample.resize(np, pixels, 264))


@pytest.mark.parametrize("size", [(2375, 891), (528, 792), (100, 80), (263, 1000)])
def test_resize_is_pil_within_one_grey_level(size):
    """BOX when both sides shrink, else BILINEAR, as PIL on float images (no
    centre on a footprint edge at these sizes)."""
    pixels = _image(*size, seed=2)
    method = Image.Resampling.BOX if min(size) >= 264 else Image.Resampling.BILINEAR
    pil = np.asarray(Image.fromarray(pixels, mode="F").resize((264, 264), method)) * 255
    ours = resample.resize(np, pixels, 264)
    assert np.abs(ours - np.rint(pil)).max() <= 1


def test_exported_file_names_the_same_points_as_the_checkpoint(predictor, model_file):
    model = exported.load(model_file)
    assert model.names[0] == "T4" and len(model.names) == 13
    for size in ((700, 300), (120, 90)):  # BOX and BILINEAR resizing
        pixels = _image(*size, seed=3)
        found = model(pixels)
        (expected,) = inference.predict(predictor, [pixels])
        np.testing.assert_allclose(found.xy, expected.xy, atol=1e-2)
        np.testing.assert_allclose(found.confidence, expected.confidence, atol=1e-5)
        np.testing.assert_array_equal(found.present, expected.present)


def test_metadata_describes_the_model(model_file):
    with zipfile.ZipFile(model_file) as archive:
        info = json.loads(archive.read(exported.METADATA_FILE))
    assert info["format"] == exported.FORMAT
    assert info["platforms"] == ["cpu", "cuda", "tpu"]
    assert info["training_data"] == "spine_radiographs/synthetic_small"
    assert info["provenance"]["model"] == "test run"
    assert info["provenance"]["checkpoint_step"] == 7
    assert len(info["function_sha256"]) == 64 and "[H, W]" in info["input"]


def test_damaged_or_foreign_file_refused(model_file, tmp_path):
    with zipfile.ZipFile(model_file) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    damaged = tmp_path / "damaged.vjx"
    blob = bytearray(parts[exported.FUNCTION_FILE])
    blob[len(blob) // 2] ^= 0xFF
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr(exported.METADATA_FILE, parts[exported.METADATA_FILE])
        archive.writestr(exported.FUNCTION_FILE, bytes(blob))
    with pytest.raises(
        exported.ExportedModelError, match="damaged.vjx: function.stablehlo is damaged"
    ):
        exported.load(damaged)
    foreign = tmp_path / "foreign.vjx"
    foreign.write_bytes(b"not a zip at all")
    with pytest.raises(exported.ExportedModelError, match="foreign.vjx: not a vertjax exported"):
        exported.load(foreign)


def test_loader_needs_neither_flax_nor_orbax(model_file):
    """In a process where flax, orbax and the training code cannot be imported."""
    script = f"""
import sys
for name in ("flax", "orbax", "orbax.checkpoint", "optax", "tensorflow_datasets", "vertjax.models"):
    sys.modules[name] = None
import numpy as np
from vertjax import exported
model = exported.load({str(model_file)!r})
found = model(np.full((300, 200), 0.5, np.float32))
print(found.xy.shape, found.confidence.shape)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(13, 2) (13,)"
