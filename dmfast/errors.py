"""dmfast's errors. Everything a user can cause (a file, an image, a dataset, a setting) raises a subclass of
:class:`Error` with a one-line message naming the problem; anything else is a bug. The CLI prints an ``Error`` (and
the operating system's ``OSError``) as ``error: ...`` and saves the traceback of anything else. A leaf module:
every layer may raise these."""


class Error(Exception):
    """The base of every error a user's inputs, files or settings can cause."""


class SettingsError(Error, ValueError):
    """A setting (a CLI option, a config field, a function's argument) out of its range or list, of the wrong kind,
    or contradicting another, or a file or folder named by one that cannot serve it."""


class DataError(Error):
    """A dataset (label files, folders, splits, the image cache) with problems the caller did not allow skipping,
    or without the images a stage needs."""


class ImageError(Error, ValueError):
    """An image that cannot be used: a file that cannot be decoded (missing, truncated, not an image), or pixels
    too small to be an X-ray or of a type or range dmfast does not take."""


class DicomError(ImageError):
    """A DICOM file that is not a single-frame image dmfast can show."""


class ModelFileError(Error, ValueError):
    """A checkpoint, model file, anchor, masks file or backbone weights file that is missing, damaged, of another
    kind, or does not fit the settings or the other files of the run."""
