"""Reproducible splits of a ChestX-ray14 index: the official patient-wise train/test lists, a patient-grouped
validation split carved from train_val, and a patient-grouped k-fold over the images with boxes (the protocol of
the CIA-Net line of work). Saved with a run as JSON so the run can be resumed or audited."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, SettingsError
from ..io import atomic_write_json


@dataclass
class Splits:
    train: list
    val: list
    test: list
    seed: int
    val_fraction: float
    folds: list = field(default_factory=list)  # k lists of box images, patient-disjoint

    def save(self, path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path) -> "Splits":
        with open(path) as f:
            return cls(**json.load(f))


def _patient_of(patient_of: dict | None):
    """The patient of each image: ``patient_of`` (the Patient ID column), else the NIH file name's prefix
    (``00000001_000.png`` is patient 1)."""
    if patient_of is not None:
        return lambda image: patient_of[image]

    def from_name(image: str) -> int:
        prefix = image.split("_", 1)[0]
        if not prefix.isdigit():
            raise DataError(f"{image}: no patient ID (the name does not start with NIH's patient number); give the "
                            "patients (the dataset's Patient ID column)")
        return int(prefix)
    return from_name


def patient_groups(images, fraction: float, seed: int, patient_of: dict | None = None) -> tuple:
    """Split ``images`` into (rest, held_out) so that every patient (``patient_of[image]``, or the NIH name's
    prefix) falls on one side and about ``fraction`` of the patients are held out; deterministic for a seed."""
    patient = _patient_of(patient_of)
    patients = sorted({patient(i) for i in images})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(patients)[: int(round(fraction * len(patients)))].tolist())
    rest = [i for i in images if patient(i) not in held]
    return rest, [i for i in images if patient(i) in held]


def kfold_by_patient(images, k: int, seed: int, patient_of: dict | None = None) -> list:
    """``k`` patient-disjoint folds of ``images`` (patients shuffled with the seed, dealt round-robin)."""
    if k < 2:
        raise SettingsError(f"k-fold needs k >= 2, got {k}")
    patient = _patient_of(patient_of)
    patients = np.random.default_rng(seed).permutation(sorted({patient(i) for i in images})).tolist()
    fold_of = {p: n % k for n, p in enumerate(patients)}
    folds = [[] for _ in range(k)]
    for image in images:
        folds[fold_of[patient(image)]].append(image)
    return folds


def make_splits(dataset, val_fraction: float = 0.1, seed: int = 0, box_folds: int = 0,
                split: str = "official") -> Splits:
    """Splits of ``dataset`` (a :class:`~dmfast.data.dataset.Dataset`).

    ``split="official"`` uses the release's own split (ChestX-ray14's train_val_list.txt / test_list.txt: images in
    neither are left out and reported by the caller); ``split="patients"`` ignores the lists and holds out
    ``val_fraction`` of the patients for test as well (for small directories whose images all sit in one official
    list). ``box_folds=k`` adds a patient-grouped
    k-fold over the images that have boxes.
    """
    images = dataset.images
    patient_of = {r.image: r.patient for r in dataset.records}  # the Patient ID column, not the file name
    if split == "official":
        train_val = [i for i in images if i in dataset.train_val]
        test = [i for i in images if i in dataset.test]
    elif split == "patients":
        train_val, test = patient_groups(images, val_fraction, seed + 1, patient_of)
    else:
        raise SettingsError(f"split must be 'official' or 'patients', got {split!r}")
    train, val = patient_groups(train_val, val_fraction, seed, patient_of)
    boxed = sorted({b.image for b in dataset.boxes})
    folds = kfold_by_patient(boxed, box_folds, seed, patient_of) if box_folds else []
    return Splits(train, val, test, seed, val_fraction, folds)


def summary(dataset, splits: Splits, split: str) -> str:
    """One line on a split: its sizes and, for the official lists, how many listed images the folder lacks (the
    lists cover the whole release; a download may hold part of it)."""
    text = (f"split ({'official lists' if split == 'official' else 'patient-grouped'}): {len(splits.train)} train, "
            f"{len(splits.val)} validation, {len(splits.test)} test images")
    official = split == "official"
    absent = len((dataset.train_val | dataset.test) - set(dataset.images)) if official else 0
    unlisted = len(set(dataset.images) - dataset.train_val - dataset.test) if official else 0
    text += f"; {unlisted:,} images are in neither list (not used)" if unlisted else ""
    text += f"; the lists name {absent:,} more images this folder does not have" if absent else ""
    where = "test_list.txt is missing or empty" if dataset.format == "chestxray14" else \
        f"the {dataset.format} release has no official test split"
    return text + (f"; no test images ({where}: evaluate on other data, or --split patients)"
                   if official and not splits.test else "")
