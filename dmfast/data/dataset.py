"""The dataset interface every release reader fills (:mod:`dmfast.data.formats` picks the reader): records with an
image file, a patient and labels over the 14 findings (each 1, 0 or :data:`UNKNOWN`), boxes in the pixels of a
stated space, and the release's official train/test split when it has one.

Problems (files listed but missing, unknown labels or columns, malformed rows) are collected in a :class:`Problems`
report; the reader raises :class:`DataError` with that report unless the caller allows skipping, in which case the
affected rows are left out and the report says which. Nothing is dropped silently: what a reader leaves out on
purpose (lateral views, findings outside the 14) is noted in the same report with counts and names.
"""

import csv
import functools
import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, SettingsError
from .images import square_geometry

# The 14 findings in the order every label vector, logit and mask uses.
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
# other spellings of the findings in the releases (ChestX-ray14's boxes, CheXpert, VinDr-CXR) and in the papers
FINDING_ALIASES = {"infiltrate": "Infiltration", "pleural effusion": "Effusion", "pleural thickening":
                   "Pleural_Thickening", "pulmonary fibrosis": "Fibrosis"}
UNKNOWN = -1  # a label the release does not give: left out of that class's loss and AUROC, never a negative
# ChestX-ray14's boxes are in the pixel space of its released 1024 x 1024 PNGs; other releases draw on their images.
RELEASE_SIZE = 1024
BOX_SPACES = ("release", "image")
BOX_SLACK = 1.0  # pixels a box may reach past the image's edge (rounding of drawn boxes) before it is a problem
# How a release's uncertain labels (CheXpert's -1) and blank cells (finding not mentioned) become labels.
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")  # ignore: unknown
BLANK_POLICIES = ("unknown", "negative")


def finding_index(name: str) -> int:
    """The index in :data:`FINDINGS` of a finding named in any case, with spaces or underscores, or by a release's
    spelling (:data:`FINDING_ALIASES`: "Infiltrate", "Pleural Effusion", ...); an unknown name is a SettingsError
    listing the valid ones."""
    key = " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())
    for index, finding in enumerate(FINDINGS):
        if key == finding.replace("_", " ").lower():
            return index
    if key in FINDING_ALIASES:
        return FINDINGS.index(FINDING_ALIASES[key])
    raise SettingsError(f"unknown finding {name!r}; the findings are {', '.join(FINDINGS)} (any case; also "
                        f"{', '.join(a.title() for a in FINDING_ALIASES)})")


@dataclass
class Problems:
    """Named lists of problem items (image names, or 'file:line' for rows), and notes: what a reader left out on
    purpose, reported with the problems but never stopping a run."""

    items: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        self.items.setdefault(kind, []).append(item)

    def note(self, kind: str, item: str) -> None:
        self.notes.setdefault(kind, []).append(item)

    def __bool__(self) -> bool:
        return any(self.items.values())

    def count(self, kind: str | None = None) -> int:
        return sum(len(v) for k, v in self.items.items() if kind is None or k == kind)

    def report(self, first: int = 5, notes: bool = False) -> str:
        lines = []
        for kind, items in [*self.items.items(), *(self.notes.items() if notes else ())]:
            shown = ", ".join(items[:first]) + (f", ... ({len(items) - first} more)" if len(items) > first else "")
            lines.append(f"{len(items)} {kind}: {shown}")
        return "\n".join(lines)

    def merge(self, other: "Problems") -> None:
        for mine, theirs in ((self.items, other.items), (self.notes, other.notes)):
            for kind, items in theirs.items():
                mine.setdefault(kind, []).extend(items)


@dataclass(frozen=True)
class LabelPolicy:
    """What an uncertain label (``-1``) and a blank cell mean (:data:`UNCERTAIN_POLICIES`, :data:`BLANK_POLICIES`)."""

    uncertain: str = "ignore"
    blank: str = "unknown"

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise SettingsError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {self.uncertain!r}")
        if self.blank not in BLANK_POLICIES:
            raise SettingsError(f"blank must be one of {', '.join(BLANK_POLICIES)}, got {self.blank!r}")

    def value(self, cell: str) -> int:
        """A label cell (``1``, ``0``, ``-1``, ``1.0``, ... or blank) as 1, 0 or :data:`UNKNOWN`; ValueError else."""
        cell = cell.strip()
        if not cell:
            return 0 if self.blank == "negative" else UNKNOWN
        try:
            number = float(cell)
        except ValueError:
            raise ValueError(cell) from None
        if number == 1:
            return 1
        if number == 0:
            return 0
        if number == -1:
            return {"ignore": UNKNOWN, "positive": 1, "negative": 0}[self.uncertain]
        raise ValueError(cell)


