"""The generic format (``csv``): any folder of X-rays (PNG, JPEG or DICOM) with ``labels.csv`` and optionally
``boxes.csv``, for data no other reader knows.

``labels.csv``: a column ``image`` (the file's path relative to the folder), optional ``patient`` (default: the
file's name without suffix), ``split`` (``train`` or ``test``, blank for neither) and ``view``, and a column per
finding among the 14 (named as in :data:`~dmfast.data.dataset.FINDINGS`, in any case, or by a release's spelling
such as ChestX-ray14's ``Infiltrate``: :func:`~dmfast.data.dataset.finding_index`) whose cells are ``1``, ``0``, ``-1``
(uncertain) or blank, read by the label policy; a finding without a column is unknown. ``boxes.csv``: ``image,
finding, x_min, y_min, x_max, y_max`` in the image's own pixels, and optionally ``reader``.
"""

import difflib
from pathlib import Path

import numpy as np

from .dataset import (FINDINGS, UNKNOWN, Box, Dataset, DataError, LabelPolicy, Problems, Record, cell, columns_of,
                      csv_table, finding_index, parse_box)

LABEL_COLUMNS = ("image", "patient", "split", "view", *FINDINGS)
BOX_COLUMNS = ("image", "finding", "x_min", "y_min", "x_max", "y_max")
SPLITS = ("train", "test", "")


def _finding(name: str) -> str | None:
    """The finding ``name`` stands for (any case, a release's spelling), or None."""
    try:
        return FINDINGS[finding_index(name)]
    except ValueError:
        return None


MARKER = "labels.csv"  # named when no release is found


def detect(root: Path) -> bool:
    return (root / MARKER).is_file()


def read(root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
    """Index a folder in the generic format (see :func:`dmfast.data.formats.open_dataset`)."""
    path = root / "labels.csv"
    if not path.is_file():
        raise DataError(f"{root}: no labels.csv (the generic format: see docs/datasets.md)")
    header, rows = csv_table(path, listing=True)
    header = [_finding(name) or name for name in header]  # "Infiltrate", "pleural effusion": the 14's own names
    column = columns_of(path, header, ("image",), LABEL_COLUMNS, problems)
    records, paths, train_val, test = [], {}, set(), set()
    for line, row in rows:
        where = f"{path.name}:{line}"
        image, split = cell(row, column, "image"), cell(row, column, "split").lower()
        if not image or split not in SPLITS:
            problems.add("malformed rows", f"{where} (image {image!r}, split {split!r})")
            continue
        labels = np.full(len(FINDINGS), UNKNOWN, np.int8)
        try:
            for i, finding in enumerate(FINDINGS):
                if finding in column:
                    labels[i] = policy.value(cell(row, column, finding))
        except ValueError as error:
            problems.add("malformed rows", f"{where} (label {str(error)!r} is not 1, 0, -1 or blank)")
            continue
        file = root / image
        if not file.is_file():
            problems.add("images listed in labels.csv but missing", image)
            continue
        if image in paths:
            problems.add("duplicated rows", f"{where} ({image})")
            continue
        records.append(Record(image, labels, cell(row, column, "patient") or Path(image).stem,
                              cell(row, column, "view")))
        paths[image] = file
        (train_val if split == "train" else test if split == "test" else set()).add(image)
    boxes = _read_boxes(root / "boxes.csv", problems, paths) if (root / "boxes.csv").is_file() else []
    return Dataset(root, records, paths, boxes, train_val, test, problems, "csv", "image")


def _read_boxes(path: Path, problems: Problems, paths: dict) -> list:
    header, rows = csv_table(path)
    column = columns_of(path, header, BOX_COLUMNS, (*BOX_COLUMNS, "reader"), problems)
    boxes = []
    for line, row in rows:
        where = f"{path.name}:{line}"
        image, given = cell(row, column, "image"), cell(row, column, "finding")
        finding = _finding(given)
        if finding is None:
            close = difflib.get_close_matches(given, FINDINGS, 1, 0.6)
            problems.add("box rows with unknown labels", f"{where} ({given!r}" +
                         (f"; did you mean {close[0]!r}?)" if close else ")"))
            continue
        if image not in paths:
            problems.add("boxes of images missing or not in labels.csv", image)
            continue
        xywh = parse_box([cell(row, column, c) for c in BOX_COLUMNS[2:]], True, where, image, problems)
        if xywh is not None:
            boxes.append(Box(image, FINDINGS.index(finding), xywh, cell(row, column, "reader")))
    return boxes
