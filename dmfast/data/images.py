"""Decoding the release's PNGs robustly: 8-bit grayscale as released, plus the known oddities (a few RGBA or RGB
files, palette images, 16-bit grayscale, any size), to one 8-bit grayscale array, optionally resized."""

from pathlib import Path

import numpy as np


class ImageError(RuntimeError):
    """An image file that cannot be decoded (missing, truncated, not an image)."""


def load_gray(path, size: int | None = None) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W]`` array (``[size, size]`` when ``size`` is given, Lanczos-resized).

    16-bit images are scaled by their full range (65535 -> 255); colour images are converted with ITU-R 601 luma;
    transparency is dropped. Raises :class:`ImageError` naming the file when it cannot be read completely.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
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
    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0}  # uint8 pixel p -> p * scale + offset, in [-1, 1]


def to_model_input(batch):
    """uint8 images -> float in [-1, 1] (the paper's normalisation), done on the batch (torch tensor)."""
    return batch.float().div_(127.5).sub_(1.0)
