"""Tests for vertjax.predict: inputs, coordinates, JSON/CSV/overlay outputs, the CLI."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vertjax import heatmaps, imaging, inference, overlay, predict, vertebrae
from vertjax import inputs as input_files

REPO = Path(__file__).resolve().parents[1]
SIZE = 264
# Large, non-square radiographs (width, height) and where their bright blob is.
WIDTH, HEIGHT = 1500, 3600


def _blob_image(x0: float, y0: float, *, seed: int) -> np.ndarray:
    """float [H, W] in [0, 1]: background 0.1, a Gaussian blob of peak 0.8 at (x0, y0).

    The blob is about 2 model pixels wide in both axes. 0.7 % of the pixels
    are isolated salt at 1.0, so that the 0.5-99.5 % window of 16-bit and
    DICOM sources keeps the blob unclipped; the box-filter resize averages
    the salt away.
    """
    rng = np.random.default_rng(seed)
    sx, sy = 2.0 * WIDTH / SIZE, 2.0 * HEIGHT / SIZE
    xs = np.arange(WIDTH) + 0.5
    ys = np.arange(HEIGHT) + 0.5
    blob = np.exp(-0.5 * ((ys[:, None] - y0) / sy) ** 2 - 0.5 * ((xs[None, :] - x0) / sx) ** 2)
    pixels = 0.1 + 0.7 * blob
    pixels[rng.random(pixels.shape) < 0.007] = 1.0
    return pixels.astype(np.float32)


# (file name, blob x, blob y, (row, column) pixel spacing in mm or None)
FILES = (
    ("upper.png", 300.25, 700.5, None),
    ("lower.tif", 1111.3, 2507.8, None),
    ("mono1.dcm", 750.0, 1800.0, (0.2, 0.2)),
    ("mono2_no_suffix", 1200.7, 400.2, (0.143, 0.286)),
)


def _write_inputs(folder: Path) -> dict[str, tuple[float, float, tuple[float, float] | None]]:
    """The mixed folder: 8-bit PNG, 16-bit TIFF, DICOM MONOCHROME1 and 2."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, x0, y0, spacing) in enumerate(FILES):
        pixels = _blob_image(x0, y0, seed=seed)
        path = folder / name
        if name.endswith(".png"):
            Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
        elif name.endswith(".tif"):
            Image.fromarray(np.rint(pixels * 60000).astype(np.uint16)).save(path)
        elif name == "mono1.dcm":
            # MONOCHROME1 stores bone dark: the reader must invert it.
            imaging.write_dicom(
                path,
                np.rint((1 - pixels) * 4095),
                photometric="MONOCHROME1",
                spacing=spacing,
                bits_stored=12,
            )
        else:
            imaging.write_dicom(path, np.rint(pixels * 4095), spacing=spacing, bits_stored=12)
    return {name: (x0, y0, spacing) for name, x0, y0, spacing in FILES}


