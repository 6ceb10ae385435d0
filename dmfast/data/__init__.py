"""Data layer: the ChestX-ray14 release reader, splits, the image cache and the synthetic chest phantom."""

from .chestxray14 import FINDINGS, ChestXray14, DataError, Problems, open_dataset  # noqa: F401
