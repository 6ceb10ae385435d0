"""Data layer: the dataset interface and the readers of the public releases, splits, the image cache and the
synthetic chest phantom."""

from .dataset import FINDINGS, UNKNOWN, Dataset, DataError, LabelPolicy, Problems  # noqa: F401
from .formats import FORMATS, detect_format, open_dataset  # noqa: F401
