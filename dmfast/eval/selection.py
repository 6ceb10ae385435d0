"""Which images ``dmfast eval`` scores (:func:`select_images`: the checkpoint's own test split, a release's
official lists, all images or a file of names) and how many of them share a name or a patient with a classifier's
training images (:func:`training_overlap`)."""

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..config import EVAL_SPLITS, EvalConfig
from ..data.cache import CacheSet, ImageCache
from ..data.dataset import read_text
from ..data.formats import detect_format, open_dataset
from ..errors import DataError, SettingsError
from ..inference import Classifier


@dataclass
class Selection:
    names: list  # the images to score, in order
    what: str  # how they were chosen, for the report
    own: bool  # the data is the first checkpoint's training data
    overlap: dict = field(default_factory=dict)  # checkpoint name -> {"names": n, "patients": n}


def _same_data(dataset, classifier: Classifier) -> bool:
    """Whether ``dataset`` is the data the classifier was trained on: the same folder, or the same images (the
    folder moved or copied; a model file keeps the names). Its images mixed in from other folders do not count."""
    data = classifier.config.data  # None: a model file of an older dmfast, which kept no settings
    if data is not None and Path(data).resolve() == Path(dataset.root).resolve():
        return True
    splits, mixed = classifier.splits, tuple(CacheSet.key(i, "") for i in range(len(classifier.config.mix)))
    named = {n for n in [*splits.train, *splits.val, *splits.test] if not (mixed and n.startswith(mixed))}
    return bool(named) and named == set(dataset.images)


def select_images(config: EvalConfig, dataset, first: Classifier) -> Selection:
    """The images to score: ``config.images`` (a file of names), else ``config.split`` of the data's own lists
    (``test``, ``train_val``, ``all``), else the first checkpoint's test split when the data is its training data,
    else the data's ``test_list.txt``. An empty choice is an error saying why."""
    own = _same_data(dataset, first)
    present = set(dataset.images)
    if config.images:
        path = Path(config.images)
        if not path.is_file():
            raise SettingsError(f"--images {path}: no such file")
        wanted = [line.strip() for line in read_text(path).splitlines() if line.strip() and
                  not line.strip().startswith("#")]
        missing = [n for n in wanted if n not in present]
        if missing:
            raise SettingsError(f"--images {path}: {len(missing)} names are not images of {config.data}, e.g. "
                                f"{', '.join(missing[:3])}")
        wanted = list(dict.fromkeys(wanted))
        if not wanted:
            raise SettingsError(f"--images {path}: no image names in it")
        return Selection(wanted, f"the {len(wanted)} names of {path}", own)
    if config.split is None and own:
        names = [n for n in first.splits.test if n in present]
        if not names:
            raise DataError(f"{config.data}: the checkpoint's test split is empty or none of its images is here; "
                            "choose --split or --images")
        return Selection(names, "the checkpoint's test split", own)
    split = config.split or "test"
    if split not in EVAL_SPLITS:
        raise SettingsError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    if split == "all":
        return Selection(dataset.images, f"all {len(dataset.images)} images of {config.data}", own)
    listed = dataset.test if split == "test" else dataset.train_val
    lists = dataset.split_lists  # other releases split by folder or file, not by lists
    if not listed:
        raise DataError(f"{config.data}: " + (f"no {split}_list.txt (or it is empty)" if lists else
                        f"the {dataset.format} release has no official {split} images") +
                        ": choose --split all or --images FILE")
    names = [n for n in dataset.images if n in listed]
    if not names:
        raise DataError(f"{config.data}: none of the images in {split}_list.txt is present")
    return Selection(names, f"{config.data}'s {split}_list.txt" if lists else
                     f"the official {split} images of {config.data}", own)


