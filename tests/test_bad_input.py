"""Bad input is refused clearly and leaves nothing half-written behind.

Across the dataset builder (image reader, folder csv), `predict` and the
training configs and checkpoints: each case asserts a message that names the
file (and row or field) and the fault, and that no dataset folder or partial
output remains. A representative subset runs the real command lines
(`python -m vertjax.data build`, `python -m vertjax.predict`,
`python -m vertjax.main`) and checks their exit status and that stderr holds
no traceback; the rest call the functions directly to stay fast. Odd but valid
inputs (RGB, palette, 16-bit, EXIF-rotated, MONOCHROME1, rescaled DICOM) must
work and give the right values. Also: no module loads data with pickle.
"""

from __future__ import annotations

import csv
import importlib
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pydicom
import pytest
from flax.training import train_state
from PIL import Image

from configs import test as test_config
from tfds_builder.spine_radiographs import folder as folder_source
from vertjax import (
    checkpoints,
    config_checks,
    datasets,
    evaluate,
    imaging,
    inference,
    predict,
    runs,
    train,
    vertebrae,
)

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["image", "participant", "vertebra", "x", "y", "split"]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def _assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1, the message on stderr, no traceback."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert message in done.stderr, done.stderr[-3000:]


# --- files ---------------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming width x height 8-bit grey pixels, with almost no data.

    Nothing of that size is ever allocated here: the reader must refuse it
    from the header.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _noise(height: int = 120, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _write_bad_image(path: Path, case: str, write_dicom) -> str:
    """Writes one faulty image file; returns the reason the reader must give."""
    if case == "zero bytes":
        path.write_bytes(b"")
        return "empty file"
    if case == "truncated":
        Image.fromarray(_noise(400, 300)).save(path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 3])
        return "unreadable image"
    if case == "text named .png":
        path.write_text("image,participant,vertebra\nthis is a csv file, not a PNG\n")
        return "unreadable image"
    if case == "few pixels":
        Image.fromarray(_noise(6, 5)).save(path)
        return "image of 5 x 6 pixels is smaller than 32 px a side"
    if case == "bomb header":
        _png_claiming(path, 100_000, 100_000)
        return "image too large"
    if case == "over the pixel limit":
        _png_claiming(path, 9000, 9000)  # below PIL's own bomb limit, above ours
        return f"image of 9000 x 9000 pixels exceeds the limit of {imaging.MAX_PIXELS} pixels"
    if case == "non-finite float":
        values = np.ones((64, 64), np.float32)
        values[10, 20] = np.nan
        Image.fromarray(values, mode="F").save(path)
        return "image holds non-finite values"
    if case == "blank":
        Image.fromarray(np.full((120, 80), 7, np.uint16)).save(path)
        return "image is blank: every pixel has the value 7"
    if case == "dicom without pixels":
        write_dicom(path, np.zeros((64, 64)), with_pixels=False)
        return "DICOM has no pixel data"
    if case == "dicom truncated pixels":
        write_dicom(path, np.zeros((64, 64)))
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:1000]
        ds.save_as(path)
        return "cannot decode DICOM pixel data"
    if case == "dicom bomb header":
        write_dicom(path, np.zeros((64, 64)))
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = 60_000, 60_000
        ds.save_as(path)
        return "image of 60000 x 60000 pixels exceeds the limit"
    raise AssertionError(case)


