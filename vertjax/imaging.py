"""Reading radiographs from disk and resizing them for the model.

One entry point per direction: `read_radiograph` turns a PNG, JPEG, TIFF or
DICOM file into grey values in [0, 1] (windowed, MONOCHROME1 inverted) plus
the pixel spacing of each axis when the file knows it; `to_model_input` resizes such an
image to the model's S x S uint8 input. Every fault raises `ImageError`,
whose message starts with the file's path. `write_dicom` writes the minimal
grey-scale DICOM that `read_radiograph` accepts (test fixtures, benchmark
inputs, wrapping an exported image for a DICOM-only pipeline).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from vertjax import resample

# A radiograph larger than this (8k x 8k; real ones are below 4k x 5k) is
# refused before decoding: a hostile or broken header must not make the
# reader allocate gigabytes. Below PIL's own bomb limit, so this check and
# its message come first.
MAX_PIXELS: int = 8192 * 8192
# Smaller images cannot hold 13 vertebrae and are almost surely thumbnails or
# icons picked up by mistake.
MIN_SIDE: int = 32
# 16-bit sources use only part of their range; window at these percentiles.
WINDOW_PERCENTILES: tuple[float, float] = (0.5, 99.5)

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
RASTER_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
SUFFIXES: frozenset[str] = DICOM_SUFFIXES | RASTER_SUFFIXES

# ITU-R BT.601 luma, what PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageError(ValueError):
    """A radiograph file that cannot be used; the message is '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class PixelSpacing(NamedTuple):
    """Physical size of a pixel, per axis, and where it came from.

    DICOM gives spacing as (row, column): `row_mm` is the distance between
    the centres of adjacent rows, so it scales y; `column_mm` scales x.
    """

    row_mm: float
    column_mm: float
    source: str  # the DICOM attribute(s) it was read from

    def to_mm(self, x: float, y: float) -> tuple[float, float]:
        """(x, y) in pixels -> (x, y) in millimetres."""
        return x * self.column_mm, y * self.row_mm


class Radiograph(NamedTuple):
    """A decoded radiograph.

    Attributes:
      pixels: float32 [H, W] in [0, 1], 0 black (air), 1 white (bone).
      spacing: the pixel spacing, None when the file does not give it.
    """

    pixels: np.ndarray
    spacing: PixelSpacing | None


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM file: by suffix, or by its preamble as pydicom reads it."""
    if os.path.splitext(os.fspath(path))[1].lower() in DICOM_SUFFIXES:
        return True
    import pydicom.misc

    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


def read_radiograph(path: str | os.PathLike) -> Radiograph:
    """Reads a PNG, JPEG, TIFF or DICOM radiograph.

    8-bit sources are scaled by 1/255; 16-bit, 32-bit and float sources are
    windowed to their 0.5th to 99.5th percentile. DICOM files follow their
    own display rules through pydicom: the modality LUT (or rescale slope and
    intercept), then the VOI LUT or window centre/width when the file has
    one, else the percentile window; MONOCHROME1 is inverted. Colour is
    reduced to luminance, alpha dropped, palettes expanded and the EXIF
    orientation applied. Multi-frame DICOM is refused.

    Args:
      path: the image file.

    Returns:
      Radiograph(pixels float32 [H, W] in [0, 1], spacing or None).

    Raises:
      ImageError: missing, unreadable, empty, too large or too small image.
    """
    path = _existing_file(path)
    if is_dicom(path):
        pixels, spacing = _read_dicom(path)
    else:
        pixels, spacing = _read_raster(path), None
    _check_size(path, pixels.shape)
    if not np.isfinite(pixels).all():
        raise ImageError(path, "image holds non-finite values")
    return Radiograph(pixels=pixels, spacing=spacing)


def _existing_file(path: str | os.PathLike) -> str:
    """`path` as a string; ImageError if it is missing or empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "empty file")
    return path


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding the pixels.

    Used to validate annotations before a slow full read. Raises ImageError
    for the same header faults as `read_radiograph`.
    """
    path = _existing_file(path)
    if is_dicom(path):
        ds = _dicom_header(path)
        shape = (int(ds.Rows), int(ds.Columns))
    else:
        with _open_raster(path) as im:
            width, height = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except (OSError, ValueError, SyntaxError) as e:
                raise ImageError(path, f"unreadable image ({e})") from e
        # EXIF orientations 5-8 swap width and height.
        shape = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    _check_size(path, shape)
    return shape


def to_model_input(pixels: np.ndarray, size: int = 264) -> np.ndarray:
    """Resizes an image to the model's square input, ignoring aspect ratio.

    Downsampling averages over each output pixel's footprint (area, PIL's
    BOX) so that film grain does not alias; upsampling is bilinear. Integer
    arithmetic (`vertjax.resample`), so that the exported model, which runs
    the same steps in JAX, sees the same input bit for bit.

    Args:
      pixels: float [H, W] in [0, 1].
      size: output side S.

    Returns:
      uint8 [S, S].
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {pixels.shape}")
    return resample.resize(np, pixels, size).astype(np.uint8)


