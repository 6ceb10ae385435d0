"""Decoding X-ray files robustly to one 8-bit grayscale array, optionally resized: the release's PNGs (8-bit
grayscale, plus the known oddities: a few RGBA or RGB files, palette images, 16-bit grayscale, any size), JPEGs and
DICOM (:mod:`dmfast.data.dicom`); and finding the X-rays in folders."""

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError
from .dicom import DICOM_SUFFIXES, DicomError, has_dicom_marker, is_dicom, read_dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


MIN_SIDE = 32  # pixels of an X-ray's shorter side, at the least: smaller files are icons or thumbnails, not X-rays
WORD_DEPTHS = (8, 10, 12, 14, 16)  # the bit depths X-ray detectors store in 16-bit words


_DECODING = threading.local()  # the file each thread decodes: a library's warning about it names it


def decoding_file() -> str | None:
    """The file this thread is decoding with :func:`load_gray`, or None (for naming a library's warning)."""
    return getattr(_DECODING, "path", None)


def load_gray(path, size: int | None = None) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W]`` array (``[size, size]`` when ``size`` is given, Lanczos-resized).

    PNG and JPEG only (other formats are refused: PIL would open many, some through external programs). 16-bit
    images are scaled by the range of their significant bits (:func:`significant_bits`: 12-bit data stored as
    0-4095 fills 0-255 as 16-bit data does); colour images are converted with ITU-R 601 luma; transparency is
    dropped; JPEGs are turned upright by their EXIF orientation; DICOM goes through its display transforms
    (:func:`dmfast.data.dicom.read_dicom`). Raises :class:`ImageError` naming the file when it cannot be read
    completely, or when its shorter side is below :data:`MIN_SIDE` pixels.
    """
    _DECODING.path = str(path)
    try:
        return _decoded(Path(path), size)
    finally:
        _DECODING.path = None


def _decoded(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path}: an empty file")
    if is_dicom(path):
        try:
            gray = Image.fromarray(read_dicom(path))
        except DicomError as error:
            raise ImageError(str(error)) from error
        return _resized(gray, size, path)
    try:
        with Image.open(path, formats=["PNG", "JPEG"]) as image:  # multi-picture JPEGs come out as MPO
            image.load()
            if image.format in ("JPEG", "MPO"):
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                sbit = _png_sbit(path) if image.format == "PNG" else None
                gray = Image.fromarray(eight_bits(np.asarray(image), sbit))
            elif image.mode == "L":
                gray = image.copy()
            else:
                gray = image.convert("RGB").convert("L")
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a PNG, JPEG or DICOM file") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too large to decode safely ({error})") from None
    except Exception as error:  # truncated or damaged files raise many kinds
        raise ImageError(f"{path}: cannot decode ({type(error).__name__}: {error})") from None
    return _resized(gray, size, path)


def significant_bits(array: np.ndarray, recorded: int | None = None) -> int:
    """The bits of a 16-bit image's values that carry its data: ``recorded`` (a PNG's sBIT chunk) when the values
    fit in it (data stored as is; a file scaled to the full 16 bits as the PNG standard asks keeps 16), else the
    smallest of :data:`WORD_DEPTHS` that holds the largest value (a 12-bit detector's 0-4095 in a 16-bit file: 12)."""
    largest = int(array.max()) if array.size else 0
    if recorded is not None and 1 <= recorded <= 16 and largest < 2 ** recorded:
        return recorded
    return next((bits for bits in WORD_DEPTHS if largest < 2 ** bits), 16)


def eight_bits(array: np.ndarray, recorded: int | None = None) -> np.ndarray:
    """Integer pixels as uint8, their :func:`significant_bits` range (``recorded``: a PNG's sBIT) scaled to 0-255:
    the one rule of 16-bit files and arrays."""
    top = 2 ** significant_bits(array, recorded) - 1
    return np.clip(np.round(array.astype(np.float64) * (255 / top)), 0, 255).astype(np.uint8)


def gray_of(array, name: str = "image") -> np.ndarray:
    """An image array as the readers decode a file: uint8 ``[H, W]``. The rule: uint8 as it is; other integers
    (uint16 and the like, non-negative) by their significant bits (:func:`eight_bits`, as 16-bit PNGs);
    floats in [0, 1] times 255, rounded; ``[H, W, 3]`` or ``[H, W, 4]`` colour to grey by ITU-R 601 luma (alpha
    dropped, as the readers do) after the same scaling; ``[H, W, 1]`` as ``[H, W]``. Anything else (other shapes,
    negative or non-finite values, floats outside [0, 1], a side under :data:`MIN_SIDE`) is an ImageError (a
    ValueError) naming ``name`` and what is expected."""
    from PIL import Image

    if hasattr(array, "detach"):  # a tensor: off the graph and the device; bfloat16 has no numpy type
        array = array.detach().cpu()
        array = array.float() if str(array.dtype) in ("torch.bfloat16", "torch.float16") else array
    array = np.asarray(array)
    expected = ("uint8 (or uint16, or floats in [0, 1]) pixels [H, W], or [H, W, 3] colour, with sides of at least "
                f"{MIN_SIDE}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[-1] not in (3, 4) or array.dtype == bool or \
            array.dtype.kind not in "uif":
        raise ImageError(f"{name}: {array.dtype} {tuple(array.shape)}; expected {expected}")
    if min(array.shape[:2]) < MIN_SIDE:
        raise ImageError(f"{name}: {array.shape[1]} x {array.shape[0]} pixels, too small to be an X-ray; expected "
                         f"{expected}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(f"{name}: float pixels from {np.nanmin(array):g} to {np.nanmax(array):g}; floats must lie "
                             "in [0, 1] (or give the uint8/uint16 pixels)")
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.min() < 0:
            raise ImageError(f"{name}: negative pixel values ({array.min()}); expected {expected}")
        array = eight_bits(array)
    if array.ndim == 3:
        array = np.asarray(Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("L"))
    return np.require(array, requirements=["C", "W"])  # contiguous and writable (a copy of a PIL image's view)


def _png_sbit(path) -> int | None:
    """The significant bits a grayscale PNG's sBIT chunk records, or None (no chunk, or not readable)."""
    import struct

    with open(path, "rb") as f:
        f.read(8)
        for _ in range(256):  # chunks before the pixels
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT":
                return None
            if kind == b"sBIT":
                data = f.read(length)
                return data[0] if data else None
            f.seek(length + 4, 1)
    return None


def _resized(gray, size: int | None, path) -> np.ndarray:
    from PIL import Image

    if min(gray.size) < MIN_SIDE:
        raise ImageError(f"{path}: {gray.size[0]} x {gray.size[1]} pixels, too small to be an X-ray (a side of at "
                         f"least {MIN_SIDE} px)")
    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.require(np.asarray(gray, dtype=np.uint8), requirements=["C", "W"])  # writable, as arrays are


def list_xrays(inputs, exclude=()) -> tuple:
    """The X-ray files among ``inputs``: files are taken whatever their name; folders are searched recursively
    (following links, each folder once, hidden files and the folders ``exclude`` left out) for PNG, JPEG and
    DICOM files (by name, or by the DICOM marker). Returns ``(files, roots, problems)``: ``roots[i]`` is the input
    that ``files[i]`` came from, ``problems`` lists ``(path, reason)`` for what was left out (other kinds of
    files, unreadable folders, broken links). A file found twice is taken once."""
    files, roots, problems = [], [], []
    seen_files, seen_folders = set(), {os.path.realpath(p) for p in exclude}
    for entry in map(Path, inputs):
        if not entry.exists():
            raise DataError(f"{entry}: no such file or folder")
        found = [entry] if not entry.is_dir() else []
        if entry.is_dir():
            def unreadable(error):
                problems.append((str(error.filename), f"unreadable folder ({error.strerror})"))

            for folder, subfolders, names in os.walk(entry, onerror=unreadable, followlinks=True):
                if os.path.realpath(folder) in seen_folders:
                    subfolders[:] = []
                    continue
                seen_folders.add(os.path.realpath(folder))
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                for name in (name for name in names if not name.startswith(".")):
                    path = Path(folder) / name
                    if not path.exists():
                        problems.append((str(path), "a broken link"))
                    elif path.suffix.lower() in IMAGE_SUFFIXES or has_dicom_marker(path):
                        found.append(path)
                    else:
                        problems.append((str(path), "not a PNG, JPEG or DICOM file"))
        for path in sorted(found):
            if os.path.realpath(path) not in seen_files:
                seen_files.add(os.path.realpath(path))
                files.append(path)
                roots.append(entry)
    return files, roots, problems


MAX_SIDE = 8192  # longer X-rays are box-reduced by an integer factor before padding (the square's memory)


def square_geometry(width: int, height: int, size: int) -> tuple:
    """Where an X-ray of ``width x height`` lands when padded with black to a centred square and resized to
    ``size``: ``(step, side, scale, pad_x, pad_y)``, with a point (x, y) of the ``size`` square at
    (x * scale - pad_x, y * scale - pad_y) in the X-ray; ``step`` is the integer reduction applied first to X-rays
    longer than :data:`MAX_SIDE`, ``side`` the square's side in the X-ray's pixels."""
    step = -(-max(width, height) // MAX_SIDE)
    reduced_w, reduced_h = -(-width // step), -(-height // step)  # PIL's reduce keeps partial blocks
    side = max(reduced_w, reduced_h)
    return step, step * side, step * side / size, step * ((side - reduced_w) // 2), step * ((side - reduced_h) // 2)


@dataclass
class Square:
    """An X-ray ``[height, width]`` padded with black to a centred square of side ``side`` and resized to a model's
    input: a point (x, y) of ``pixels`` is (x * scale - pad_x, y * scale - pad_y) in the X-ray."""

    pixels: np.ndarray  # [size, size] uint8
    width: int
    height: int
    side: int
    scale: float
    pad_x: int
    pad_y: int


def to_square(gray: np.ndarray, size: int) -> Square:
    """``gray [H, W]`` padded with black to a centred square and resized to ``size`` (Lanczos): how the image cache
    and ``predict`` bring X-rays of any shape to the model, never squashed (:func:`square_geometry`)."""
    from PIL import Image

    height, width = gray.shape
    step, side, scale, pad_x, pad_y = square_geometry(width, height, size)
    if step > 1:
        gray = np.asarray(Image.fromarray(gray).reduce(step))
    square = np.zeros((side // step, side // step), np.uint8)
    square[pad_y // step:pad_y // step + gray.shape[0], pad_x // step:pad_x // step + gray.shape[1]] = gray
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return Square(square, width, height, side, scale, pad_x, pad_y)


NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0}  # uint8 pixel p -> p * scale + offset, in [-1, 1]


def to_model_input(batch):
    """uint8 images -> float in [-1, 1] (the paper's normalisation), done on the batch (torch tensor)."""
    return batch.float().div_(127.5).sub_(1.0)