def training_overlap(classifier: Classifier, dataset, names: list) -> dict:
    """How many of ``names`` share an image name, and how many a patient ID, with the classifier's training and
    validation images: ``names``, ``patients``, each None when it cannot be told, and ``unknown_because`` saying
    why. Patients are read from its training data when that is readable here, else taken from its model file
    (which keeps them, as text). When ``dataset`` is one of the folders mixed into its training (``train
    --mix``), those images count too."""
    if not getattr(classifier, "splits_known", True):
        return {"names": None, "patients": None, "unknown_because": "its model file was written before model files "
                "kept their training images (export it again from its checkpoint)"}
    trained = set(classifier.splits.train) | set(classifier.splits.val)
    source, here = classifier.config.data, Path(dataset.root).resolve()
    why = f"its training data {source} is not readable here" if source else "its training data is not recorded"
    patients, formats, key = None, set(), lambda patient: patient
    training_data = None
    if source is not None:
        try:
            training_data = dataset if here == Path(source).resolve() else \
                open_dataset(source, classifier.config.format, skip_problems=True, lists=False)
        except (DataError, OSError):  # the training data is not here (or no longer readable)
            pass
    if training_data is not None:
        patients = {r.patient for r in training_data.records if r.image in trained}
        formats.add(training_data.format)
    elif getattr(classifier, "patients", None) is not None:  # kept in its model file, as text
        patients, key = set(classifier.patients), str
        formats.add(classifier.config.format)
    renamed = dataset.renamed_from  # these images may be another release's (then perhaps trained on) under new names
    for i, folder in enumerate(classifier.config.mix):
        prefix = CacheSet.key(i, "")
        if Path(folder).resolve() == here:
            mixed = {n[len(prefix):] for n in classifier.splits.train if n.startswith(prefix)}
            trained |= mixed
            patients = (patients or set()) | {key(r.patient) for r in dataset.records if r.image in mixed}
        if renamed:  # did that release's images (perhaps these) go into training?
            try:
                formats.add(detect_format(folder))
            except DataError:
                formats.add(None)
    if renamed and formats & {renamed, None}:
        patients, why = None, dataset.renamed_note
    patient_of = {r.image: r.patient for r in dataset.records}
    same_as = {r.image: r.same_as for r in dataset.records}
    return {"names": sum(n in trained or same_as[n] in trained for n in names),
            "patients": None if patients is None else sum(key(patient_of[n]) in patients for n in names),
            "unknown_because": why if patients is None else None}


def chosen_images(config: EvalConfig, dataset, classifiers: list, cache: ImageCache, console: Console) -> tuple:
    """The :class:`Selection` and the names of its images in the first classifier's ``cache``, after checking each
    classifier's training images against them: an overlap known is refused (unless ``allow_overlap``), one that
    cannot be told is refused with ``strict``, and either is said."""
    first = classifiers[0][1]
    selection = select_images(config, dataset, first)
    test_names = [n for n in selection.names if n in cache]
    if selection.own:
        for name, classifier in classifiers[1:]:
            if set(classifier.splits.test) != set(first.splits.test):
                console.print(f"[yellow]{name} was trained with a different test split; all are scored on the test "
                              f"split of {classifiers[0][0]}")
    if not test_names:
        raise DataError(f"{config.data}: none of the {len(selection.names)} images of {selection.what} is in the "
                        "image cache (unreadable images left out?)")
    console.print(f"scoring {len(test_names)} images: {selection.what}")
    for name, classifier in classifiers:
        overlap = training_overlap(classifier, dataset, test_names)
        selection.overlap[name] = overlap
        count = {k: "none" if overlap[k] == 0 else overlap[k] for k in ("names", "patients")}
        if overlap["names"] != 0 or overlap["patients"] != 0:  # say what was checked and what could not be
            patients = f"{count['patients']} share a patient ID" if overlap["patients"] is not None else \
                f"an unknown number share a patient ID (not checked: {overlap['unknown_because']})"
            message = (f"{count['names']} of the {len(test_names)} evaluation images share a name with the training "
                       f"images of {name}; {patients}" if overlap["names"] is not None else
                       f"the {len(test_names)} evaluation images could not be checked against the training images of "
                       f"{name} ({overlap['unknown_because']})")
            known = overlap["names"] or overlap["patients"]
            if known and not config.allow_overlap:
                raise DataError(f"{message}: scores on training images are not test scores (choose other images "
                                "with --split or --images, or pass --allow-overlap to score them anyway)")
            if not known and config.strict:
                raise DataError(f"{message} (--strict)")
            console.print(f"[yellow]warning: {message}")
    return selection, test_names
