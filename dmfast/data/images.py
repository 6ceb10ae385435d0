"""Decoding X-ray files robustly to one 8-bit grayscale array, optionally resized: the release's PNGs (8-bit
grayscale, plus the known oddities: a few RGBA or RGB files, palette images, 16-bit grayscale, any size), JPEGs and
DICOM (:mod:`dmfast.data.dicom`); and finding the X-rays in folders."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import DICOM_SUFFIXES, DicomError, has_dicom_marker, is_dicom, read_dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


class ImageError(RuntimeError):
    """An image file that cannot be decoded (missing, truncated, not an image)."""


def load_gray(path, size: int | None = None) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W]`` array (``[size, size]`` when ``size`` is given, Lanczos-resized).

    PNG and JPEG only (other formats are refused: PIL would open many, some through external programs). 16-bit
    images are scaled by their full range (65535 -> 255); colour images are converted with ITU-R 601 luma;
    transparency is dropped; JPEGs are turned upright by their EXIF orientation; DICOM goes through its display
    transforms (:func:`dmfast.data.dicom.read_dicom`). Raises :class:`ImageError` naming the file when it cannot be
    read completely.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if is_dicom(path):
        try:
            gray = Image.fromarray(read_dicom(path))
        except DicomError as error:
            raise ImageError(str(error)) from error
        return _resized(gray, size)
    try:
        with Image.open(path, formats=["PNG", "JPEG"]) as image:  # multi-picture JPEGs come out as MPO
            image.load()
            if image.format in ("JPEG", "MPO"):
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                gray = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))
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
    return _resized(gray, size)


def _resized(gray, size: int | None) -> np.ndarray:
    from PIL import Image

    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


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
            raise FileNotFoundError(f"{entry}: no such file or folder")
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
