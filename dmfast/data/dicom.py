"""DICOM X-rays to 8-bit grayscale as a radiologist's viewer would show them: the modality transform (rescale
slope/intercept or modality LUT), then the VOI transform (VOI LUT, else the first window, else the image's own
range), MONOCHROME1 inverted so that bone is bright. Read with pydicom; what it cannot be is a named error."""

from pathlib import Path

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")


class DicomError(ValueError):
    """A DICOM file that is not a single-frame image dmfast can show."""


def is_dicom(path) -> bool:
    """A DICOM part-10 file (the 'DICM' marker after the 128-byte preamble), or a file named .dcm/.dicom."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), as fractions in [0, 1]."""
    values = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise DicomError(f"window width {width} must be > 0 for SIGMOID")
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise DicomError(f"window width {width} must be >= 1 for LINEAR")
        center, width = center - 0.5, width - 1
    elif function != "LINEAR_EXACT":
        raise DicomError(f"unsupported VOI LUT function {function!r}")
    if width <= 0:  # LINEAR with width 1: a step at the centre
        return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0, 1)


def _first(ds, keyword: str) -> float:
    """The first value of a number that may carry several (Window Center/Width: one per view)."""
    element = ds[keyword]
    return float(element.value[0] if element.VM > 1 else element.value)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros(values.shape)


def read_dicom(path) -> np.ndarray:
    """A single-frame DICOM image as uint8 ``[H, W]``. Raises :class:`DicomError` naming the file and the problem
    (not DICOM, no pixel data, several frames, a compression pydicom has no decoder for, a bad window)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise DicomError(f"{path}: not a DICOM file (no DICOM header: no 'DICM' after the 128-byte preamble)") \
            from error
    except FileNotFoundError as error:
        raise DicomError(f"{path}: file not found") from error
    except Exception as error:  # pydicom raises many kinds on damaged files
        raise DicomError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from error
    if "PixelData" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "object"
        raise DicomError(f"{path}: a DICOM {kind} without pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{path}: a multi-frame DICOM ({frames} frames); dmfast reads single X-ray images")
    try:
        pixels = ds.pixel_array
    except Exception as error:
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"{path}: cannot decode its pixel data ({name}): {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if pixels.ndim != 2:
                raise DicomError(f"{path}: expected a 2-D grayscale image, got pixel data of shape {pixels.shape}")
            values = apply_modality_lut(pixels, ds)
            if ds.get("VOILUTSequence"):
                bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                shown = apply_voi(values, ds).astype(np.float64) / (2 ** bits - 1)
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
                shown = window(values, _first(ds, "WindowCenter"), _first(ds, "WindowWidth"), function)
            else:
                shown = _stretch(values.astype(np.float64))
            if photometric == "MONOCHROME1":
                shown = 1 - shown
        else:
            if photometric == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
            if pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise DicomError(f"{path}: unsupported {photometric} pixel data of shape {pixels.shape}")
            bits = ds.RedPaletteColorLookupTableDescriptor[2] if photometric == "PALETTE COLOR" else ds.BitsStored
            top = 2 ** int(bits) - 1
            shown = (pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / top  # ITU-R 601 luma
    except DicomError:
        raise
    except Exception as error:
        raise DicomError(f"{path}: cannot apply its {photometric} display transforms ({error})") from error
    return np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8)