@dataclass
class Record:
    image: str  # the image's key: ChestX-ray14's "Image Index", VinDr's image_id, a path for CheXpert, ...
    labels: np.ndarray  # [14] int8 in FINDINGS order: 1, 0 or UNKNOWN
    patient: object  # an int or a str, one kind per dataset
    view: str = ""
    follow_up: int = 0
    # the release says the image has no finding at all (also none outside the 14); None: every label known and 0
    no_finding: bool | None = None
    same_as: str = ""  # the image's name in ChestX-ray14 when the release took it from there (RSNA Pneumonia)

    @property
    def healthy(self) -> bool:
        """Free of every finding: as the release says, else by its 14 labels (an unknown label is not a 0)."""
        return self.no_finding if self.no_finding is not None else bool((self.labels == 0).all())


@dataclass
class Box:
    image: str
    finding: int  # index into FINDINGS
    xywh: tuple  # as listed, in the dataset's box space
    reader: str = ""  # who drew it, when the release keeps its readers apart (VinDr-CXR's rad_id)

    @property
    def xywh_release(self) -> tuple:  # the name before other releases were read (ChestX-ray14's release space)
        return self.xywh


def known_labels(labels: np.ndarray) -> np.ndarray:
    """Where ``labels`` are known (not :data:`UNKNOWN`)."""
    return np.asarray(labels) != UNKNOWN


@dataclass
class Dataset:
    """An index of one release's folder (no pixels are read here)."""

    root: Path
    records: list  # [Record], in the release's order, only those with an image file
    paths: dict  # image -> Path
    boxes: list  # [Box] of records kept
    train_val: set  # the official split, when the release has one (else empty)
    test: set
    problems: Problems
    format: str = "chestxray14"
    box_space: str = "release"  # the pixels the release's boxes are written in (see boxes_xyxy)
    # every image was read for boxes, so one without a box of a class has none (VinDr-CXR, RSNA); ChestX-ray14
    # drew boxes on some images only
    boxes_exhaustive: bool = False
    split_lists: bool = False  # the official split is read from {train_val,test}_list.txt (ChestX-ray14's)
    # A release whose images these are, under names that cannot be mapped back here (so a model trained on it may
    # have seen them), and what would map them: e.g. RSNA Pneumonia's are ChestX-ray14's without the mapping file.
    renamed_from: str | None = None
    renamed_note: str | None = None

    @property
    def images(self) -> list:
        return [r.image for r in self.records]

    def labels(self) -> np.ndarray:
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, len(FINDINGS)), np.int8)

    def patients(self) -> np.ndarray:
        return np.array([r.patient for r in self.records])

    def boxes_xyxy(self, image_sizes: dict | None = None, space: str | None = None, names=None) -> dict:
        """Boxes per image as ``(finding, x0, y0, x1, y1)`` rows in the pixel space of the stored image (or of
        ``image_sizes[image] = (width, height)``; the image cache's frame is :meth:`boxes_in_square`), mapped from
        the space the box file uses (default: the release's own, :attr:`box_space`):
        ``"release"``, the 1024 x 1024 images of the ChestX-ray14 release (whatever size the stored PNGs have),
        or ``"image"``, the pixels of the stored image itself (datasets that draw boxes on their own images).
        ``names``: only the boxes of these images."""
        space = space or self.box_space
        if space not in BOX_SPACES:
            raise SettingsError(f"box space must be one of {', '.join(BOX_SPACES)}, got {space!r}")
        wanted = None if names is None else set(names)
        out = {}
        for box in (b for b in self.boxes if wanted is None or b.image in wanted):
            width, height = (image_sizes or {}).get(box.image) or image_size(self.paths[box.image])
            source = (RELEASE_SIZE, RELEASE_SIZE) if space == "release" else image_size(self.paths[box.image])
            sx, sy = width / source[0], height / source[1]
            x, y, w, h = box.xywh
            out.setdefault(box.image, []).append((box.finding, x * sx, y * sy, (x + w) * sx, (y + h) * sy))
        return out

    def boxes_in_square(self, names, size: int, space: str | None = None) -> dict:
        """The boxes of ``names`` (as :meth:`boxes_xyxy`) in the frame of the image cache: each image padded to a
        centred square and resized to ``size`` (:func:`dmfast.data.images.square_geometry`)."""
        own, out = self.boxes_xyxy(None, space, names), {}
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


