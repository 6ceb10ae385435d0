"""Decoding X-ray files robustly to one 8-bit grayscale array, optionally resized: the release's PNGs (8-bit
grayscale, plus the known oddities: a few RGBA or RGB files, palette images, 16-bit grayscale, any size), JPEGs and
DICOM (:mod:`dmfast.data.dicom`); and finding the X-rays in folders."""

from pathlib import Path

import numpy as np

from .dicom import DICOM_SUFFIXES, DicomError, is_dicom, read_dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


class ImageError(RuntimeError):
    """An image file that cannot be decoded (missing, truncated, not an image)."""


def load_gray(path, size: int | None = None) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W]`` array (``[size, size]`` when ``size`` is given, Lanczos-resized).

    16-bit images are scaled by their full range (65535 -> 255); colour images are converted with ITU-R 601 luma;
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
        with Image.open(path) as image:
            image.load()
            if image.format == "JPEG":
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                gray = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))
            elif image.mode == "L":
                gray = image.copy()
            else:
                gray = image.convert("RGB").convert("L")
    except FileNotFoundError as error:
        raise ImageError(f"{path}: file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot decode ({error})") from error
    return _resized(gray, size)


def _resized(gray, size: int | None) -> np.ndarray:
    from PIL import Image

    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def list_xrays(inputs) -> tuple:
    """The X-ray files among ``inputs`` (files, taken whatever their name, and folders, searched recursively for
    PNG, JPEG and DICOM files, including extension-less DICOM): ``(files, roots, others)``, where ``roots[i]`` is
    the input that ``files[i]`` came from and ``others`` counts the files of other kinds left out of folders."""
    found, others = [], 0
    for entry in map(Path, inputs):
        if not entry.exists():
            raise FileNotFoundError(f"{entry}: no such file or folder")
        if not entry.is_dir():
            found.append((entry, entry))
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom(path)):
                found.append((path, entry))
            else:
                others += 1
    return [f for f, _ in found], [r for _, r in found], others


NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0}  # uint8 pixel p -> p * scale + offset, in [-1, 1]


def to_model_input(batch):
    """uint8 images -> float in [-1, 1] (the paper's normalisation), done on the batch (torch tensor)."""
    return batch.float().div_(127.5).sub_(1.0)