def window(values: np.ndarray) -> np.ndarray:
    """Maps the 0.5th-99.5th percentile range of `values` to [0, 1], clipped.

    When more than 99 % of the pixels share one value (a small object on a
    uniform background) the percentiles coincide and the full range is used.

    Raises:
      ValueError: every pixel has the same value (a blank image).
    """
    values = values.astype(np.float32, copy=False)
    lo, hi = np.percentile(values, WINDOW_PERCENTILES)
    if not hi > lo:
        lo, hi = values.min(), values.max()
    if not hi > lo:
        raise ValueError(f"image is blank: every pixel has the value {float(lo):g}")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _window_finite(path: str, values: np.ndarray) -> np.ndarray:
    """`window`, refusing NaN or infinite values (their percentiles are NaN and
    would turn the whole image flat) and blank images, naming the file."""
    if not np.isfinite(values).all():
        raise ImageError(path, "image holds non-finite values (NaN or infinity)")
    try:
        return window(values)
    except ValueError as e:
        raise ImageError(path, str(e)) from None


def _check_size(path: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ImageError(path, f"expected a 2-D image, got shape {tuple(shape)}")
    height, width = shape
    if height * width == 0:
        raise ImageError(path, "image has no pixels")
    if height * width > MAX_PIXELS:
        raise ImageError(
            path, f"image of {width} x {height} pixels exceeds the limit of {MAX_PIXELS} pixels"
        )
    if min(height, width) < MIN_SIDE:
        raise ImageError(
            path, f"image of {width} x {height} pixels is smaller than {MIN_SIDE} px a side"
        )


def _open_raster(path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"image too large: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(path, f"unreadable image ({e})") from e
    width, height = im.size
    if width * height > MAX_PIXELS:
        im.close()
        raise ImageError(
            path, f"image of {width} x {height} pixels exceeds the limit of {MAX_PIXELS} pixels"
        )
    return im


def _read_raster(path: str) -> np.ndarray:
    """PNG / JPEG / TIFF -> float32 [H, W] in [0, 1]."""
    with _open_raster(path) as im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(path, f"unreadable image ({e})") from e
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            mode = im.mode
        if mode in ("1", "L", "LA"):
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
            return (rgb @ _LUMA) / 255.0
        if mode.startswith("I") or mode == "F":
            # 16-bit and 32-bit greyscale (I;16, I;16B, I, F): window it.
            return _window_finite(path, np.asarray(im).astype(np.float32))
    raise ImageError(path, f"unsupported image mode {mode!r}")


def _dicom_header(path: str):
    import pydicom
    import pydicom.errors

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ImageError(path, f"unreadable DICOM ({e})") from e
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(path, "DICOM has no Rows/Columns: no image in it")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(path, f"multi-frame DICOM ({frames} frames) is not supported")
    return ds


def _read_dicom(path: str) -> tuple[np.ndarray, PixelSpacing | None]:
    """DICOM -> (float32 [H, W] in [0, 1], spacing or None)."""
    import pydicom

    header = _dicom_header(path)
    _check_size(path, (int(header.Rows), int(header.Columns)))
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for damaged files
        raise ImageError(path, f"unreadable DICOM ({e})") from e
    if "PixelData" not in ds:
        raise ImageError(path, "DICOM has no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as e:  # missing codec, truncated data, ...
        raise ImageError(path, f"cannot decode DICOM pixel data ({e})") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            raw = pydicom.pixels.convert_color_space(raw, photometric, "RGB")
        pixels = _window_finite(path, raw.astype(np.float32) @ _LUMA)
    elif raw.ndim == 2:
        pixels = _grey_for_display(path, ds, raw)
    else:
        raise ImageError(path, f"unsupported DICOM pixel array of shape {raw.shape}")
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows low values white; the model sees bone as bright.
        pixels = 1.0 - pixels
    return pixels, _dicom_spacing(path, ds)


def _grey_for_display(path: str, ds, raw: np.ndarray) -> np.ndarray:
    """Stored grey values -> [0, 1] by the file's modality and VOI rules.

    The modality LUT (or RescaleSlope/Intercept) gives the modality's values.
    A VOI LUT or WindowCenter/Width, when the file has one, maps them to
    display values; [0, 1] is then that mapping's own output range, found by
    passing the lowest and highest storable values through the same pydicom
    calls. Files without VOI rules get the percentile window.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(raw, ds)
        if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
            return _window_finite(path, np.asarray(values, np.float32))
        shown = np.asarray(apply_voi_lut(_integral(values), ds), np.float64)
        ends = apply_voi_lut(_integral(apply_modality_lut(_storable_range(ds), ds)), ds)
        ends = np.asarray(ends, np.float64)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ImageError(path, f"invalid DICOM display attributes ({e})") from e
    low, high = float(ends.min()), float(ends.max())
    if not np.isfinite(shown).all() or not high > low:
        raise ImageError(path, f"DICOM VOI LUT or window maps to an empty range [{low}, {high}]")
    return np.clip((shown - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _integral(values: np.ndarray) -> np.ndarray:
    """Whole-number floats as int64: a VOI LUT is indexed by integers.

    A rescale of slope 1 and intercept 0 still returns floats from pydicom.
    """
    if np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.round(values)):
        return values.astype(np.int64)
    return values


def _storable_range(ds) -> np.ndarray:
    """The lowest and highest stored values the file's BitsStored allows."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], np.int64)
    return np.array([0, 2**bits - 1], np.int64)


def _dicom_spacing(path: str, ds) -> PixelSpacing | None:
    """The pixel spacing at the patient, per axis, or None when the file lacks it.

    PixelSpacing is already calibrated to the patient. ImagerPixelSpacing is
    measured at the detector: it is used only without PixelSpacing, divided
    by EstimatedRadiographicMagnificationFactor when the file gives one.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, column = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ImageError(
                path, f"{keyword} must hold two numbers (row, column), got {value!r}"
            ) from None
        source = keyword
        magnification = ds.get("EstimatedRadiographicMagnificationFactor")
        if keyword == "ImagerPixelSpacing" and magnification is not None:
            factor = float(magnification)
            if not (np.isfinite(factor) and factor > 0):
                raise ImageError(
                    path, f"EstimatedRadiographicMagnificationFactor must be > 0, got {factor}"
                )
            row, column = row / factor, column / factor
            source = "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
        if not all(np.isfinite(v) and v > 0 for v in (row, column)):
            raise ImageError(path, f"{keyword} must be positive, got {value!r}")
        return PixelSpacing(row_mm=row, column_mm=column, source=source)
    return None


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    spacing: float | tuple[float, float] | None = (0.2, 0.2),
    spacing_tag: str = "PixelSpacing",
    bits_stored: int = 16,
    slope: float = 1.0,
    intercept: float = 0.0,
    with_pixels: bool = True,
    frames: int = 1,
    magnification: float | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
) -> None:
    """Writes uint16 grey values ([H, W], or [F, H, W] with frames > 1) as a DX DICOM file.

    Uncompressed secondary capture, explicit VR little endian. `spacing` is
    the (row, column) spacing in mm, or one value for both, stored under
    `spacing_tag` (PixelSpacing or ImagerPixelSpacing); None leaves it out.
    `magnification` sets EstimatedRadiographicMagnificationFactor, `window`
    the (WindowCenter, WindowWidth) and `voi_lut` a VOI LUT Sequence item
    (uint16 table, first input value 0, 16 bits per entry).
    `with_pixels=False` writes the header alone.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"{path}: bits_stored={bits_stored} must be 1 to 16")
    if pixels.size and not 0 <= pixels.min() <= pixels.max() < 2**bits_stored:
        raise ValueError(f"{path}: pixel values must lie in [0, {2**bits_stored - 1}]")
    pixels = pixels.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if spacing is not None:
        row, column = (spacing, spacing) if np.isscalar(spacing) else spacing
        setattr(ds, spacing_tag, [float(row), float(column)])
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = magnification
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (float(v) for v in window)
    if voi_lut is not None:
        item = Dataset()
        table = np.asarray(voi_lut, np.uint16)
        item.LUTDescriptor = [len(table), 0, 16]
        item.LUTData = table.tobytes()
        ds.VOILUTSequence = [item]
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