def read_text(path) -> str:
    """The text of a data file (UTF-8, with or without a byte-order mark; ``.gz`` files decompressed); a byte that
    is not UTF-8 is an error naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8") from None


def csv_table(path, listing: bool = False) -> tuple:
    """(header, [(line number, row)]) of a CSV file; blank rows left out. ``listing``: a file that lists a release's
    images, for which a header alone is an error (not a release whose every box names an image it lacks)."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row")
        rows = []
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num + 1}: not CSV ({error})") from None
    if listing and not rows:
        raise DataError(f"{path}: lists no images (a header only)")
    return [name.strip() for name in header], rows


def csv_header(path) -> list:
    """The column names of a CSV file from its first line alone ([] when it cannot be read: detection only)."""
    try:
        opener = gzip.open if Path(path).suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (OSError, EOFError, csv.Error):
        return []


def columns_of(path, header: list, required, known=None, problems: Problems | None = None) -> dict:
    """Column name -> index of a CSV ``header``: a DataError when a ``required`` one is missing; with ``known``, the
    other columns are problems ("unknown columns", named, in ``problems``)."""
    column = {name: i for i, name in enumerate(header) if name}
    missing = [name for name in required if name not in column]
    if missing:
        raise DataError(f"{path}: header lacks the columns {missing} (got {header})")
    if known is not None and problems is not None:
        for name in header:
            if name and name not in known:
                problems.add("unknown columns", f"{Path(path).name}: {name!r}")
    return column


def cell(row: list, column: dict, name: str, default: str = "") -> str:
    """The stripped cell of column ``name`` (``default`` when the column or the cell is missing)."""
    i = column.get(name)
    return row[i].strip() if i is not None and i < len(row) else default


def image_size(path) -> tuple:
    """(width, height) of an image file from its header (PNG/JPEG, or DICOM's Rows and Columns), without decoding
    the pixels."""
    st = os.stat(path) if Path(path).is_file() else None
    return _image_size(str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)


@functools.lru_cache(maxsize=1 << 16)
def _image_size(path: str, _bytes: int, _mtime: int) -> tuple:  # keyed by the file's size and time: never stale
    import warnings

    from PIL import Image

    from .dicom import is_dicom

    if is_dicom(Path(path)):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception as error:  # pydicom raises many kinds on damaged files
            raise DataError(f"{path}: not a readable DICOM image ({type(error).__name__}: {error})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def box_inside(box: Box, path, space: str) -> bool:
    """Whether ``box`` lies inside its image (within :data:`BOX_SLACK`), in the pixel space the box file uses."""
    width, height = (RELEASE_SIZE, RELEASE_SIZE) if space == "release" else image_size(path)
    x, y, w, h = box.xywh
    return x + w <= width + BOX_SLACK and y + h <= height + BOX_SLACK


def parse_box(cells, corners: bool, where: str, image: str, problems: Problems) -> tuple | None:
    """``(x, y, w, h)`` of a listed box, four cells: ``x, y, w, h`` or (``corners``) ``x0, y0, x1, y1``. None, with
    the problem in ``problems`` (``where`` is file:line), when they are not numbers, not a box, or off the image's
    top or left edge."""
    try:
        a, b, c, d = (float(v) for v in cells)
    except ValueError:
        problems.add("malformed box rows", f"{where} (non-numeric box {list(cells)})")
        return None
    x, y, w, h = (a, b, c - a, d - b) if corners else (a, b, c, d)
    if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
        problems.add("malformed box rows", f"{where} ({image}: box {a, b, c, d})")
        return None
    if x < -BOX_SLACK or y < -BOX_SLACK:
        problems.add("boxes outside the image", f"{where} ({image}: box {a, b, c, d})")
        return None
    return x, y, w, h


def fuse_readers(boxes: list, iou: float = 0.5) -> list:
    """Boxes of several readers fused: per image and finding, boxes that overlap by at least ``iou`` (greedily,
    largest first, each reader at most once per group) become one box, the mean of their corners; a box no other
    reader matched stays as it is. Boxes without a reader pass through."""
    groups, out = {}, []
    for box in boxes:
        if box.reader:
            groups.setdefault((box.image, box.finding), []).append(box)
        else:
            out.append(box)
    for (image, finding), members in groups.items():
        corners = np.array([(x, y, x + w, y + h) for x, y, w, h in (b.xywh for b in members)], np.float64)
        order = np.argsort(-(corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1]), kind="stable")
        left = list(order)
        while left:
            seed, left = left[0], left[1:]
            group, readers = [seed], {members[seed].reader}
            for i in list(left):
                if members[i].reader not in readers and _iou(corners[seed], corners[i]) >= iou:
                    group.append(i)
                    readers.add(members[i].reader)
                    left.remove(i)
            x0, y0, x1, y1 = corners[group].mean(0)
            out.append(Box(image, finding, (x0, y0, x1 - x0, y1 - y0), "+".join(sorted(readers))))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0