def _identity_model(traces: list | None = None) -> inference.Predictor:
    """A stand-in network whose 13 heatmaps are its input image itself.

    Everything else (reading, resizing, normalisation, decoding, mapping to
    original pixels, presence, writing) is the real code under test.
    """

    def apply(variables, images):
        if traces is not None:
            traces.append(images.shape)  # runs once per compilation
        grey = images * variables["scale"]  # undo the (x - 0) / 255 normalisation
        return jnp.repeat(grey, vertebrae.K, axis=-1)

    return inference.Predictor(
        apply=apply,
        variables={"scale": jnp.float32(1.0)},
        image_size=SIZE,
        pixel_mean=0.0,
        pixel_std=255.0,
        presence_threshold=0.5,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return folder, _write_inputs(folder)


def test_centroids_come_back_in_original_pixels(inputs, tmp_path):
    folder, truth = inputs
    traces = []
    out = tmp_path / "out"
    files = input_files.find_inputs([folder])
    outcome = predict.predict_files(_identity_model(traces), files, out, batch_size=3)
    assert outcome.failures == []
    # Two batches (3 + 1 padded), one compilation.
    assert traces == [(3, SIZE, SIZE, 1)]
    for name, (x0, y0, spacing) in truth.items():
        record = json.loads((out / f"{Path(name).stem}.json").read_text())
        assert (record["width"], record["height"]) == (WIDTH, HEIGHT)
        expected = None if spacing is None else {"row": spacing[0], "column": spacing[1]}
        assert record["pixel_spacing_mm"] == expected
        for v in record["vertebrae"]:
            # A tenth of a model pixel: 0.57 px across, 1.4 px down here (measured: < 0.03).
            assert v["x"] == pytest.approx(x0, abs=0.1 * WIDTH / SIZE), name
            assert v["y"] == pytest.approx(y0, abs=0.1 * HEIGHT / SIZE), name
            assert v["present"] and v["confidence"] > 0.6
            if spacing is None:
                assert v["x_mm"] is None and v["y_mm"] is None
            else:
                assert v["x_mm"] == pytest.approx(v["x"] * spacing[1], abs=1e-3)
                assert v["y_mm"] == pytest.approx(v["y"] * spacing[0], abs=1e-3)


def test_to_original_scales_each_axis_by_its_own_size():
    points = np.array([[0.0, 0.0], [264.0, 264.0], [132.0, 66.0]])
    np.testing.assert_allclose(
        inference.to_original(points, width=1500, height=3600, size=264),
        [[0, 0], [1500, 3600], [750, 900]],
    )


def test_find_inputs_recurses_and_recognises_dicom_by_magic(inputs, tmp_path):
    folder, truth = inputs
    extra = tmp_path / "extra"
    (extra / "deep").mkdir(parents=True)
    (extra / "notes.txt").write_text("not an image")
    (extra / ".hidden.png").write_bytes(b"x")
    (extra / "deep" / "scan").write_bytes((folder / "mono2_no_suffix").read_bytes())
    found = input_files.find_inputs([folder, extra, folder / "upper.png", extra / "missing.png"])
    assert [p.name for p in found] == [*sorted(truth), "scan", "missing.png"]


def test_output_names_disambiguate_shared_stems(tmp_path):
    files = [
        tmp_path / "a" / "x.png",
        tmp_path / "b" / "x.dcm",
        tmp_path / "b" / "X.tif",
        tmp_path / "b" / "y.png",
        tmp_path / "a__x_png.png",
    ]
    names = input_files.output_names(files)
    assert names == ["a__x_png", "b__x_dcm", "b__X_tif", "y", "a__x_png-2"]
    assert len({n.lower() for n in names}) == len(names)


def test_prediction_record_schema():
    points = np.arange(2 * vertebrae.K, dtype=np.float64).reshape(vertebrae.K, 2) + 0.123456
    conf = np.linspace(0, 1, vertebrae.K)
    record = predict.prediction_record(
        image="a.png",
        width=10,
        height=20,
        spacing=imaging.PixelSpacing(0.5, 0.25, "PixelSpacing"),
        points=points,
        confidence=conf,
        present=conf >= 0.5,
        model={"model": "m", "checkpoint_step": 3},
    )
    assert list(record) == [
        "image",
        "width",
        "height",
        "pixel_spacing_mm",
        "pixel_spacing_source",
        "model",
        "vertebrae",
    ]
    assert record["pixel_spacing_mm"] == {"row": 0.5, "column": 0.25}
    assert record["pixel_spacing_source"] == "PixelSpacing"
    assert record["model"] == {"model": "m", "checkpoint_step": 3}
    assert [v["name"] for v in record["vertebrae"]] == list(vertebrae.NAMES)
    t6 = record["vertebrae"][2]
    assert t6 == {
        "name": "T6",
        "x": 4.1235,
        "y": 5.1235,
        "confidence": round(2 / 12, 6),
        "present": False,
        "x_mm": 1.0309,  # x times the column spacing
        "y_mm": 2.5617,  # y times the row spacing
    }
    json.dumps(record, allow_nan=False)


def test_overlay_marks_points_in_original_pixels():
    pixels = np.zeros((3000, 1000), np.float32)
    points = np.stack([np.full(vertebrae.K, 500.0), np.linspace(100, 2900, vertebrae.K)], 1)
    present = np.arange(vertebrae.K) % 2 == 0
    fig = overlay.draw(pixels, points, np.full(vertebrae.K, 0.9), present)
    ax = fig.axes[0]
    (image,) = ax.get_images()
    # The image is drawn downscaled, but spans the original pixel extent.
    assert image.get_array().shape == (1000, 333)
    assert image.get_extent() == [0.0, 999.0, 3000.0, 0.0]
    assert ax.get_xlim() == (0.0, 1000.0) and ax.get_ylim() == (3000.0, 0.0)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), points[present])
    assert sorted(t.get_text() for t in ax.texts) == sorted(np.array(vertebrae.NAMES)[present])
    png = overlay.to_png(fig)
    assert png.startswith(b"\x89PNG")


