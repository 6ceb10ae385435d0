"""Reader of the NIH ChestX-ray14 release as downloaded: images, ``Data_Entry_2017.csv`` (original or v2020),
``BBox_List_2017.csv`` and the official split lists.

Problems (images listed but missing, unknown labels, malformed rows) are collected in a :class:`Problems` report;
the reader raises :class:`DataError` with that report unless the caller allows skipping, in which case the affected
rows are left out and the report says which. Nothing is dropped silently.
"""

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import square_geometry

# The 14 findings in the order every label vector, logit and mask uses.
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv.
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
# Boxes are given in the pixel space of the released 1024 x 1024 PNGs.
RELEASE_SIZE = 1024
BOX_SPACES = ("release", "image")  # the pixel spaces a BBox_List_2017.csv may be written in (boxes_xyxy)
BOX_SLACK = 1.0  # pixels a box may reach past the image's edge (rounding of drawn boxes) before it is a problem


class DataError(RuntimeError):
    """The dataset has problems and the caller did not allow skipping them."""


@dataclass
class Problems:
    """Named lists of problem items (image names, or 'file:line' for rows)."""

    items: dict = field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        self.items.setdefault(kind, []).append(item)

    def __bool__(self) -> bool:
        return any(self.items.values())

    def count(self, kind: str | None = None) -> int:
        return sum(len(v) for k, v in self.items.items() if kind is None or k == kind)

    def report(self, first: int = 5) -> str:
        lines = []
        for kind, items in self.items.items():
            shown = ", ".join(items[:first]) + (f", ... ({len(items) - first} more)" if len(items) > first else "")
            lines.append(f"{len(items)} {kind}: {shown}")
        return "\n".join(lines)

    def merge(self, other: "Problems") -> None:
        for kind, items in other.items.items():
            self.items.setdefault(kind, []).extend(items)


@dataclass
class Record:
    image: str  # "Image Index", e.g. 00000001_000.png
    labels: np.ndarray  # [14] uint8 in FINDINGS order
    patient: int
    view: str
    follow_up: int


@dataclass
class Box:
    image: str
    finding: int  # index into FINDINGS
    xywh_release: tuple  # as listed, in the 1024 x 1024 release space


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


def read_text(path) -> str:
    """The text of a data file (UTF-8, with or without a byte-order mark); a byte that is not UTF-8 is an error
    naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8") from None


def _csv_table(path: Path) -> tuple:
    """(header, [(line number, row)]) of a CSV file."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row")
        rows = []
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num + 1}: not CSV ({error})") from None
    return header, rows


def read_data_entry(path, problems: Problems, named: set | None = None) -> list:
    """Rows of Data_Entry_2017.csv as :class:`Record`; malformed rows and unknown labels go to ``problems``, and
    the image of every row, also of those, to ``named``."""
    path = Path(path)
    header, rows = _csv_table(path)
    column = {name.strip(): i for i, name in enumerate(header)}
    missing = {"Image Index", "Finding Labels", "Patient ID"} - set(column)
    if missing:
        raise DataError(f"{path}: header lacks the columns {sorted(missing)} (got {header})")
    records, seen, contradicted = [], {}, set()
    for line, row in rows:
        where = f"{path.name}:{line}"
        if not any(cell.strip() for cell in row):
            continue
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
        labels = np.zeros(len(FINDINGS), np.uint8)
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
    for line, row in _csv_table(path)[1]:
        where = f"{path.name}:{line}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 6:
            problems.add("malformed box rows", f"{where} (too few columns)")
            continue
        label = BOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip())
        if label not in FINDINGS:
            problems.add("box rows with unknown labels", f"{where} ({row[1]!r})")
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            problems.add("malformed box rows", f"{where} (non-numeric box {row[2:6]})")
            continue
        if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
            problems.add("malformed box rows", f"{where} (box {x, y, w, h})")
            continue
        if x < -BOX_SLACK or y < -BOX_SLACK:
            problems.add("boxes outside the image", f"{where} ({row[0].strip()}: box {x, y, w, h})")
            continue
        box = Box(row[0].strip(), FINDINGS.index(label), (x, y, w, h))
        key = (box.image, box.finding, box.xywh_release)
        if key in seen:
            problems.add("duplicated box rows", f"{where} ({box.image}, as {seen[key]})")
            continue
        seen[key] = where
        boxes.append(box)
    return boxes


