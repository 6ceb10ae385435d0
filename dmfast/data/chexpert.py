"""Readers of the releases labelled by the CheXpert labeler: CheXpert (format ``chexpert``: ``train.csv`` and
``valid.csv`` with a ``Path`` per image) and MIMIC-CXR-JPG (format ``mimic``: ``mimic-cxr-2.0.0-chexpert.csv``
labels per study, ``mimic-cxr-2.0.0-split.csv``, ``mimic-cxr-2.0.0-metadata.csv``, each plain or ``.gz``, images at
``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``).

Both give image-level labels only, in 14 columns of their own; seven map onto the 14 findings (:data:`TO_FINDINGS`),
the other seven of the 14 are unknown. A cell is ``1.0``, ``0.0``, ``-1.0`` (uncertain) or blank (not mentioned):
:class:`~dmfast.data.dataset.LabelPolicy` says what uncertain and blank mean (default: unknown), except that on an
image with "No Finding" = 1 a blank mapped finding is absent. Only frontal views are read (lateral ones are noted
and left out; MIMIC's views come from its metadata file). The official splits: CheXpert's train / valid, MIMIC's
train + validate / test.
"""

from pathlib import Path

import numpy as np

from .dataset import (FINDINGS, UNKNOWN, Dataset, DataError, LabelPolicy, Problems, Record, cell, columns_of,
                      csv_header, csv_table)

LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
          "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
          "Support Devices")
# CheXpert label -> finding of the 14 (the others have no counterpart: Lung Lesion is neither Mass nor Nodule alone)
TO_FINDINGS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
               "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
               "Edema": "Edema"}
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS)
FRONTAL_VIEWS = ("PA", "AP")  # MIMIC's ViewPosition of a frontal X-ray


def labels_of(row: list, column: dict, policy: LabelPolicy, where: str, problems: Problems) -> np.ndarray | None:
    """The 14-finding label vector of a CheXpert-labeler row (None, with a problem, for a malformed cell). With "No
    Finding" = 1 a blank mapped label is absent, whatever the blank policy."""
    labels = np.full(len(FINDINGS), UNKNOWN, np.int8)
    try:
        nothing = "No Finding" in column and policy.value(cell(row, column, "No Finding")) == 1
        for name, finding in TO_FINDINGS.items():
            if name in column:
                text = cell(row, column, name)
                labels[FINDINGS.index(finding)] = 0 if nothing and not text else policy.value(text)
    except ValueError as error:
        problems.add("malformed rows", f"{where} (label {str(error)!r} is not 1, 0, -1 or blank)")
        return None
    return labels


