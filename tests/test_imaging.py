"""Tests for vertjax.imaging: reading every supported format, faults, resizing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vertjax import imaging


def _ramp(height: int = 48, width: int = 40) -> np.ndarray:
    """uint8 [H, W] with every value distinct per row, for exact round trips."""
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def test_png_8bit_scaled_exactly(tmp_path):
    pixels = _ramp()
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    out = imaging.read_radiograph(path)
    assert out.pixels.dtype == np.float32
    assert out.spacing is None
    np.testing.assert_allclose(out.pixels, pixels / 255.0, atol=1e-7)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_windowed_to_percentiles(tmp_path, suffix):
    rng = np.random.default_rng(0)
    values = rng.integers(1000, 5000, size=(64, 50)).astype(np.uint16)
    values[0, 0], values[0, 1] = 0, 65535  # outliers beyond the 0.5-99.5 window
    path = tmp_path / f"b{suffix}"
    Image.fromarray(values).save(path)
    pixels = imaging.read_radiograph(path).pixels
    lo, hi = np.percentile(values.astype(np.float32), imaging.WINDOW_PERCENTILES)
    expected = np.clip((values - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-5)
    assert pixels[0, 0] == 0.0 and pixels[0, 1] == 1.0


def test_rgb_palette_and_alpha_become_luminance(tmp_path):
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 50
    expected = (0.299 * 200 + 0.114 * 50) / 255.0
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
        tmp_path / "pal.png"
    )
    for name in ("rgb.png", "rgba.png", "pal.png"):
        pixels = imaging.read_radiograph(tmp_path / name).pixels
        assert pixels.shape == (40, 40)
        np.testing.assert_allclose(pixels, expected, atol=2 / 255, err_msg=name)


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((60, 40), np.uint8)
    pixels[:20, :20] = 255  # bright block at the top left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = tmp_path / "rot.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    out = imaging.read_radiograph(path).pixels
    assert out.shape == (40, 60)
    assert imaging.image_size(path) == (40, 60)
    # After the turn the block sits at the top right.
    assert out[:15, -15:].mean() > 0.9 and out[:15, :15].mean() < 0.1


def test_dicom_monochrome2_rescale_and_spacing(tmp_path, write_dicom):
    raw = np.tile(np.arange(100, 164, dtype=np.uint16), (64, 1))
    path = tmp_path / "m2.dcm"
    write_dicom(path, raw, slope=2.0, intercept=-100.0, spacing=(0.15, 0.2))
    out = imaging.read_radiograph(path)
    assert out.spacing == imaging.PixelSpacing(0.15, 0.2, "PixelSpacing")
    assert imaging.image_size(path) == (64, 64)
    # Monotonic in the raw value, windowed to [0, 1].
    row = out.pixels[0]
    assert np.all(np.diff(row) >= 0) and row[0] == 0.0 and row[-1] == 1.0


def test_dicom_monochrome1_inverted_and_imager_spacing(tmp_path, write_dicom):
    raw = np.tile(np.arange(0, 64, dtype=np.uint16), (64, 1))
    m1 = tmp_path / "m1.dcm"
    m2 = tmp_path / "m2.dcm"
    write_dicom(m1, raw, photometric="MONOCHROME1", spacing_tag="ImagerPixelSpacing")
    write_dicom(m2, raw, photometric="MONOCHROME2", spacing=None)
    one, two = imaging.read_radiograph(m1), imaging.read_radiograph(m2)
    np.testing.assert_allclose(one.pixels, 1.0 - two.pixels, atol=1e-6)
    assert one.spacing == imaging.PixelSpacing(0.2, 0.2, "ImagerPixelSpacing")
    assert two.spacing is None


# DICOM display and spacing rules, one generated file per branch.
_RAMP = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (40, 1))  # 40 x 80


def test_pixel_spacing_is_row_then_column(tmp_path, write_dicom):
    path = tmp_path / "a.dcm"
    write_dicom(path, _RAMP, spacing=(0.2, 0.1))
    spacing = imaging.read_radiograph(path).spacing
    assert spacing == imaging.PixelSpacing(0.2, 0.1, "PixelSpacing")
    assert spacing.to_mm(10.0, 10.0) == pytest.approx((1.0, 2.0))  # x by column, y by row


def test_imager_spacing_corrected_by_magnification_and_pixel_spacing_first(tmp_path, write_dicom):
    import pydicom

    path = tmp_path / "imager.dcm"
    write_dicom(
        path, _RAMP, spacing=(0.2, 0.3), spacing_tag="ImagerPixelSpacing", magnification=1.25
    )
    spacing = imaging.read_radiograph(path).spacing
    assert (spacing.row_mm, spacing.column_mm) == pytest.approx((0.16, 0.24))
    assert spacing.source == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    # With both present, PixelSpacing (already at the patient) wins, uncorrected.
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.5, 0.4]
    ds.save_as(path)
    assert imaging.read_radiograph(path).spacing == imaging.PixelSpacing(0.5, 0.4, "PixelSpacing")


def test_bad_spacing_or_magnification_named(tmp_path, write_dicom):
    import pydicom

    path = tmp_path / "one_value.dcm"
    write_dicom(path, _RAMP)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.2]
    ds.save_as(path)
    with pytest.raises(imaging.ImageError, match="one_value.dcm: PixelSpacing must hold two"):
        imaging.read_radiograph(path)
    path = tmp_path / "zero.dcm"
    write_dicom(path, _RAMP, spacing_tag="ImagerPixelSpacing", magnification=0.0)
    with pytest.raises(imaging.ImageError, match="MagnificationFactor must be > 0"):
        imaging.read_radiograph(path)


def test_window_center_width_applied(tmp_path, write_dicom):
    path = tmp_path / "window.dcm"
    write_dicom(path, _RAMP, window=(2000.0, 1001.0))  # linear over 1500..2500
    row = imaging.read_radiograph(path).pixels[0]
    values = _RAMP[0].astype(float)
    assert row.min() == 0.0 and row.max() == 1.0
    # DICOM PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1].
    np.testing.assert_allclose(row, np.clip((values - 1999.5) / 1000 + 0.5, 0, 1), atol=1e-6)


def test_window_applies_after_rescale_and_monochrome1_inverts(tmp_path, write_dicom):
    path = tmp_path / "window_m1.dcm"
    # Rescaled values 2 x raw - 1000 span -1000..6900; the window is on those.
    write_dicom(
        path, _RAMP, photometric="MONOCHROME1", slope=2.0, intercept=-1000.0, window=(3000, 2001)
    )
    row = imaging.read_radiograph(path).pixels[0]
    rescaled = 2.0 * _RAMP[0] - 1000.0
    expected = np.clip((rescaled - 2999.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(row, 1.0 - expected, atol=1e-6)


def test_voi_lut_sequence_applied(tmp_path, write_dicom):
    path = tmp_path / "lut.dcm"
    table = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    write_dicom(path, _RAMP, bits_stored=12, voi_lut=table)
    row = imaging.read_radiograph(path).pixels[0]
    np.testing.assert_allclose(row, table[_RAMP[0]] / 65535.0, atol=1e-6)


def test_invalid_window_named(tmp_path, write_dicom):
    path = tmp_path / "narrow.dcm"
    write_dicom(path, _RAMP, window=(1000.0, 0.0))
    with pytest.raises(imaging.ImageError, match="narrow.dcm: invalid DICOM display attributes"):
        imaging.read_radiograph(path)


def test_dicom_without_suffix_detected_by_pydicom(tmp_path, write_dicom):
    path = tmp_path / "no_suffix"
    write_dicom(path, _RAMP)
    assert imaging.is_dicom(path)
    assert not imaging.is_dicom(tmp_path / "missing")


def test_dicom_without_extension_is_detected(tmp_path, write_dicom):
    path = tmp_path / "noext"
    write_dicom(path, np.arange(1600, dtype=np.uint16).reshape(40, 40))
    assert imaging.is_dicom(path)
    assert imaging.read_radiograph(path).pixels.shape == (40, 40)


def test_dicom_faults(tmp_path, write_dicom):
    nopix = tmp_path / "nopix.dcm"
    write_dicom(nopix, np.zeros((40, 40)), with_pixels=False)
    with pytest.raises(imaging.ImageError, match="nopix.dcm: DICOM has no pixel data"):
        imaging.read_radiograph(nopix)
    multi = tmp_path / "multi.dcm"
    write_dicom(multi, np.zeros((2, 40, 40)), frames=2)
    with pytest.raises(imaging.ImageError, match=r"multi.dcm: multi-frame DICOM \(2 frames\)"):
        imaging.read_radiograph(multi)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty file"),
        ("junk.png", b"this is not an image at all", "unreadable image"),
        ("junk.dcm", b"\0" * 200, "unreadable DICOM"),
    ],
)
def test_unreadable_files_name_path_and_fault(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(imaging.ImageError) as info:
        imaging.read_radiograph(path)
    assert str(info.value).startswith(f"{path}: {reason}")


def test_missing_file(tmp_path):
    with pytest.raises(imaging.ImageError, match="nothere.png: file not found"):
        imaging.read_radiograph(tmp_path / "nothere.png")


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_ramp(200, 200)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(imaging.ImageError, match="cut.png: unreadable image"):
        imaging.read_radiograph(path)


def test_tiny_image_rejected(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((20, 100), np.uint8)).save(path)
    with pytest.raises(imaging.ImageError, match="smaller than 32 px"):
        imaging.read_radiograph(path)
    with pytest.raises(imaging.ImageError, match="smaller than 32 px"):
        imaging.image_size(path)


def test_pixel_limit_guards_against_bombs(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 5000)
    with pytest.raises(imaging.ImageError, match="exceeds the limit of 5000 pixels"):
        imaging.read_radiograph(path)


def test_to_model_input_shapes_and_values():
    flat = np.full((500, 300), 0.5, np.float32)
    out = imaging.to_model_input(flat, 264)
    assert out.shape == (264, 264) and out.dtype == np.uint8
    assert np.all(out == 128)
    # Upsampling a small image keeps the range and the left-to-right ramp.
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (40, 1))
    up = imaging.to_model_input(ramp, 64)
    assert up.min() <= 5 and up.max() >= 250
    assert np.all(np.diff(up[0].astype(int)) >= 0)


def test_window_uses_the_full_range_when_the_percentiles_coincide():
    # A small object on a uniform background: > 99 % of the pixels are 0.
    values = np.zeros((200, 200), np.float32)
    values[100, 50:60] = np.linspace(10, 100, 10)
    out = imaging.window(values)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[100, 50:60], np.linspace(0.1, 1.0, 10), rtol=1e-6)


def test_to_model_input_averages_fine_stripes():
    # One-pixel stripes alias under point sampling; area resampling gives grey.
    stripes = np.tile(np.array([0.0, 1.0], np.float32), (528, 264))
    out = imaging.to_model_input(stripes, 264)
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_dicom_pixel_limit_checked_before_decoding(tmp_path, write_dicom, monkeypatch):
    path = tmp_path / "big.dcm"
    write_dicom(path, np.zeros((80, 80)))
    monkeypatch.setattr(imaging, "MAX_PIXELS", 5000)
    with pytest.raises(imaging.ImageError, match="big.dcm: image of 80 x 80 pixels exceeds"):
        imaging.read_radiograph(path)


def test_write_dicom_refuses_values_its_bits_cannot_hold(tmp_path):
    for values in (np.full((40, 40), 4096), np.full((40, 40), -1)):
        with pytest.raises(ValueError, match=r"must lie in \[0, 4095\]"):
            imaging.write_dicom(tmp_path / "x.dcm", values, bits_stored=12)
    assert not (tmp_path / "x.dcm").exists()
