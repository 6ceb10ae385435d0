"""Reader of VinDr-CXR as downloaded (format ``vindr``): ``train/`` and ``test/`` with one DICOM per image
(``<image_id>.dicom``), ``annotations_train.csv`` / ``annotations_test.csv`` (each radiologist's boxes: ``image_id,
rad_id, class_name, x_min, y_min, x_max, y_max``; Kaggle's copy adds ``class_id``) and ``image_labels_train.csv`` /
``image_labels_test.csv`` (image-level labels, one column per finding), at the top or under ``annotations/``.

Boxes are in each image's own pixels and keep their reader (``rad_id``); ``eval --fuse-readers`` fuses overlapping
boxes of several readers. VinDr-CXR has no patient IDs: each image counts as its own patient. The mapping of
VinDr-CXR's findings onto the 14 (:data:`TO_FINDINGS`) is documented in docs/datasets.md; findings outside the 14 are
noted and left out; names VinDr-CXR does not have are problems.
"""

from pathlib import Path

import numpy as np

from .dataset import (FINDINGS, UNKNOWN, Box, Dataset, DataError, LabelPolicy, Problems, Record, cell, columns_of,
                      csv_header, csv_table, parse_box)
from .images import IMAGE_SUFFIXES

# VinDr-CXR finding -> the findings of the 14 it stands for ("Nodule/Mass" is both).
TO_FINDINGS = {
    "Atelectasis": ("Atelectasis",), "Cardiomegaly": ("Cardiomegaly",), "Pleural effusion": ("Effusion",),
    "Infiltration": ("Infiltration",), "Nodule/Mass": ("Nodule", "Mass"), "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",), "Consolidation": ("Consolidation",), "Edema": ("Edema",),
    "Emphysema": ("Emphysema",), "Pulmonary fibrosis": ("Fibrosis",), "Pleural thickening": ("Pleural_Thickening",),
}
# VinDr-CXR's 22 local (boxed) and 6 global findings (PhysioNet release; Kaggle's copy has 14 local ones).
LOCAL = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
         "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
         "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening",
         "Pneumothorax", "Pulmonary fibrosis", "Rib fracture")
