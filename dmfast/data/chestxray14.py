"""Reader of the NIH ChestX-ray14 release as downloaded: images, ``Data_Entry_2017.csv`` (original or v2020),
``BBox_List_2017.csv`` and the official split lists (format ``chestxray14`` of :mod:`dmfast.data.formats`).

Its boxes are in the 1024 x 1024 pixel space of the released PNGs (box space ``"release"``), whatever size the
stored PNGs have.
"""

import os
from pathlib import Path

import numpy as np

from .dataset import (FINDINGS, Box, Dataset, DataError, LabelPolicy, Problems, Record, csv_table, parse_box,
                      read_text)

NO_FINDING = "No Finding"
PHANTOM_TRANSFORMS = "phantom_transforms.csv"  # written by dmfast synth (dmfast.phantom) beside its release files
# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv.
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}


def find_images(root) -> dict:
    """Map image name -> path for PNGs under ``root/images`` and the release's ``root/images_NNN/images``."""
    root = Path(root)
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    found = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.lower().endswith(".png") and entry.is_file():  # not a dangling link or folder
                        found.setdefault(entry.name, Path(entry.path))
    return found


def read_data_entry(path, problems: Problems, named: set | None = None) -> list:
    """Rows of Data_Entry_2017.csv as :class:`Record`; malformed rows and unknown labels go to ``problems``, and
    the image of every row, also of those, to ``named``."""
    path = Path(path)
    header, rows = csv_table(path)
    column = {name.strip(): i for i, name in enumerate(header)}
    missing = {"Image Index", "Finding Labels", "Patient ID"} - set(column)
    if missing:
        raise DataError(f"{path}: header lacks the columns {sorted(missing)} (got {header})")
    records, seen, contradicted = [], {}, set()
    for line, row in rows:
        where = f"{path.name}:{line}"
        if named is not None and len(row) > column["Image Index"]:
            named.add(row[column["Image Index"]].strip())
        if len(row) <= max(column["Image Index"], column["Finding Labels"], column["Patient ID"]):
            problems.add("malformed rows", f"{where} (too few columns)")
            continue
        image, findings = row[column["Image Index"]].strip(), row[column["Finding Labels"]].strip()
        try:
            patient = int(row[column["Patient ID"]])
        except ValueError:
            patient = -1
        if patient < 0:
            problems.add("malformed rows", f"{where} (Patient ID {row[column['Patient ID']]!r})")
            continue
        if not image:
            problems.add("malformed rows", f"{where} (empty Image Index)")
            continue
        labels = np.zeros(len(FINDINGS), np.int8)
        unknown = []
        for token in findings.split("|"):
            token = token.strip()
            if token == NO_FINDING:
                continue
            if token in FINDINGS:
                labels[FINDINGS.index(token)] = 1
            else:
                unknown.append(token)
        if unknown or not findings:
            problems.add("rows with unknown labels", f"{where} ({image}: {'|'.join(unknown) or 'empty'})")
            continue
        view = row[column["View Position"]].strip() if "View Position" in column and len(row) > column[
            "View Position"] else ""
        follow = row[column["Follow-up #"]].strip() if "Follow-up #" in column and len(row) > column[
            "Follow-up #"] else ""
        record = Record(image, labels, patient, view, int(follow) if follow.isdigit() else 0)
        first = seen.setdefault(image, (record, where))
        if first[0] is record:
            records.append(record)
        elif (first[0].labels == labels).all() and first[0].patient == patient:
            problems.add("duplicated rows", f"{where} ({image}, as {first[1]})")
        else:
            contradicted.add(image)
            problems.add("contradictory rows", f"{where} ({image}: labels or patient differ from {first[1]})")
    return [r for r in records if r.image not in contradicted]  # which row is right cannot be told


def read_boxes(path, problems: Problems) -> list:
    """Rows of BBox_List_2017.csv (header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``) as :class:`Box`."""
    path = Path(path)
    boxes, seen = [], {}
    for line, row in csv_table(path)[1]:
        where = f"{path.name}:{line}"
        if len(row) < 6:
            problems.add("malformed box rows", f"{where} (too few columns)")
            continue
        label = BOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip())
        if label not in FINDINGS:
            problems.add("box rows with unknown labels", f"{where} ({row[1]!r})")
            continue
        xywh = parse_box(row[2:6], False, where, row[0].strip(), problems)
        if xywh is None:
            continue
        box = Box(row[0].strip(), FINDINGS.index(label), xywh)
        key = (box.image, box.finding, box.xywh)
        if key in seen:
            problems.add("duplicated box rows", f"{where} ({box.image}, as {seen[key]})")
            continue
        seen[key] = where
        boxes.append(box)
    return boxes


def read_list(path) -> list:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


MARKER = "Data_Entry_2017.csv"  # the file that tells this release (named when no release is found)


def detect(root: Path) -> bool:
    return (root / MARKER).is_file()


def read(root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
    """Index a ChestX-ray14-format directory (see :func:`dmfast.data.formats.open_dataset`).

    With ``lists`` the split lists are checked too (an image in both, or in neither while both exist). Names in the
    lists that Data_Entry_2017.csv does not have are not problems: the lists cover the whole release, a download
    may hold part of it. Its labels are all known (``policy`` has nothing to decide)."""
    entry = root / "Data_Entry_2017.csv"
    if not entry.is_file():
        raise DataError(f"{root}: no Data_Entry_2017.csv (is this a ChestX-ray14 download?)")
    named = set()
    records = read_data_entry(entry, problems, named)
    if not records and not problems:
        raise DataError(f"{entry}: lists no images (a header only)")
    paths = find_images(root)
    for image in sorted(set(paths) - named):
        problems.add("images not listed in Data_Entry_2017.csv", image)
    kept = []
    for r in records:
        if r.image in paths:
            kept.append(r)
        else:
            problems.add("images listed in Data_Entry_2017.csv but missing", r.image)
    names = {r.image for r in kept}
    boxes = []
    box_file = root / "BBox_List_2017.csv"
    if box_file.exists() and not box_file.is_file():
        raise DataError(f"{box_file}: not a file")
    if box_file.is_file():
        for box in read_boxes(box_file, problems):
            if box.image not in names:
                problems.add("boxes of images missing or not in Data_Entry_2017.csv", box.image)
            else:
                boxes.append(box)
    list_files = [root / f"{name}_list.txt" for name in ("train_val", "test")]
    train_val, test = (set(read_list(path)) if path.exists() else set() for path in list_files)
    if lists and train_val and test:  # one list alone: the split's summary says what is missing
        both = sorted(names & train_val & test)
        for image in both:
            problems.add("images in both train_val_list.txt and test_list.txt", image)
        train_val, test = train_val - set(both), test - set(both)  # left out of both when skipping
        for image in sorted(names - train_val - test - set(both)):
            problems.add("images in neither train_val_list.txt nor test_list.txt", image)
    # the phantom draws a box for every positive finding: its images without a box of a class have none
    phantom = (root / PHANTOM_TRANSFORMS).is_file()
    return Dataset(root, kept, paths, boxes, train_val, test, problems, "chestxray14", "release",
                   boxes_exhaustive=phantom, split_lists=True)