EXPECTED_NAMES = ("T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4")
# Where each layer of `_fixed_model` peaks (model pixel centres, x and y in
# different orders) and how high (a confidence of its own, below and above
# the 0.5 presence threshold): swapping any two layers moves their points.
LAYER_XY = np.stack(
    [20.5 + 17 * ((5 * np.arange(13)) % 13), 15.5 + 18 * np.arange(13)], axis=-1
).astype(np.float32)
LAYER_PEAK = (0.32 + 0.05 * np.arange(13)).astype(np.float32)


def _fixed_model():
    """A stand-in network whose layer k is a Gaussian of height LAYER_PEAK[k] at
    LAYER_XY[k], whatever the image; the rest of prediction is the real code."""
    maps = heatmaps.render(
        jnp.asarray(LAYER_XY[None]), jnp.ones((1, 13), bool), height=SIZE, width=SIZE, sigma=3.0
    ) * jnp.asarray(LAYER_PEAK)

    def apply(variables, images):
        return jnp.broadcast_to(variables["maps"], (images.shape[0], *maps.shape[1:]))

    return dataclasses.replace(_identity_model(), apply=apply, variables={"maps": maps})


def _assert_csv_matches_json(out: Path) -> None:
    """Every cell of the CSV equals the value in the JSON of its image.

    Cells are compared as written: str() of the JSON value, empty for null.
    A column that this does not know fails, so that new columns get checked too.
    """
    with (out / predict.CSV_FILE).open() as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    per_image = ("image", "width", "height", "pixel_spacing_source")
    spacing = {"pixel_spacing_row_mm": "row", "pixel_spacing_column_mm": "column"}
    stamp = ("model", "checkpoint_step", "vertjax_version", "config_sha256")
    per_vertebra = {"vertebra": "name", "x": "x", "y": "y", "confidence": "confidence"}
    per_vertebra |= {"present": "present", "x_mm": "x_mm", "y_mm": "y_mm"}
    assert set(columns) == {"path", "output", *per_image, *spacing, *stamp, *per_vertebra}

    def cell(value) -> str:
        return "" if value is None else str(value)

    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    by_output: dict[str, list[dict]] = {}
    for row in rows:
        by_output.setdefault(row["output"], []).append(row)
    assert sorted(by_output) == sorted(records)
    for output, group in by_output.items():
        record = records[output]
        assert [row["vertebra"] for row in group] == list(EXPECTED_NAMES)
        for row, v in zip(group, record["vertebrae"], strict=True):
            assert Path(row["path"]).name == record["image"]
            for column in per_image:
                assert row[column] == cell(record[column]), (output, column)
            for column, key in spacing.items():
                assert row[column] == cell((record["pixel_spacing_mm"] or {}).get(key)), output
            for column in stamp:
                assert row[column] == cell(record["model"][column]), (output, column)
            for column, key in per_vertebra.items():
                assert row[column] == cell(v[key]), (output, v["name"], column)


