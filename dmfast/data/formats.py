"""The release readers behind one call: :func:`open_dataset` picks the reader by ``format`` or detects it from the
folder, then checks what every release shares (boxes inside their images) and raises the data report.

Formats (docs/datasets.md documents each layout, label mapping and policy):

- ``chestxray14``: NIH ChestX-ray14 (``Data_Entry_2017.csv``, ``BBox_List_2017.csv``, the split lists);
- ``vindr``: VinDr-CXR (DICOM, ``annotations_{train,test}.csv`` with each radiologist's boxes, ``image_labels_*.csv``);
- ``rsna``: RSNA Pneumonia Detection (DICOM, ``stage_2_train_labels.csv``: boxes of Pneumonia);
- ``chexpert``: CheXpert (``train.csv``/``valid.csv``: image-level labels with uncertain ``-1`` and blanks);
- ``mimic``: MIMIC-CXR-JPG (``mimic-cxr-2.0.0-chexpert.csv``, ``-split.csv``, ``-metadata.csv``, ``.gz`` or not);
- ``csv``: any folder of images with ``labels.csv`` (and optionally ``boxes.csv``), the generic format.
"""

from pathlib import Path

from ..errors import SettingsError
from . import chestxray14, chexpert, folder, rsna, vindr
from .dataset import BOX_SPACES, FINDINGS, Dataset, DataError, LabelPolicy, Problems, box_inside

# Each reader: detect(root), read(root, problems, policy, lists) -> Dataset, MARKER (the file that tells it);
# adding a release is its module and one line here.
READERS = {
    "chestxray14": chestxray14,
    "vindr": vindr,
    "rsna": rsna,
    "chexpert": chexpert.CHEXPERT,
    "mimic": chexpert.MIMIC,
    "csv": folder,
}
FORMATS = tuple(READERS)


def detect_format(root) -> str:
    """The format of the release in ``root``, from the files its download has (a DataError when none or several
    match: then name it with ``--format``)."""
    root = Path(root)
    found = [name for name, reader in READERS.items() if reader.detect(root)]
    if len(found) == 1:
        return found[0]
    if not found:
        markers = [reader.MARKER for reader in READERS.values()]
        raise DataError(f"{root}: not a folder of a known release ({', '.join(FORMATS)}; see docs/datasets.md"
                        f"), e.g. no {', '.join(markers[:-1])} or {markers[-1]}")
    raise DataError(f"{root}: looks like several releases ({', '.join(found)}); give --format")


def open_dataset(root, format: str | None = None, *, skip_problems: bool = False, lists: bool = True,
                 box_space: str | None = None, policy: LabelPolicy | None = None,
                 check_boxes: bool | None = None) -> Dataset:
    """Index the release in folder ``root``. Raises :class:`DataError` naming every problem unless
    ``skip_problems`` (then rows with problems are left out and ``dataset.problems`` lists them).

    ``format``: one of :data:`FORMATS` (default: detected). ``lists``: check the official split (ChestX-ray14's
    lists: an image in both, or in neither while both exist). ``box_space``: the pixels the boxes are in (see
    :meth:`~dmfast.data.dataset.Dataset.boxes_xyxy`; default the release's own, which becomes the dataset's);
    ``check_boxes`` (default: when ``box_space`` is given): boxes must lie inside their images there, and images
    whose size cannot be read are problems. ``policy``: what uncertain and blank labels mean
    (releases that have them)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if box_space not in (None, *BOX_SPACES):
        raise SettingsError(f"box space must be one of {', '.join(BOX_SPACES)}, got {box_space!r}")
    if format is not None and format not in READERS:
        raise SettingsError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    format = format or detect_format(root)
    problems = Problems()
    dataset = READERS[format].read(root, problems, policy or LabelPolicy(), lists)
    space = box_space or dataset.box_space
    if space == "release" and dataset.box_space != "release":
        raise SettingsError(f"{root}: a {format} release draws its boxes on its own images; box space 'release' is "
                            "ChestX-ray14's 1024 x 1024 frame")
    dataset.box_space = space
    if check_boxes if check_boxes is not None else box_space is not None:
        inside, unreadable = [], set()
        for box in dataset.boxes:
            try:
                if box_inside(box, dataset.paths[box.image], space):
                    inside.append(box)
                else:
                    problems.add("boxes outside the image", f"{box.image} ({FINDINGS[box.finding]} {box.xywh})")
            except DataError as error:  # a header that cannot be read: the image cannot be scored
                if box.image not in unreadable:
                    unreadable.add(box.image)
                    problems.add("images whose size cannot be read", str(error))
        dataset.boxes = [b for b in inside if b.image not in unreadable]
        dataset.records = [r for r in dataset.records if r.image not in unreadable]
    if problems and not skip_problems:
        raise DataError(f"{root}: problems found (pass --skip-problems to leave them out):\n{problems.report()}")
    return dataset


def label_policy(config) -> LabelPolicy:
    """The label policy of a stage's :class:`~dmfast.config.DataConfig`."""
    return LabelPolicy(config.uncertain, config.blank)


def open_data(config, lists: bool = True, **kwargs) -> Dataset:
    """:func:`open_dataset` of a stage's :class:`~dmfast.config.DataConfig` (its folder, format, skipping and label
    policy)."""
    return open_dataset(config.data, config.format, skip_problems=config.skip_problems, lists=lists,
                        policy=label_policy(config), **kwargs)
