"""DICOM X-rays to 8-bit grayscale as a radiologist's viewer would show them (DICOM PS3.3 C.11): the modality
transform (rescale slope/intercept or modality LUT), then the VOI transform (VOI LUT, else the first window, else
the image's own range), inverted for MONOCHROME1 (or an INVERSE presentation LUT) so that bone is bright. Read with
pydicom; whatever a file cannot be shown for is a :class:`DicomError` naming the file and the reason."""

from pathlib import Path

import numpy as np

from ..errors import DicomError

DICOM_SUFFIXES = (".dcm", ".dicom")
DECODERS = "pip install 'dmfast[dicom]' (pylibjpeg with its JPEG, JPEG-LS and JPEG 2000 plugins)"


def has_dicom_marker(path) -> bool:
    """A DICOM part-10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path) -> bool:
    """Named .dcm/.dicom, or carrying the DICOM marker."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_marker(path)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), as fractions in [0, 1]."""
    values = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise DicomError(f"window width {width:g} must be > 0 for SIGMOID")
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise DicomError(f"window width {width:g} must be >= 1 for LINEAR")
        center, width = center - 0.5, width - 1
        if width == 0:  # LINEAR of width 1: a step at the centre
            return (values > center).astype(np.float64)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise DicomError(f"window width {width:g} must be > 0 for LINEAR_EXACT")
    else:
        raise DicomError(f"unsupported VOI LUT function {function!r}")
    return np.clip((values - center) / width + 0.5, 0, 1)


def voi_lut(values: np.ndarray, item, little_endian: bool = True) -> np.ndarray:
    """A VOI LUT (an item of the VOI LUT Sequence) applied to ``values``, as fractions in [0, 1]: values below the
    first mapped value take the first entry, above the last the last entry."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2^16
    data = item.LUTData
    if isinstance(data, bytes):  # OW: raw 16-bit words
        table = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    table = table.astype(np.float64)[:entries]
    if not len(table):
        raise DicomError("an empty VOI LUT")
    index = np.clip(np.rint(values.astype(np.float64)) - first, 0, len(table) - 1).astype(np.intp)
    return table[index] / (2 ** bits - 1)


def _numbers(ds, keyword: str) -> list:
    """The values of a number element that may carry several (Window Center/Width: one per view), or []."""
    if keyword not in ds or ds[keyword].value in (None, "", b""):
        return []
    element = ds[keyword]
    return [float(v) for v in (element.value if element.VM > 1 else [element.value])]


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros(values.shape)


def _gray(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Pixel data to display fractions in [0, 1]."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 2:
            raise DicomError(f"expected a 2-D grayscale image, got pixel data of shape {pixels.shape}")
        values = apply_modality_lut(pixels, ds)
        centers, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
        if ds.get("VOILUTSequence"):
            little_endian = getattr(ds, "original_encoding", (None, True))[1] is not False
            shown = voi_lut(values, ds.VOILUTSequence[0], little_endian)
        elif centers and widths:
            function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
            shown = window(values, centers[0], widths[0], function)
        else:
            shown = _stretch(values.astype(np.float64))
        if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
            shown = 1 - shown
        return shown
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(ds.get("BitsStored", 8))
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(f"unsupported {photometric} pixel data of shape {pixels.shape}")
    return (pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / (2 ** bits - 1)  # ITU-R 601 luma


def read_dicom(path) -> np.ndarray:
    """A single-frame DICOM image as uint8 ``[H, W]``. Raises :class:`DicomError` naming the file and the problem
    (not DICOM, no pixel data, several frames, a compression without an installed decoder, bad display values)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file (no DICOM header: no 'DICM' after the 128-byte preamble)") \
            from None
    except FileNotFoundError:
        raise DicomError(f"{path}: file not found") from None
    except Exception as error:  # pydicom raises many kinds on damaged files
        raise DicomError(f"{path}: unreadable DICOM ({type(error).__name__}: {error})") from None
    try:
        if "PixelData" not in ds:
            kind = getattr(ds.get("SOPClassUID"), "name", None) or "object"
            raise DicomError(f"a DICOM {kind} without pixel data (not an image)")
        frames = int(float(ds.get("NumberOfFrames") or 1))
        if frames > 1:
            raise DicomError(f"a multi-frame DICOM ({frames} frames); dmfast reads single X-ray images")
        try:
            pixels = ds.pixel_array
        except Exception as error:
            syntax = ds.file_meta.get("TransferSyntaxUID", "?")
            first = (str(error).splitlines() or [""])[0]
            hint = f"For compressed DICOM: {DECODERS}" if getattr(syntax, "is_compressed", True) else \
                "(uncompressed pixel data that does not fit its rows and columns: a truncated or damaged file?)"
            raise DicomError(f"cannot decode its pixel data ({getattr(syntax, 'name', syntax)}): {first} {hint}"
                             ) from None
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
        shown = _gray(ds, pixels, photometric)
    except DicomError as error:
        raise DicomError(f"{path}: {error}") from None
    except Exception as error:  # malformed elements: say which file and what
        raise DicomError(f"{path}: cannot show its pixel data ({type(error).__name__}: {error})") from None
    return np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8)