def read_list(path) -> list:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def image_size(path) -> tuple:
    """(width, height) from the PNG header, without decoding the pixels."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


@dataclass
class ChestXray14:
    """An index of a ChestX-ray14-format directory (no pixels are read here)."""

    root: Path
    records: list  # [Record], in Data_Entry order, only those with an image file
    paths: dict  # image -> Path
    boxes: list  # [Box] of records kept
    train_val: set
    test: set
    problems: Problems

    @property
    def images(self) -> list:
        return [r.image for r in self.records]

    def labels(self) -> np.ndarray:
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, len(FINDINGS)), np.uint8)

    def patients(self) -> np.ndarray:
        return np.array([r.patient for r in self.records], dtype=np.int64)

    def boxes_xyxy(self, image_sizes: dict | None = None, space: str = "release") -> dict:
        """Boxes per image as ``(finding, x0, y0, x1, y1)`` rows in the pixel space of the stored image (or of
        ``image_sizes[image] = (width, height)``; the image cache's frame is :meth:`boxes_in_square`), mapped from
        the space the box file uses:
        ``"release"``, the 1024 x 1024 images of the ChestX-ray14 release (whatever size the stored PNGs have),
        or ``"image"``, the pixels of the stored image itself (datasets that draw boxes on their own images)."""
        if space not in BOX_SPACES:
            raise ValueError(f"box space must be one of {', '.join(BOX_SPACES)}, got {space!r}")
        out = {}
        for box in self.boxes:
            width, height = (image_sizes or {}).get(box.image) or image_size(self.paths[box.image])
            source = (RELEASE_SIZE, RELEASE_SIZE) if space == "release" else image_size(self.paths[box.image])
            sx, sy = width / source[0], height / source[1]
            x, y, w, h = box.xywh_release
            out.setdefault(box.image, []).append((box.finding, x * sx, y * sy, (x + w) * sx, (y + h) * sy))
        return out

    def boxes_in_square(self, names, size: int, space: str = "release") -> dict:
        """The boxes of ``names`` (as :meth:`boxes_xyxy`) in the frame of the image cache: each image padded to a
        centred square and resized to ``size`` (:func:`dmfast.data.images.square_geometry`)."""
        own, out = self.boxes_xyxy(None, space), {}
        for name in (n for n in names if n in own):
            left, top, right, _ = self.image_in_square(name, size)
            scale = (right - left) / image_size(self.paths[name])[0]  # cache pixels per image pixel
            out[name] = [(c, left + x0 * scale, top + y0 * scale, left + x1 * scale, top + y1 * scale)
                         for c, x0, y0, x1, y1 in own[name]]
        return out

    def image_in_square(self, name: str, size: int) -> tuple:
        """Where image ``name`` lies in the image cache's ``size`` square (the rest is padding): (x0, y0, x1, y1)."""
        width, height = image_size(self.paths[name])
        _, _, scale, pad_x, pad_y = square_geometry(width, height, size)
        return pad_x / scale, pad_y / scale, (pad_x + width) / scale, (pad_y + height) / scale


def open_dataset(root, skip_problems: bool = False, lists: bool = True, box_space: str | None = None) -> ChestXray14:
    """Index a ChestX-ray14-format directory. Raises :class:`DataError` naming every problem unless
    ``skip_problems`` (then rows with problems are left out and ``dataset.problems`` lists them).

    With ``lists`` the split lists are checked too (an image in both, or in neither while both exist);
    with a ``box_space`` (see :meth:`ChestXray14.boxes_xyxy`) the boxes must lie inside their images. Names in the
    lists that Data_Entry_2017.csv does not have are not problems: the lists cover the whole release, a download
    may hold part of it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if box_space not in (None, *BOX_SPACES):
        raise ValueError(f"box space must be one of {', '.join(BOX_SPACES)}, got {box_space!r}")
    entry = root / "Data_Entry_2017.csv"
    if not entry.is_file():
        raise DataError(f"{root}: no Data_Entry_2017.csv (is this a ChestX-ray14 download?)")
    problems = Problems()
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
            elif box_space is not None and not _box_inside(box, paths[box.image], box_space):
                problems.add("boxes outside the image", f"{box.image} ({FINDINGS[box.finding]} {box.xywh_release})")
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
    dataset = ChestXray14(root, kept, paths, boxes, train_val, test, problems)
    if problems and not skip_problems:
        raise DataError(f"{root}: problems found (pass --skip-problems to leave them out):\n{problems.report()}")
    return dataset


def _box_inside(box: Box, path, space: str) -> bool:
    """Whether ``box`` lies inside its image (within :data:`BOX_SLACK`), in the pixel space the box file uses."""
    width, height = (RELEASE_SIZE, RELEASE_SIZE) if space == "release" else image_size(path)
    x, y, w, h = box.xywh_release
    return x + w <= width + BOX_SLACK and y + h <= height + BOX_SLACK
