"""Tests for vertjax.shipped: the model that ships, its checks, and predict's use of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from vertjax import datasets, inference, shipped, vertebrae

REPO = Path(__file__).resolve().parents[1]
AASCE_DIR = REPO.parent / "shared" / "data" / "aasce"
# The shipped model's floor on both aasce_fov validation splits: it scores 73.7 %
# and 67.3 % (MODEL_CARD.md), short of the 85 % a finished recipe should reach.
MIN_ID_ACCURACY = 0.66


@pytest.fixture(scope="module")
def model():
    return inference.load()


def _film(seed: int = 0, shape=(700, 300)) -> np.ndarray:
    """A smooth uint8 test film: the model must run on it, whatever it finds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    spine = np.exp(-(((x - shape[1] / 2) / 30.0) ** 2)) * (0.6 + 0.4 * np.sin(y / 25.0) ** 2)
    return np.clip(60 + 150 * spine + rng.normal(0, 5, shape), 0, 255).astype(np.uint8)


def test_the_default_model_ships_and_verifies():
    assert shipped.DEFAULT_MODEL in shipped.names()
    found = shipped.load()
    info = found.info
    assert info["vertebrae"] == list(vertebrae.NAMES)
    assert info["training_data"] == "spine_radiographs/aasce_fov"
    assert (shipped.SHIPPED_DIR / shipped.DEFAULT_MODEL / shipped.PARAMS_FILE).stat().st_size < 20e6
    assert found.prior is not None and found.config.postprocess.enabled
    assert 0 < found.pixel_std and 0 < found.pixel_mean < 255


def test_shipped_model_predicts_deterministically(model):
    infer = inference.make_infer(model)
    s = model.image_size
    films = np.stack(
        [np.asarray(Image.fromarray(_film(i)).resize((s, s), Image.BILINEAR)) for i in range(2)]
    )
    points, confidence = jax.device_get(infer(films))
    again, again_confidence = jax.device_get(infer(films))
    np.testing.assert_array_equal(points, again)
    np.testing.assert_array_equal(confidence, again_confidence)
    assert points.shape == (2, vertebrae.K, 2) and confidence.shape == (2, vertebrae.K)
    assert np.all(np.isfinite(points)) and np.all((points >= 0) & (points <= s))


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(shipped.SHIPPED_DIR / shipped.DEFAULT_MODEL, folder)
    return folder


def test_a_damaged_copy_is_refused_by_checksum(tmp_path):
    folder = _copy(tmp_path)
    assert shipped.load(folder).name == "copy"  # an intact copy loads
    params = folder / shipped.PARAMS_FILE
    blob = bytearray(params.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    params.write_bytes(bytes(blob))
    with pytest.raises(shipped.ShippedModelError, match=r"params.msgpack: checksum .* damaged"):
        shipped.load(folder)
    params.unlink()
    with pytest.raises(shipped.ShippedModelError, match="params.msgpack: missing"):
        shipped.load(folder)


def test_a_mismatched_config_or_broken_description_is_refused(tmp_path):
    folder = _copy(tmp_path)
    info_path = folder / shipped.INFO_FILE
    info = json.loads(info_path.read_text())
    info["config"]["model"]["features"] *= 2
    info_path.write_text(json.dumps(info))
    with pytest.raises(shipped.ShippedModelError, match=r"parameter .* but .* configured network"):
        shipped.load(folder)
    info_path.write_text(info_path.read_text()[:100])
    with pytest.raises(shipped.ShippedModelError, match="model.json: unreadable"):
        shipped.load(folder)


def test_an_unknown_name_lists_the_shipped_models():
    with pytest.raises(
        shipped.ShippedModelError, match=rf"unknown model 'nope'.*{shipped.DEFAULT_MODEL}"
    ):
        shipped.load("nope")


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vertjax.predict", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_without_a_workdir_uses_the_shipped_model(tmp_path):
    image = tmp_path / "film.png"
    Image.fromarray(_film()).save(image)
    result = _predict(f"--out={tmp_path / 'out'}", str(image))
    assert result.returncode == 0, result.stderr
    assert f"model {shipped.DEFAULT_MODEL}" in result.stderr
    record = json.loads((tmp_path / "out" / "film.json").read_text())
    assert [v["name"] for v in record["vertebrae"]] == list(vertebrae.NAMES)
    unknown = _predict("--model=nope", f"--out={tmp_path / 'out2'}", str(image))
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert f"unknown model 'nope': the shipped models are {shipped.DEFAULT_MODEL}" in unknown.stderr


def _evaluator(found: shipped.Shipped):
    """An evaluator of a shipped model as it predicts (its statistics, prior and decoding)."""
    from vertjax import evaluate, models, sharding

    return evaluate.Evaluator(
        found.config,
        sharding.make_mesh(1),
        apply_fn=models.from_config(found.config).apply,
        mean=found.pixel_mean,
        std=found.pixel_std,
        prior=found.prior,
    )


@pytest.mark.skipif(not AASCE_DIR.is_dir(), reason="../shared/data/aasce not present")
def test_shipped_model_scores_on_the_aasce_fov_validation_crops(tmp_path):
    """The shipped model reproduces the validation figures its model card states."""
    found = shipped.load()
    builder = datasets.get_builder("aasce_fov", data_dir=str(tmp_path), manual_dir=str(AASCE_DIR))
    evaluator = _evaluator(found)
    recorded = found.info["metrics"]
    for split in ("validation", "validation_wide"):
        summary = evaluator.run(found.params, builder.as_data_source(split))
        assert summary["id_accuracy"] == pytest.approx(recorded[split]["id_accuracy"], abs=0.005)
        assert summary["id_accuracy"] >= MIN_ID_ACCURACY, split


def test_the_phantom_model_is_labelled_and_names_held_out_phantom_films(data_dir):
    """The demo model (and the aasce_fov recipe's starting point) is what it says it is."""
    found = shipped.load("phantom")
    assert found.info["training_data"] == "spine_radiographs/synthetic"
    assert "never for real radiographs" in found.info["description"]
    assert sorted(shipped.names()) == ["aasce_fov", "phantom"]
    builder = datasets.get_builder("synthetic_small", data_dir=data_dir)
    evaluator = _evaluator(found)
    # Participants are split by a hash of their id, so these films are held
    # out in the full phantom set the model trained on too (it scores 97.8 %
    # and 100 % on these 14 and 6 films; 95.6 % on the full test split).
    for split in ("validation", "test"):
        summary = evaluator.run(found.params, builder.as_data_source(split))
        assert summary["id_accuracy"] >= 0.9, split