class CheXpert:
    """``train.csv`` / ``valid.csv`` in the data folder (the release's ``CheXpert-v1.0[-small]`` folder, or its
    parent). The ``Path`` column starts with the release folder's name; images are keyed by the rest."""

    MARKER = "train.csv"  # named when no release is found

    @staticmethod
    def _folder(root: Path) -> Path | None:
        for folder in (root, *sorted(root.glob("CheXpert-v1.0*"))):
            if any((folder / n).is_file() and "Path" in csv_header(folder / n) for n in ("train.csv", "valid.csv")):
                return folder
        return None

    def detect(self, root: Path) -> bool:
        return self._folder(root) is not None

    def read(self, root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
        folder = self._folder(root)
        if folder is None:
            raise DataError(f"{root}: no CheXpert train.csv or valid.csv with a Path column")
        records, paths, split = [], {}, {"train.csv": set(), "valid.csv": set()}
        lateral = 0
        for name, names in split.items():
            path = folder / name
            if not path.is_file():
                continue
            header, rows = csv_table(path, listing=True)
            column = columns_of(path, header, ("Path",), CHEXPERT_COLUMNS, problems)
            for line, row in rows:
                where = f"{name}:{line}"
                relative = Path(cell(row, column, "Path"))
                key = Path(*relative.parts[1:]).as_posix() if len(relative.parts) > 1 else relative.as_posix()
                if cell(row, column, "Frontal/Lateral") == "Lateral":
                    lateral += 1
                    continue
                file = next((p for p in (folder / key, folder.parent / relative) if p.is_file()), None)
                if file is None:
                    problems.add(f"images listed in {name} but missing", key)
                    continue
                labels = labels_of(row, column, policy, where, problems)
                if labels is None:
                    continue
                if key in paths:
                    problems.add("duplicated rows", f"{where} ({key})")
                    continue
                patient = next((part for part in relative.parts if part.startswith("patient")), relative.parent.name)
                records.append(Record(key, labels, patient, cell(row, column, "AP/PA"),
                                      no_finding=cell(row, column, "No Finding") in ("1", "1.0")))
                paths[key] = file
                names.add(key)
        if lateral:
            problems.note("lateral views (left out: dmfast reads frontal X-rays)", f"{lateral} images")
        return Dataset(root, records, paths, [], split["train.csv"], split["valid.csv"], problems, "chexpert", "image")


class MimicCXR:
    """MIMIC-CXR-JPG's CSV files at the top of the data folder, the images under ``files/``."""

    STEM = "mimic-cxr-2.0.0-"
    MARKER = f"{STEM}chexpert.csv"  # named when no release is found

    def _file(self, root: Path, name: str) -> Path | None:
        for suffix in (".csv", ".csv.gz"):
            if (root / f"{self.STEM}{name}{suffix}").is_file():
                return root / f"{self.STEM}{name}{suffix}"
        return None

    def detect(self, root: Path) -> bool:
        return self._file(root, "chexpert") is not None or self._file(root, "negbio") is not None

    def read(self, root: Path, problems: Problems, policy: LabelPolicy, lists: bool = True) -> Dataset:
        label_file = self._file(root, "chexpert") or self._file(root, "negbio")
        split_file = self._file(root, "split")
        if label_file is None or split_file is None:
            raise DataError(f"{root}: MIMIC-CXR-JPG needs {self.STEM}chexpert.csv and {self.STEM}split.csv (or .gz)")
        header, rows = csv_table(label_file, listing=True)
        column = columns_of(label_file, header, ("subject_id", "study_id"), {"subject_id", "study_id", *LABELS},
                            problems)
        study_labels = {}  # study -> (labels, no finding)
        for line, row in rows:
            labels = labels_of(row, column, policy, f"{label_file.name}:{line}", problems)
            if labels is not None:
                study_labels[cell(row, column, "study_id")] = labels, cell(row, column, "No Finding") in ("1", "1.0")
        views = {}
        metadata = self._file(root, "metadata")
        if metadata is None:
            problems.note(f"no {self.STEM}metadata.csv: views unknown, every image read (lateral ones too)", "all")
        else:
            header, rows = csv_table(metadata)
            column = columns_of(metadata, header, ("dicom_id", "ViewPosition"))
            views = {cell(row, column, "dicom_id"): cell(row, column, "ViewPosition") for _, row in rows}
        header, rows = csv_table(split_file)
        column = columns_of(split_file, header, ("dicom_id", "study_id", "subject_id", "split"),
                            {"dicom_id", "study_id", "subject_id", "split"}, problems)
        records, paths, train_val, test, other_views = [], {}, set(), set(), 0
        for line, row in rows:
            image, study, subject, split = (cell(row, column, c) for c in ("dicom_id", "study_id", "subject_id",
                                                                            "split"))
            if split not in ("train", "validate", "test") or not (image and study and subject):
                problems.add("malformed rows", f"{split_file.name}:{line}")
                continue
            if metadata is not None and image not in views:
                problems.add(f"images not in {metadata.name}", image)
                continue
            if metadata is not None and views[image] not in FRONTAL_VIEWS:
                other_views += 1
                continue
            if study not in study_labels:
                problems.add(f"images whose study has no row in {label_file.name}", image)
                continue
            file = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{image}.jpg"
            if not file.is_file():
                problems.add(f"images listed in {split_file.name} but missing", image)
                continue
            labels, nothing = study_labels[study]
            records.append(Record(image, labels.copy(), subject, views.get(image, ""), no_finding=nothing))
            paths[image] = file
            (test if split == "test" else train_val).add(image)
        if other_views:
            problems.note("views other than PA or AP (left out: dmfast reads frontal X-rays)", f"{other_views} images")
        return Dataset(root, records, paths, [], train_val, test, problems, "mimic", "image")


CHEXPERT, MIMIC = CheXpert(), MimicCXR()