BAD_IMAGES = {
    "zero bytes": "zero.png",
    "truncated": "cut.png",
    "text named .png": "notes.png",
    "few pixels": "icon.png",
    "bomb header": "bomb.png",
    "over the pixel limit": "huge.png",
    "non-finite float": "nan.tif",
    "blank": "blank.tif",
    "dicom without pixels": "nopixels.dcm",
    "dicom truncated pixels": "cut.dcm",
    "dicom bomb header": "bomb.dcm",
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_named_with_its_fault(tmp_path, write_dicom, case):
    path = tmp_path / BAD_IMAGES[case]
    reason = _write_bad_image(path, case, write_dicom)
    with pytest.raises(imaging.ImageError) as info:
        imaging.read_radiograph(path)
    assert str(info.value).startswith(f"{path}: {reason}")
    assert info.value.path == str(path)


def test_bomb_is_refused_from_the_header_alone(tmp_path):
    path = tmp_path / "bomb.png"
    _png_claiming(path, 100_000, 100_000)
    assert path.stat().st_size < 200
    # image_size reads the header only; both refuse before any decoding.
    with pytest.raises(imaging.ImageError, match="image too large"):
        imaging.image_size(path)


# --- odd but valid images: they must work, with the right values ---------------------------


def test_rgb_and_palette_give_luminance(tmp_path):
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[:, :24] = (200, 10, 50)
    rgb[:, 24:] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(
        tmp_path / "pal.png"
    )
    left = (0.299 * 200 + 0.587 * 10 + 0.114 * 50) / 255
    right = 0.587
    for name in ("rgb.png", "pal.png"):
        pixels = imaging.read_radiograph(tmp_path / name).pixels
        assert pixels.shape == (40, 48)
        np.testing.assert_allclose(pixels[:, :24], left, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(pixels[:, 24:], right, atol=1e-6, err_msg=name)


def test_16bit_is_windowed_to_its_percentiles(tmp_path):
    values = np.tile(np.arange(1000, 1000 + 64 * 10, 10, dtype=np.uint16), (48, 1))
    Image.fromarray(values).save(tmp_path / "deep.png")
    pixels = imaging.read_radiograph(tmp_path / "deep.png").pixels
    lo, hi = np.percentile(values.astype(np.float32), [0.5, 99.5])
    np.testing.assert_allclose(pixels, np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert pixels[0, 0] == 0.0 and pixels[0, -1] == 1.0


def _exif_rotated(path: Path) -> None:
    """Stored 60 high x 40 wide with a bright block top-left and EXIF orientation 6
    (display = stored turned 90 degrees clockwise): 40 high x 60 wide, block top-right."""
    stored = np.full((60, 40), 30, np.uint8)
    stored[:20, :20] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif.tobytes())


def test_exif_rotated_image_is_read_upright(tmp_path):
    path = tmp_path / "rotated.png"
    _exif_rotated(path)
    pixels = imaging.read_radiograph(path).pixels
    assert pixels.shape == (40, 60) == imaging.image_size(path)
    np.testing.assert_allclose(pixels[:20, 40:], 250 / 255, atol=1e-6)
    np.testing.assert_allclose(pixels[:, :40], 30 / 255, atol=1e-6)


def test_dicom_monochrome1_and_rescale_give_the_right_values(tmp_path, write_dicom):
    raw = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (40, 1))  # 40 x 80, a ramp

    def windowed(values):
        lo, hi = np.percentile(values, [0.5, 99.5])
        return np.clip((values - lo) / (hi - lo), 0, 1)

    write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1")
    # MONOCHROME1 shows low values white: inverted, so bone stays bright.
    m1 = imaging.read_radiograph(tmp_path / "m1.dcm")
    np.testing.assert_allclose(m1.pixels, 1 - windowed(raw.astype(float)), atol=1e-5)
    assert m1.pixels[0, 0] == 1.0 and m1.pixels[0, -1] == 0.0
    assert m1.spacing == imaging.PixelSpacing(0.2, 0.2, "PixelSpacing")
    # A negative slope turns the ramp around: the reader must apply it.
    write_dicom(tmp_path / "rescaled.dcm", raw, slope=-2.0, intercept=4000.0)
    rescaled = imaging.read_radiograph(tmp_path / "rescaled.dcm").pixels
    np.testing.assert_allclose(rescaled, windowed(raw * -2.0 + 4000.0), atol=1e-5)
    assert rescaled[0, 0] == 1.0 and rescaled[0, -1] == 0.0


def test_odd_valid_images_build_into_a_dataset(tmp_path, write_dicom):
    """RGB, palette, 16-bit, EXIF-rotated and MONOCHROME1 files build; the
    rotated one is labelled in its upright coordinates and its record agrees."""
    root = tmp_path / "folder"
    root.mkdir()
    rgb = np.stack([_noise(seed=1)] * 3, axis=-1)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "pal.png")
    Image.fromarray(_noise(seed=2).astype(np.uint16) * 200).save(root / "deep.png")
    write_dicom(root / "m1.dcm", _noise(seed=3), photometric="MONOCHROME1", slope=2, intercept=-7)
    _exif_rotated(root / "rotated.png")
    rows = [
        {"image": name, "participant": name, "vertebra": "T4", "x": 20, "y": 10, "split": "train"}
        for name in ("rgb.png", "pal.png", "deep.png", "m1.dcm")
    ]
    # Upright, the bright block covers x 40-60, y 0-20: its centre is (50, 10).
    rows.append(
        {"image": "rotated.png", "participant": "r", "vertebra": "L4", "x": 50, "y": 10}
        | {"split": "train"}
    )
    _write_csv(root, rows)
    builder = datasets.get_builder("folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(root))
    source = builder.as_data_source("train")
    records = {_text(source[i]["image_id"]): source[i] for i in range(len(source))}
    assert sorted(records) == ["deep.png", "m1.dcm", "pal.png", "rgb.png", "rotated.png"]
    rotated = records["rotated.png"]
    np.testing.assert_array_equal(rotated["original_size"], [40, 60])
    x, y = rotated["centroids"][vertebrae.index("L4")] * 264
    image = rotated["image"][:, :, 0]
    assert image[int(y), int(x)] > 240  # the label sits on the bright block
    assert image[30:, :100].max() < 40


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- folder csv ----------------------------------------------------------------------------


def _write_csv(root: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _folder(root: Path) -> list[dict]:
    """a.png and b.png, 40 wide x 80 high; three good rows."""
    root.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((80, 40), 100, np.uint8)).save(root / name)
    return [
        {"image": "a.png", "participant": "p", "vertebra": "T4", "x": 10, "y": 10},
        {"image": "a.png", "participant": "p", "vertebra": "T5", "x": 12, "y": 30},
        {"image": "b.png", "participant": "q", "vertebra": "L1", "x": 20, "y": 50},
    ]


def _bad_csv(root: Path, case: str) -> str:
    """A folder with one fault; returns the message (after the csv path) it must give."""
    rows = _folder(root)
    csv_path = root / "annotations.csv"
    text = None
    expected = None
    if case == "missing columns":
        _write_csv(root, rows, fields=["image", "participant", "x", "y"])
        return f"{csv_path}: missing column(s) vertebra"
    if case == "unknown vertebra":
        rows[2]["vertebra"] = "C7"
        expected = f"{csv_path} row 4: unknown vertebra 'C7': expected one of T4, T5,"
    elif case == "duplicate row":
        rows.append(dict(rows[1]))
        expected = f"{csv_path} row 5: duplicate vertebra T5 for image 'a.png' (first on row 3)"
    elif case == "nan coordinate":
        rows[1]["y"] = "nan"
        expected = f"{csv_path} row 3: column 'y' is not finite: 'nan'"
    elif case == "infinite coordinate":
        rows[0]["x"] = "-inf"
        expected = f"{csv_path} row 2: column 'x' is not finite: '-inf'"
    elif case == "negative coordinate":
        rows[2]["x"] = -0.5
        expected = f"{csv_path} row 4: point (-0.5, 50) of L1 lies outside image 'b.png'"
    elif case == "beyond the image":
        rows[0]["y"] = 80.25
        expected = (
            f"{csv_path} row 2: point (10, 80.25) of T4 lies outside image 'a.png' of 40 x 80"
        )
    elif case == "path with ..":
        Image.fromarray(np.full((80, 40), 9, np.uint8)).save(root.parent / "secret.png")
        rows[2]["image"] = "../secret.png"
        expected = f"{csv_path} row 4: image path '../secret.png' leaves the folder"
    elif case == "absolute path":
        Image.fromarray(np.full((80, 40), 9, np.uint8)).save(root.parent / "secret.png")
        rows[2]["image"] = str(root.parent / "secret.png")
        expected = f"{csv_path} row 4: image path '{root.parent / 'secret.png'}' is absolute"
    elif case == "link out of the folder":
        Image.fromarray(np.full((80, 40), 9, np.uint8)).save(root.parent / "secret.png")
        (root / "link.png").symlink_to(root.parent / "secret.png")
        rows[2]["image"] = "link.png"
        expected = f"{csv_path} row 4: image path 'link.png' leaves the folder"
    elif case == "unlisted link out of the folder":
        Image.fromarray(np.full((80, 40), 9, np.uint8)).save(root.parent / "secret.png")
        (root / "extra.png").symlink_to(root.parent / "secret.png")
        expected = f"{root / 'extra.png'}: image path 'extra.png' leaves the folder"
    elif case == "missing image":
        rows[2]["image"] = "c.png"
        expected = f"{csv_path} row 4: image file 'c.png' not found"
    elif case == "zero-byte image":
        (root / "b.png").write_bytes(b"")
        expected = f"{root / 'b.png'}: empty file (referenced on {csv_path} row 4)"
    elif case == "empty file":
        text = ""
        expected = f"{csv_path}: empty file, expected a header row"
    elif case == "header only":
        text = ",".join(FIELDS) + "\n"
        expected = f"{csv_path}: no annotation rows below the header"
    elif case == "not utf-8":
        rows[2]["participant"] = "J\xf6rg"
        _write_csv(root, rows)
        csv_path.write_bytes(csv_path.read_text().encode("latin-1"))
        return f"{csv_path} row 4: not UTF-8 text (byte 0xf6)"
    elif case == "decimal comma":
        text = "image,participant,vertebra,x,y\na.png,p,T4,12,5,30\n"
        expected = f"{csv_path} row 2: 6 fields but the header has 5 (an unquoted comma?)"
    elif case == "oversized field":
        text = "image,participant,vertebra,x,y\na.png,p,T4,1,2\na.png,p,T5,1," + "9" * 200_000
        expected = f"{csv_path} row 3: not valid CSV (field larger than field limit"
    elif case == "text coordinate":
        rows[0]["x"] = "left"
        expected = f"{csv_path} row 2: column 'x' is not a number: 'left'"
    else:
        raise AssertionError(case)
    if text is None:
        _write_csv(root, rows)
    else:
        csv_path.write_text(text)
    return expected


BAD_CSV = [
    "missing columns",
    "unknown vertebra",
    "duplicate row",
    "nan coordinate",
    "infinite coordinate",
    "negative coordinate",
    "beyond the image",
    "path with ..",
    "absolute path",
    "link out of the folder",
    "unlisted link out of the folder",
    "missing image",
    "zero-byte image",
    "empty file",
    "header only",
    "not utf-8",
    "decimal comma",
    "oversized field",
    "text coordinate",
]


@pytest.mark.parametrize("case", BAD_CSV)
def test_bad_folder_names_file_row_and_fault_and_builds_nothing(tmp_path, case):
    root = tmp_path / "in" / "folder"
    expected = _bad_csv(root, case)
    data_dir = tmp_path / "tfds"
    with pytest.raises(folder_source.FolderError) as info:
        datasets.get_builder("folder", data_dir=str(data_dir), manual_dir=str(root))
    assert expected in str(info.value)
    assert not data_dir.exists()


def test_data_build_cli_refuses_bad_labels_and_bad_pixels(tmp_path, write_dicom):
    """The command line: exit 1 with the message; neither a label fault (found
    before writing) nor a pixel fault (found while writing) leaves a dataset."""
    labels = tmp_path / "labels"
    expected = _bad_csv(labels, "nan coordinate")
    pixels = tmp_path / "pixels"
    rows = _folder(pixels)
    write_dicom(pixels / "scan.dcm", np.zeros((80, 40)), with_pixels=False)
    rows.append({"image": "scan.dcm", "participant": "p", "vertebra": "L4", "x": 5, "y": 5})
    _write_csv(pixels, [dict(r, split="train") for r in rows])
    for manual, message in (
        (labels, f"vertjax: {expected}"),
        (pixels, f"vertjax: {pixels / 'scan.dcm'}: DICOM has no pixel data"),
    ):
        data_dir = tmp_path / f"tfds_{manual.name}"
        done = _run(
            [sys.executable, "-m", "vertjax.data", "build", "--config=folder"]
            + [f"--manual_dir={manual}", f"--data_dir={data_dir}"]
        )
        _assert_refused(done, message)
        assert not data_dir.exists(), sorted(data_dir.rglob("*"))


# --- trained-model fixtures: a checkpoint without training -----------------------------------


def _save_checkpoint(workdir: Path, config, *, params_config=None) -> None:
    """Checkpoint 6 of `config` in workdir, with random weights of `params_config`'s
    model (default: the same config), drawn without compiling the U-Net."""
    shapes = jax.eval_shape(
        lambda: runs.create_train_state(params_config or config, jax.random.key(0))
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes.params
    )
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=runs.make_optimizer(config)
    )
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"), keep=1)
    ckpt.save(
        6,
        state=state,
        data_iterator=iter(grain.MapDataset.range(4).to_iter_dataset()),
        config=config,
        meta={"train_seconds": 1.0, "validation": None, "pixel_mean": 120.0, "pixel_std": 60.0},
        metrics={"id_accuracy": 0.0},
    )
    ckpt.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 6-radiograph folder dataset (train/validation/test) and its config flags."""
    base = tmp_path_factory.mktemp("bad_input_data")
    root = base / "folder"
    root.mkdir()
    rows = []
    for i, split in enumerate(["train"] * 4 + ["validation", "test"]):
        Image.fromarray(_noise(96, 48, seed=i)).save(root / f"r{i}.png")
        rows += [
            {"image": f"r{i}.png", "participant": f"p{i}", "vertebra": name, "x": 24}
            | {"y": 5 + 6.5 * k, "split": split}
            for k, name in enumerate(vertebrae.NAMES)
        ]
    _write_csv(root, rows)
    datasets.get_builder("folder", data_dir=str(base / "tfds"), manual_dir=str(root))
    config = test_config.get_config()
    config.dataset.name = "folder"
    config.dataset.manual_dir = str(root)
    config.dataset.data_dir = str(base / "tfds")
    flags = [
        "--config.dataset.name=folder",
        f"--config.dataset.manual_dir={root}",
        f"--config.dataset.data_dir={base / 'tfds'}",
    ]
    return config, flags


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset):
    """A workdir holding checkpoint 6 of configs/test.py (4 base features)."""
    workdir = tmp_path_factory.mktemp("bad_input_run") / "run"
    _save_checkpoint(workdir, dataset[0])
    return workdir


# --- predict -------------------------------------------------------------------------------


def test_predict_cli_reports_each_bad_file_and_writes_only_the_good(tmp_path, run_dir, write_dicom):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    reasons = {}
    for case in ("zero bytes", "text named .png", "bomb header", "non-finite float"):
        path = inputs / BAD_IMAGES[case]
        reasons[path] = _write_bad_image(path, case, write_dicom)
    Image.fromarray(_noise(300, 200)).save(inputs / "good.png")
    out = tmp_path / "out"
    done = _run(
        [sys.executable, "-m", "vertjax.predict", f"--workdir={run_dir}", f"--out={out}"]
        + [str(inputs)]
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for path, reason in reasons.items():
        lines = [line for line in done.stderr.splitlines() if line.startswith(f"{path}:")]
        assert len(lines) == 1 and lines[0].startswith(f"{path}: {reason}"), done.stderr
    assert "1 of 5 image(s) written" in done.stderr and "4 failed" in done.stderr
    # Only the good image has outputs, nothing temporary is left, and the
    # files are readable like any other new file.
    assert sorted(p.name for p in out.iterdir()) == [
        "good.json",
        "good_overlay.png",
        predict.CSV_FILE,
    ]
    with open(out / predict.CSV_FILE) as f:
        assert {row["output"] for row in csv.DictReader(f)} == {"good"}
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "good.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_predict_cli_refuses_an_output_path_through_a_file(tmp_path, run_dir):
    (tmp_path / "taken").write_text("a file, not a folder")
    Image.fromarray(_noise(300, 200)).save(tmp_path / "good.png")
    done = _run(
        [sys.executable, "-m", "vertjax.predict", f"--workdir={run_dir}"]
        + [f"--out={tmp_path / 'taken' / 'out'}", str(tmp_path / "good.png")]
    )
    _assert_refused(done, f"{tmp_path / 'taken'} is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_predict_refuses_a_checkpoint_of_a_different_model_shape(tmp_path, dataset):
    # The saved config says 8 base features, the saved arrays have 4.
    config = dataset[0].copy_and_resolve_references()
    config.model.features = 8
    _save_checkpoint(tmp_path, config, params_config=dataset[0])
    with pytest.raises(ValueError) as info:
        inference.load(workdir=tmp_path, checkpoint="latest")
    message = str(info.value)
    assert message.startswith(f"checkpoint 6 of {tmp_path / 'checkpoints'} does not fit this model")
    assert re.search(
        r"params\.\S+ is \(3, 3, 4, 8\) in the checkpoint and \(3, 3, 8, 16\)", message
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("config", "has no saved config"),
        ("state", "is damaged or incomplete"),
    ],
)
def test_predict_refuses_a_damaged_checkpoint(tmp_path, run_dir, damage, message):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    item = workdir / "checkpoints" / "6" / damage
    if damage == "config":
        shutil.rmtree(item)
    else:
        for path in item.iterdir():
            if path.name != "commit_success.txt":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    pattern = re.escape(f"checkpoint 6 of {workdir / 'checkpoints'}") + ".*" + re.escape(message)
    with pytest.raises(ValueError, match=pattern):
        inference.load(workdir=workdir, checkpoint="latest")


# --- configs and checkpoints of the trainer ------------------------------------------------


def _main(flags: list[str], workdir: Path) -> subprocess.CompletedProcess:
    return _run(
        [sys.executable, "-m", "vertjax.main", "--config=configs/test.py", f"--workdir={workdir}"]
        + flags
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config.loss=l9", "unknown loss 'l9': expected one of mse, l1, l2, l3"),
        ("--config.train_steps=many", "--config.train_steps=many: invalid literal for int()"),
        (
            "--config.optimiser.learning_rate=0.1",
            "--config.optimiser.learning_rate=0.1: the config has no field 'optimiser'",
        ),
    ],
    ids=["unknown loss", "wrong type", "unknown field"],
)
def test_main_cli_refuses_bad_config_values(tmp_path, flag, message):
    workdir = tmp_path / "run"
    _assert_refused(_main([flag], workdir), message)
    assert not workdir.exists()


def _wrong_type(config):
    # Built from a dict (as from JSON): the field's type is whatever was given.
    return ml_collections.ConfigDict({**config.to_dict(), "batch_size": "2"})


def _misspelt_field(config):
    # A config file may add fields; a typo must not silently keep the default loss.
    return ml_collections.ConfigDict({**config.to_dict(), "los": "l2"})


def _unknown_norm(config):
    config.model.norm = "batch"
    return config


def _zero_sigma(config):
    config.sigma = 0.0
    return config


def _unknown_dataset(config):
    config.dataset.name = "synthetic_tiny"
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_wrong_type, "config.batch_size is str '2' but must be int"),
        (_misspelt_field, "config.los is not a config field; did you mean config.loss?"),
        (_unknown_norm, "config.model.norm: unknown norm 'batch': expected one of group, layer,"),
        (_zero_sigma, "config.sigma must be positive, got 0.0"),
        (_unknown_dataset, "unknown dataset config 'synthetic_tiny': expected one of synthetic,"),
    ],
    ids=["wrong type", "misspelt field", "unknown norm", "zero sigma", "unknown dataset"],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, dataset, change, message):
    config = change(dataset[0].copy_and_resolve_references())
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, datasets.DataError), match=re.escape(message)):
        train.train(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")
)
def test_every_shipped_config_passes_the_checks(name):
    config_checks.check(importlib.import_module(f"configs.{name}").get_config())


def test_resuming_with_a_different_model_is_refused_and_changes_nothing(tmp_path, dataset, run_dir):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    config = dataset[0].copy_and_resolve_references()
    config.model.features = 8
    with pytest.raises(ValueError, match=r"checkpoint 6 of .* does not fit this model"):
        train.train(config, str(workdir))
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_main_cli_evaluate_refuses_a_checkpoint_of_a_different_model(tmp_path, dataset, run_dir):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    flags = [*dataset[1], "--mode=evaluate", "--config.model.features=8"]
    done = _main(flags, workdir)
    _assert_refused(done, f"checkpoint 6 of {workdir / 'checkpoints'} does not fit this model")
    assert "is (3, 3, 4, 8) in the checkpoint and (3, 3, 8, 16) in the model" in done.stderr
    assert not (workdir / evaluate.RESULTS_JSON).exists()


# --- no pickle of untrusted data -----------------------------------------------------------

_PICKLE_PATTERNS = (
    r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve|marshal)\b",
    r"allow_pickle\s*=\s*True",
    r"\bpickle\.loads?\(",
    r"\btorch\.load\(",
    r"\bread_pickle\(",
)


def test_no_module_loads_data_with_pickle():
    sources = [
        p
        for folder in ("vertjax", "tfds_builder", "configs")
        for p in sorted((REPO / folder).rglob("*.py"))
    ]
    assert len(sources) > 20
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(pattern, line) for pattern in _PICKLE_PATTERNS):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            # np.load must say allow_pickle=False explicitly.
            if re.search(r"\bnp\.load\(", line) and "allow_pickle=False" not in line:
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