KAGGLE_LOCAL = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis")
GLOBAL = ("Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "Other disease", "COPD", "No finding")
KNOWN = set(LOCAL) | set(GLOBAL)
SPLITS = ("train", "test")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def _file(root: Path, name: str) -> Path | None:
    for path in (root / name, root / "annotations" / name):
        if path.is_file():
            return path
    return None


def _annotations(root: Path, split: str) -> Path | None:
    found = _file(root, f"annotations_{split}.csv")
    if found is None and split == "train" and (root / "train.csv").is_file():  # Kaggle's copy
        found = root / "train.csv" if {"image_id", "class_name"} <= set(csv_header(root / "train.csv")) else None
    return found


MARKER = "annotations_train.csv"  # (or image_labels_*.csv) named when no release is found


def detect(root: Path) -> bool:
    return any(_annotations(root, s) or _file(root, f"image_labels_{s}.csv") for s in SPLITS)


def _table(path: Path) -> tuple:
    """A VinDr-CXR CSV file, its reader column named ``rad_id`` (the image labels files spell it ``rad_ID``); each
    lists images (a "No finding" row for an image without boxes), so a header alone is an error."""
    header, rows = csv_table(path, listing=True)
    return ["rad_id" if name == "rad_ID" else name for name in header], rows


def _targets(name: str) -> list:
    return [FINDINGS.index(f) for f in TO_FINDINGS.get(name, ())]


def _images(folder: Path, problems: Problems) -> dict:
    """image_id -> file of the images in ``folder`` (DICOM as released, or PNG/JPEG conversions); an image_id with
    several files is a problem (which one is meant cannot be told) and is left out."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, []).append(path)
    for stem, paths in found.items():
        if len(paths) > 1:
            problems.add(f"images with several files in {folder.name}/", ", ".join(p.name for p in paths))
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}


def read(root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
    """Index a VinDr-CXR folder (see :func:`dmfast.data.formats.open_dataset`)."""
    records, paths, boxes, split_of = [], {}, [], {}
    for split in SPLITS:
        annotations, image_labels = _annotations(root, split), _file(root, f"image_labels_{split}.csv")
        if annotations is None and image_labels is None:
            continue
        labels, covered, findings = {}, np.zeros(len(FINDINGS), bool), set()
        if image_labels is not None:
            _read_image_labels(image_labels, problems, labels, covered, findings)
        if annotations is not None:
            boxes += _read_annotations(annotations, problems, labels, covered, findings, derive=image_labels is None)
        files = _images(root / split, problems)
        if image_labels is not None:  # boxes of images the labels file does not list: no record to hold them
            for image in sorted({b.image for b in boxes if b.image not in labels and b.image in files}):
                problems.add(f"images with boxes but not in {image_labels.name}", image)
        for image in sorted(set(files) - set(labels)):
            problems.add(f"images in {split}/ not listed in the {split} annotations", image)
        for image, positive in labels.items():
            if image not in files:
                problems.add(f"images listed in the {split} annotations but missing from {split}/", image)
                continue
            vector = np.where(covered, positive, UNKNOWN).astype(np.int8)
            records.append(Record(image, vector, image, no_finding=image not in findings))
            paths[image] = files[image]
            split_of[image] = split
    if not split_of and not problems:
        raise DataError(f"{root}: no VinDr-CXR images found (train/ and test/ with annotations)")
    boxes = [b for b in boxes if b.image in paths]
    train_val = {n for n, s in split_of.items() if s == "train"}
    test = {n for n, s in split_of.items() if s == "test"}
    return Dataset(root, records, paths, boxes, train_val, test, problems, "vindr", "image", boxes_exhaustive=True)


def _read_image_labels(path: Path, problems: Problems, labels: dict, covered: np.ndarray, findings: set) -> None:
    """Image-level labels: an image has a finding when any of its readers marked it (``findings``: the images with
    any finding, also outside the 14)."""
    header, rows = _table(path)
    column = columns_of(path, header, ("image_id",), KNOWN | {"image_id", "rad_id"}, problems)
    mapped = [name for name in header if name in TO_FINDINGS]
    others = [name for name in header if name in KNOWN and name not in TO_FINDINGS and name != "No finding"]
    for name in mapped:
        covered[_targets(name)] = True
    for line, row in rows:
        image = cell(row, column, "image_id")
        if not image:
            problems.add("malformed rows", f"{path.name}:{line} (empty image_id)")
            continue
        vector = labels.setdefault(image, np.zeros(len(FINDINGS), np.int8))
        for name in mapped + others:
            value = cell(row, column, name)
            if value not in ("0", "1", "0.0", "1.0"):
                problems.add("malformed rows", f"{path.name}:{line} ({image}: {name} = {value!r})")
                targets = _targets(name)
                vector[targets] = np.where(vector[targets] == 1, 1, UNKNOWN)  # unless another reader marked it
                continue
            if float(value) == 1:
                vector[_targets(name)] = 1
                findings.add(image)


def _read_annotations(path: Path, problems: Problems, labels: dict, covered: np.ndarray, findings: set,
                      derive: bool) -> list:
    """Boxes of the findings among the 14; with ``derive`` (no image labels file), also the image-level labels they
    imply into ``labels`` (a finding is present when a reader boxed it; the findings the release can box are the
    ``covered`` ones) and ``findings``, the images with any finding."""
    header, rows = _table(path)
    column = columns_of(path, header, ("image_id", "class_name"),
                        {"image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS}, problems)
    local = KAGGLE_LOCAL if "class_id" in column else LOCAL
    if derive:
        for name in local:
            covered[_targets(name)] = True
    boxes, seen, outside = [], {}, {}
    for line, row in rows:
        where = f"{path.name}:{line}"
        image, name, reader = cell(row, column, "image_id"), cell(row, column, "class_name"), cell(row, column,
                                                                                                    "rad_id")
        if not image:
            problems.add("malformed rows", f"{where} (empty image_id)")
            continue
        if derive:
            labels.setdefault(image, np.zeros(len(FINDINGS), np.int8))
        if name not in KNOWN:
            problems.add("unknown findings", f"{where} ({name!r})")
            continue
        if derive and name != "No finding":
            findings.add(image)
        targets = _targets(name)
        if not targets:
            if name != "No finding":
                outside[name] = outside.get(name, 0) + 1
            continue
        if derive:
            labels[image][targets] = 1
        corners = [cell(row, column, c) for c in BOX_COLUMNS]
        if not any(corners):
            continue  # an image-level finding without a box
        xywh = parse_box(corners, True, where, image, problems)
        if xywh is None:
            continue
        for finding in targets:
            key = (image, finding, reader, xywh)
            if key in seen:
                problems.add("duplicated box rows", f"{where} ({image}, as {seen[key]})")
                continue
            seen[key] = where
            boxes.append(Box(image, finding, xywh, reader))
    for name, count in sorted(outside.items()):
        problems.note(f"findings of {path.name} outside the 14 (left out)", f"{name} ({count} rows)")
    return boxes
