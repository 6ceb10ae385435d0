"""Reader of the RSNA Pneumonia Detection Challenge as downloaded (format ``rsna``): ``stage_2_train_labels.csv``
(``patientId,x,y,width,height,Target``: one row per box of a positive image, one row without a box for a negative
one) and ``stage_2_train_images/<patientId>.dcm`` (stage 1's names are read too).

Target 1 is Pneumonia, 0 its absence; the release says nothing of the other 13 findings, so they are unknown. Boxes
are in each image's own pixels. The challenge's test images have no labels: the release has no official test split
(evaluate with ``--split all``). When ``stage_2_detailed_class_info.csv`` is there, its "Normal" images are the ones
without any finding (the others without pneumonia may have other findings).

RSNA's images are ChestX-ray14 images under new names. With the challenge's ``pneumonia-challenge-dataset-
mappings_2018.json`` in the folder, each record knows its ChestX-ray14 name (``same_as``) and patient (the patient of
that name), so overlap with a ChestX-ray14-trained model is found; without it each image is its own patient and the
overlap cannot be told.
"""

from pathlib import Path

import json

import numpy as np

from .dataset import (FINDINGS, UNKNOWN, Box, Dataset, DataError, LabelPolicy, Problems, Record, cell, columns_of,
                      csv_table, parse_box)

COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
MAPPING = "pneumonia-challenge-dataset-mappings_2018.json"  # RSNA's patientId -> ChestX-ray14's image
PNEUMONIA = FINDINGS.index("Pneumonia")


def _labels_file(root: Path) -> Path | None:
    for stage in (2, 1):
        if (root / f"stage_{stage}_train_labels.csv").is_file():
            return root / f"stage_{stage}_train_labels.csv"
    return None


MARKER = "stage_2_train_labels.csv"  # named when no release is found


def detect(root: Path) -> bool:
    return _labels_file(root) is not None


def read(root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
    """Index an RSNA Pneumonia folder (see :func:`dmfast.data.formats.open_dataset`)."""
    path = _labels_file(root)
    if path is None:
        raise DataError(f"{root}: no stage_2_train_labels.csv (is this the RSNA Pneumonia download?)")
    images = root / path.name.replace("_labels.csv", "_images")
    header, rows = csv_table(path, listing=True)
    column = columns_of(path, header, COLUMNS, COLUMNS, problems)
    target, boxes, contradicted = {}, [], set()
    for line, row in rows:
        where = f"{path.name}:{line}"
        image, value = cell(row, column, "patientId"), cell(row, column, "Target")
        if not image or value not in ("0", "1"):
            problems.add("malformed rows", f"{where} (patientId {image!r}, Target {value!r})")
            continue
        if target.setdefault(image, int(value)) != int(value):
            contradicted.add(image)
            problems.add("contradictory rows", f"{where} ({image}: Target differs from an earlier row)")
            continue
        numbers = [cell(row, column, c) for c in ("x", "y", "width", "height")]
        if value == "0":
            if any(numbers):
                problems.add("malformed box rows", f"{where} ({image}: a box with Target 0)")
            continue
        xywh = parse_box(numbers, False, where, image, problems)
        if xywh is not None:
            boxes.append(Box(image, PNEUMONIA, xywh))
    normal = _normal_images(root / path.name.replace("train_labels", "detailed_class_info"), problems)
    nih = _nih_names(root / MAPPING)
    files = {p.stem: p for p in sorted(images.glob("*.dcm"))} if images.is_dir() else {}
    for image in sorted(set(files) - set(target)):
        problems.add(f"images in {images.name}/ not listed in {path.name}", image)
    records, paths = [], {}
    for image, value in target.items():
        if image in contradicted:
            continue
        if image not in files:
            problems.add(f"images listed in {path.name} but missing from {images.name}/", image)
            continue
        labels = np.full(len(FINDINGS), UNKNOWN, np.int8)
        labels[PNEUMONIA] = value
        same = nih.get(image, "")
        patient = int(same.split("_")[0]) if same.split("_")[0].isdigit() else image  # ChestX-ray14's patient
        records.append(Record(image, labels, patient, no_finding=None if normal is None else image in normal,
                              same_as=same))
        paths[image] = files[image]
    boxes = [b for b in boxes if b.image in paths]
    unmapped = not (root / MAPPING).is_file()
    return Dataset(root, records, paths, boxes, set(paths), set(), problems, "rsna", "image", boxes_exhaustive=True,
                   renamed_from="chestxray14" if unmapped else None,
                   renamed_note=f"RSNA Pneumonia's images are ChestX-ray14 images under new names; put the "
                                f"challenge's {MAPPING} into {root} to tell which" if unmapped else None)


CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")


def _nih_names(path: Path) -> dict:
    """patientId -> ChestX-ray14 image name from the challenge's mapping file ({} without it)."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        pairs = {e["subset_img_id"]: str(e["img_id"]) for e in entries}
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{path}: not the challenge's mapping (a list of objects with subset_img_id and img_id): "
                        f"{type(error).__name__}: {error}") from None
    return {k: v if v.endswith(".png") else f"{v}.png" for k, v in pairs.items()}


def _normal_images(path: Path, problems: Problems) -> set | None:
    """The images ``stage_2_detailed_class_info.csv`` calls Normal (None without that file)."""
    if not path.is_file():
        return None
    header, rows = csv_table(path)
    column = columns_of(path, header, ("patientId", "class"), ("patientId", "class"), problems)
    normal = set()
    for line, row in rows:
        kind = cell(row, column, "class")
        if kind not in CLASSES:
            problems.add("unknown findings", f"{path.name}:{line} ({kind!r})")
        elif kind == "Normal":
            normal.add(cell(row, column, "patientId"))
    return normal