def test_each_name_is_its_own_layer_in_json_and_csv(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    # (width, height, (row, column) spacing): tall without one, wide with
    # non-square pixels, where x_mm must use the column spacing.
    sizes = {"tall.png": (1500, 3600, None), "wide.dcm": (900, 700, (0.2, 0.1))}
    rng = np.random.default_rng(0)  # the network ignores the pixels; the reader refuses blanks
    Image.fromarray(rng.integers(0, 255, (3600, 1500), np.uint8)).save(inputs / "tall.png")
    imaging.write_dicom(inputs / "wide.dcm", rng.integers(0, 4095, (700, 900)), spacing=(0.2, 0.1))
    out = tmp_path / "out"
    outcome = predict.predict_files(
        _fixed_model(), input_files.find_inputs([inputs]), out, overlays=False
    )
    assert outcome.failures == []
    for name, (width, height, spacing) in sizes.items():
        record = json.loads((out / f"{Path(name).stem}.json").read_text())
        assert [v["name"] for v in record["vertebrae"]] == list(EXPECTED_NAMES)
        for k, v in enumerate(record["vertebrae"]):
            where = (name, v["name"])
            x, y = LAYER_XY[k] * [width / SIZE, height / SIZE]
            assert v["x"] == pytest.approx(x, abs=1e-3), where
            assert v["y"] == pytest.approx(y, abs=1e-3), where
            assert v["confidence"] == pytest.approx(LAYER_PEAK[k], abs=1e-5), where
            assert v["present"] is bool(LAYER_PEAK[k] >= 0.5), where
            if spacing is None:
                assert v["x_mm"] is None and v["y_mm"] is None, where
            else:
                assert v["x_mm"] == pytest.approx(x * spacing[1], abs=1e-3), where
                assert v["y_mm"] == pytest.approx(y * spacing[0], abs=1e-3), where
    _assert_csv_matches_json(out)


# The command line, with a checkpoint made by the checkpoint module.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, write_constant_run):
    """A training workdir with one checkpoint of the tiny test config.

    Every heatmap is constant: each layer decodes to the centre of model
    pixel (0, 0), with confidence 0.8 for T4-T10 and 0.2 after.
    """
    from configs import test as test_config

    bias = np.where(np.arange(vertebrae.K) < 7, 0.8, 0.2)
    meta = {"pixel_mean": 120.0, "pixel_std": 60.0}
    workdir = tmp_path_factory.mktemp("run")
    return write_constant_run(workdir, test_config.get_config(), bias, meta=meta)


@pytest.fixture(scope="module")
def cli(run_dir, inputs, tmp_path_factory):
    """One run of the command line over the mixed folder plus bad and colliding files."""
    folder, _ = inputs
    extra = tmp_path_factory.mktemp("extra")
    (extra / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (extra / "notes.txt").write_text("ignored in folders")
    (extra / "sub").mkdir()
    Image.fromarray(np.full((400, 300), 128, np.uint8)).save(extra / "sub" / "upper.png")
    out = tmp_path_factory.mktemp("out")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vertjax.predict",
            f"--workdir={run_dir}",
            "--checkpoint=latest",
            f"--out={out}",
            "--batch_size=2",
            str(folder),
            str(extra),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, out, folder, extra


def test_cli_reports_the_corrupt_file_and_writes_the_others(cli):
    result, out, folder, extra = cli
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "corrupt.png" in line]
    assert len(lines) == 1
    assert lines[0].startswith(f"{extra / 'corrupt.png'}: unreadable image")
    stems = sorted(p.stem for p in out.glob("*.json"))
    # upper.png exists twice: both are kept under their relative paths.
    assert stems == sorted(
        ["inputs0__upper_png", "extra0__sub__upper_png", "lower", "mono1", "mono2_no_suffix"]
    )
    assert not list(out.glob(".*.tmp"))


def test_cli_json_schema_and_values(cli, run_dir):
    _, out, folder, _ = cli
    for path in out.glob("*.json"):
        record = json.loads(path.read_text())
        assert set(record) == {
            "image",
            "width",
            "height",
            "pixel_spacing_mm",
            "pixel_spacing_source",
            "model",
            "vertebrae",
        }
        assert isinstance(record["width"], int) and isinstance(record["height"], int)
        assert [v["name"] for v in record["vertebrae"]] == list(vertebrae.NAMES)
        w, h = record["width"], record["height"]
        for k, v in enumerate(record["vertebrae"]):
            assert set(v) == {"name", "x", "y", "confidence", "present", "x_mm", "y_mm"}
            # Constant heatmaps: the centre of model pixel (0, 0), mapped back.
            assert v["x"] == pytest.approx(0.5 * w / SIZE, abs=1e-3)
            assert v["y"] == pytest.approx(0.5 * h / SIZE, abs=1e-3)
            assert v["confidence"] == pytest.approx(0.8 if k < 7 else 0.2, abs=1e-5)
            assert v["present"] is (k < 7)  # config presence_threshold 0.5
    mono1 = json.loads((out / "mono1.json").read_text())
    assert mono1["image"] == "mono1.dcm"
    assert mono1["pixel_spacing_mm"] == {"row": 0.2, "column": 0.2}
    assert mono1["pixel_spacing_source"] == "PixelSpacing"
    # Provenance: the run folder, its checkpoint and the config's hash.
    stamp = mono1["model"]
    assert Path(stamp["model"]).resolve() == run_dir.resolve()
    assert stamp["checkpoint_step"] == 6 and len(stamp["config_sha256"]) == 64
    assert mono1["vertebrae"][0]["x_mm"] == pytest.approx(
        mono1["vertebrae"][0]["x"] * 0.2, abs=1e-3
    )
    sub = json.loads((out / "extra0__sub__upper_png.json").read_text())
    assert (sub["image"], sub["width"], sub["height"], sub["pixel_spacing_mm"]) == (
        "upper.png",
        300,
        400,
        None,
    )


def test_cli_csv_and_overlays(cli):
    _, out, _, _ = cli
    with (out / predict.CSV_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == predict.CSV_COLUMNS
    assert len(rows) == 5 * vertebrae.K
    _assert_csv_matches_json(out)
    for stem in {row["output"] for row in rows}:
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_unreadable_input_is_reported_by_name(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    good = tmp_path / "good.png"
    Image.fromarray(np.full((300, 200), 50, np.uint8)).save(good)
    errors = []
    outcome = predict.predict_files(
        _identity_model(),
        [bad, good, tmp_path / "gone.png"],
        tmp_path / "out",
        on_error=errors.append,
    )
    assert [Path(p).name for p, _ in outcome.failures] == ["bad.dcm", "gone.png"]
    assert errors[0] == f"{bad}: DICOM has no Rows/Columns: no image in it"
    assert errors[1] == f"{tmp_path / 'gone.png'}: file not found"
    assert [Path(p).name for p in outcome.written] == ["good.json"]
    with (tmp_path / "out" / predict.CSV_FILE).open() as f:
        assert len(list(csv.DictReader(f))) == vertebrae.K


def test_load_model_errors_name_the_workdir(tmp_path, run_dir):
    with pytest.raises(ValueError, match="no checkpoints folder"):
        inference.load(workdir=tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint '7' not in"):
        inference.load(workdir=run_dir, checkpoint="7")
    model = inference.load(workdir=run_dir, checkpoint="best")
    assert model.step == 6 and model.image_size == SIZE
    assert (model.pixel_mean, model.pixel_std) == (120.0, 60.0)


def test_one_compilation_across_calls_for_the_same_model(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((300 + 10 * i, 200), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    traces = []
    model = _identity_model(traces)
    files = input_files.find_inputs([tmp_path])
    predict.predict_files(model, files, tmp_path / "a", batch_size=2, overlays=False)
    predict.predict_files(model, files[1:], tmp_path / "b", batch_size=2, overlays=False)
    assert traces == [(2, SIZE, SIZE, 1)]
    # A single file runs at batch 1 rather than padding to the batch size.
    predict.predict_files(model, files[:1], tmp_path / "c", batch_size=2, overlays=False)
    assert traces == [(2, SIZE, SIZE, 1), (1, SIZE, SIZE, 1)]
    assert not list((tmp_path / "a").glob("*_overlay.png"))
    assert len(list((tmp_path / "a").glob("*.json"))) == 3


def test_load_model_applies_the_configured_postprocessing(
    tmp_path, monkeypatch, write_constant_run
):
    """With post-processing on, the prior is fitted on the run's training labels."""
    from configs import test as test_config
    from vertjax import datasets, postprocess

    config = test_config.get_config()
    config.postprocess.enabled = True
    write_constant_run(tmp_path, config, 0.0, step=3, metrics={"id_accuracy": 0.5})
    # Vertebrae 20 model px apart, straight down: the fitted prior must say so.
    ys = 20.0 + 15.0 * np.arange(vertebrae.K)
    centroids = np.stack([np.full(vertebrae.K, 132.0), ys], 1) / SIZE
    records = [{"centroids": centroids, "labeled": np.ones(vertebrae.K, bool)}] * 3

    class Builder:
        class info:  # noqa: N801 - mimics tfds' builder.info
            metadata = {"pixel_mean": 90.0, "pixel_std": 30.0}

        def as_data_source(self, split):
            assert split == "train"
            return records

    requested = []
    monkeypatch.setattr(
        datasets, "get_builder", lambda name, **kw: requested.append((name, kw)) or Builder()
    )
    model = inference.load(workdir=tmp_path, checkpoint="best")
    assert requested == [
        ("synthetic_small", {"data_dir": None, "manual_dir": None, "build": False})
    ]
    assert (model.pixel_mean, model.pixel_std) == (90.0, 30.0)
    assert model.locate.func is postprocess.locate
    assert model.locate.keywords["enabled"] is True
    prior = model.locate.keywords["prior"]
    np.testing.assert_allclose(prior.mean, np.full(vertebrae.K - 1, 15.0), rtol=1e-5)
    points, confidence = inference.make_infer(model)(np.zeros((2, SIZE, SIZE), np.uint8))
    assert points.shape == (2, vertebrae.K, 2) and confidence.shape == (2, vertebrae.K)
