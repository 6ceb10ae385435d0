"""Detections as the rest of the field reads and scores them: one table of boxes (:class:`Boxes`: image, class,
box in the image's own pixels, class probability, score), the COCO JSON files of ground truth and predictions, the
VinBigData and RSNA challenges' submission CSVs, and the detection metrics on them (:func:`score`): COCO
AP@[.5:.95] / AP50 / AP75 (pycocotools, the reference implementation; its vectorised twin in
:mod:`dmfast.metrics` draws the bootstrap resamples and is checked against it on every run), VinBigData's mAP at
IoU 0.4 (PASCAL VOC all-point AP, a hit above 0.4), the RSNA Pneumonia challenge metric and FROC.

Which images are scored for detection (:func:`scored_images`): a release whose every image was read for boxes
(VinDr-CXR, RSNA Pneumonia) contributes all its evaluation images, so a box on a normal X-ray is a false positive;
ChestX-ray14 drew boxes on 880 images only, so there (and in releases laid out like it, the phantom included) the
images with at least one box. Only classes with a ground-truth box among them are scored.
"""

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.dataset import FINDINGS
from .data.vindr import KAGGLE_LOCAL, TO_FINDINGS
from .metrics import (COCO_IOU_THRESHOLDS, FROC_RATES, RSNA_THRESHOLDS, average_precision, box_overlap, froc,
                      froc_score, match_detections, rsna_score)

COCO_MAX_DETECTIONS = 100  # per image and class, as pycocotools' AP
VINBIGDATA_IOU = 0.4  # the VinBigData challenge: PASCAL VOC 2010 mAP at IoU > 0.4
AP50, AP75 = (int(np.argmin(np.abs(np.array(COCO_IOU_THRESHOLDS) - t))) for t in (0.5, 0.75))
DECIMALS = 2  # box corners as written to every file; the metrics score the written values
# dmfast class -> VinBigData class id (Kaggle's 14 local findings; 14 is "No finding"); Nodule and Mass are both 8
VINBIGDATA_CLASS = {FINDINGS.index(f): KAGGLE_LOCAL.index(v) for v, fs in TO_FINDINGS.items() if v in KAGGLE_LOCAL
                    for f in fs}
VINBIGDATA_NO_FINDING = "14 1 0 0 1 1"
RSNA_CLASS = FINDINGS.index("Pneumonia")


@dataclass
class Boxes:
    """A table of boxes: ``image`` (names), ``cls`` (indices into FINDINGS), ``boxes [P, 4]`` (x0, y0, x1, y1),
    ``probability`` (the class probability on the image) and ``score`` (the box's confidence); ground truth has
    no probability and score 1."""

    image: np.ndarray
    cls: np.ndarray
    boxes: np.ndarray
    probability: np.ndarray
    score: np.ndarray

    @classmethod
    def of(cls, image=(), classes=(), boxes=(), probability=None, score=None) -> "Boxes":
        image = np.array(list(image), dtype=object)
        ones = np.ones(len(image))
        return cls(image, np.asarray(classes, np.int64).reshape(-1), np.asarray(boxes, np.float64).reshape(-1, 4),
                   ones if probability is None else np.asarray(probability, np.float64).reshape(-1),
                   ones if score is None else np.asarray(score, np.float64).reshape(-1))

    @classmethod
    def concat(cls, parts: list) -> "Boxes":
        return cls.of() if not parts else cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in
                                                ("image", "cls", "boxes", "probability", "score")))

    def __len__(self) -> int:
        return len(self.image)

    def take(self, keep) -> "Boxes":
        return Boxes(self.image[keep], self.cls[keep], self.boxes[keep], self.probability[keep], self.score[keep])

    def on(self, images, classes=None) -> "Boxes":
        """The boxes on ``images`` (of ``classes``, when given)."""
        keep = np.isin(self.image.astype(str), np.array(list(images), dtype=str))
        if classes is not None:
            keep &= np.isin(self.cls, list(classes))
        return self.take(keep)

    def to_image_pixels(self, geometry: dict) -> "Boxes":
        """From the pixels of a padded square into each image's own: ``geometry[image] = (scale, pad_x, pad_y,
        width, height)`` (a square point (x, y) is (x * scale - pad_x, y * scale - pad_y) there), clipped to the
        image and rounded to :data:`DECIMALS` as every file writes them."""
        if not len(self):
            return self
        g = np.array([geometry[n] for n in self.image], dtype=np.float64).reshape(-1, 5)
        boxes = self.boxes * g[:, :1] - np.tile(g[:, 1:3], 2)
        boxes = np.clip(boxes, 0, np.tile(g[:, 3:5], 2))
        return Boxes(self.image, self.cls, np.round(boxes, DECIMALS), self.probability, self.score)


def scored_images(dataset, names: list) -> list:
    """The images of ``names`` scored for detection (see the module): all of them for a release that read every
    image for boxes, else those with a box."""
    if getattr(dataset, "boxes_exhaustive", False):
        return list(names)
    boxed = {b.image for b in dataset.boxes}
    return [n for n in names if n in boxed]


def ground_truth(dataset, images: list, space: str | None = None) -> Boxes:
    """The boxes of ``images`` in each image's own pixels, rounded as written."""
    own = dataset.boxes_xyxy(None, space, images)
    rows = [(n, int(b[0]), b[1:]) for n in images for b in own.get(n, ())]
    return Boxes.of([r[0] for r in rows], [r[1] for r in rows], np.round(np.array([r[2] for r in rows]), DECIMALS))


# --- COCO JSON -----------------------------------------------------------------------------------------------------

def _categories() -> list:
    return [{"id": c + 1, "name": name, "supercategory": "finding"} for c, name in enumerate(FINDINGS)]


def _xywh(box) -> list:
    x0, y0, x1, y1 = (round(float(v), DECIMALS) for v in box)
    return [x0, y0, round(x1 - x0, DECIMALS), round(y1 - y0, DECIMALS)]


def coco_images(images: list, sizes: dict, files: dict | None = None) -> list:
    """COCO ``images`` entries, ids 1.. in the order of ``images``; ``sizes[image] = (width, height)``."""
    return [{"id": k + 1, "file_name": str((files or {}).get(n, n)), "width": int(sizes[n][0]),
             "height": int(sizes[n][1]), "dmfast_image": n} for k, n in enumerate(images)]


def coco_ground_truth(truth: Boxes, images: list, sizes: dict, files: dict | None = None, info: dict | None = None):
    """The COCO detection dataset of ``truth`` on ``images`` (those without a box included: a box predicted there
    is a false positive), readable by pycocotools and dataset viewers."""
    ids = {n: k + 1 for k, n in enumerate(images)}
    annotations = [{"id": k + 1, "image_id": ids[n], "category_id": int(c) + 1, "bbox": _xywh(b),
                    "area": round((b[2] - b[0]) * (b[3] - b[1]), 4), "iscrowd": 0}
                   for k, (n, c, b) in enumerate(zip(truth.image, truth.cls, truth.boxes))]
    return {"info": info or {}, "images": coco_images(images, sizes, files), "categories": _categories(),
            "annotations": annotations}


def coco_results(detections: Boxes, images: list) -> list:
    """COCO results (pycocotools' ``loadRes`` list) of ``detections``, image ids as in :func:`coco_ground_truth`."""
    ids = {n: k + 1 for k, n in enumerate(images)}
    return [{"image_id": ids[n], "category_id": int(c) + 1, "bbox": _xywh(b), "score": float(s),
             "probability": float(p)}
            for n, c, b, s, p in zip(detections.image, detections.cls, detections.boxes, detections.score,
                                     detections.probability)]


def coco_predictions(images, detections, info: dict | None = None) -> dict:
    """Predictions as a COCO dataset whose annotations carry ``score`` (dmfast predict: there is no ground-truth
    file to name the images), for viewers; ``annotations`` is also a valid pycocotools results list. ``images``:
    ``(file name, width, height)`` of each image, ids 1.. in that order; ``detections``: ``(image position, class,
    box x0 y0 x1 y1, score, probability)``. Both are consumed once and the dataset's lists are generators, for
    :func:`dmfast.io.atomic_write_json_streamed` (dmfast predict never holds every box of a release)."""
    def annotation(k: int, position: int, c: int, box, score: float, probability: float) -> dict:
        bbox = _xywh(box)
        return {"image_id": position + 1, "category_id": int(c) + 1, "bbox": bbox, "score": float(score),
                "probability": float(probability), "id": k + 1, "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0}

    return {"info": info or {},
            "images": ({"id": k + 1, "file_name": str(name), "width": int(width), "height": int(height),
                        "dmfast_image": str(name)} for k, (name, width, height) in enumerate(images)),
            "categories": _categories(),
            "annotations": (annotation(k, *d) for k, d in enumerate(detections))}


def pycocotools_ap(ground: dict, results: list) -> dict:
    """COCO AP@[.5:.95], AP50 and AP75 over the categories with ground truth, and per class AP@[.5:.95] (NaN
    without ground truth), computed by pycocotools itself on the dicts as written."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    per_class = np.full(len(FINDINGS), np.nan)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = ground
        gt.createIndex()
        if not results:  # loadRes refuses an empty list: nothing detected finds nothing
            has = {a["category_id"] - 1 for a in ground["annotations"]}
            per_class[list(has)] = 0.0
            return {"AP": 0.0 if has else float("nan"), "AP50": 0.0 if has else float("nan"),
                    "AP75": 0.0 if has else float("nan"), "per_class": per_class}
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area "all", 100 detections

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    for k, category in enumerate(evaluation.params.catIds):
        per_class[category - 1] = mean(precision[:, :, k])
    thresholds = list(np.round(evaluation.params.iouThrs, 2))
    return {"AP": mean(precision), "AP50": mean(precision[thresholds.index(0.5)]),
            "AP75": mean(precision[thresholds.index(0.75)]), "per_class": per_class}


# --- the challenges' submission files ------------------------------------------------------------------------------

def vindr_submission(rows: list) -> list:
    """VinBigData's ``image_id,PredictionString`` rows from ``rows = [(image_id, [(class, score, box), ...])]``
    (dmfast classes, boxes in the image's pixels): ``class conf x_min y_min x_max y_max ...`` in VinBigData's class
    ids (Nodule and Mass are both its Nodule/Mass; classes it does not have are left out), ``14 1 0 0 1 1`` (no
    finding) for an image with none. Where two dmfast classes become one of its classes, a box overlapping a
    higher-scored box of the other class by IoU > 0.4 is left out: the challenge would count it as a duplicate."""
    out = []
    for image_id, found in rows:
        kept = []
        for c, score, box in sorted((f for f in found if f[0] in VINBIGDATA_CLASS), key=lambda f: -f[1]):
            same = [k[2] for k in kept if VINBIGDATA_CLASS[k[0]] == VINBIGDATA_CLASS[c] and k[0] != c]
            if not same or box_overlap([box], same).max() <= VINBIGDATA_IOU:
                kept.append((c, score, box))
        parts = [f"{VINBIGDATA_CLASS[c]} {score:.6f} " + " ".join(f"{round(v):d}" for v in box)
                 for c, score, box in kept]
        out.append([image_id, " ".join(parts) if parts else VINBIGDATA_NO_FINDING])
    return out


def rsna_submission(rows: list) -> list:
    """RSNA Pneumonia's ``patientId,PredictionString`` rows: ``conf x y width height ...`` of the Pneumonia boxes
    (empty for an image with none)."""
    out = []
    for image_id, found in rows:
        parts = [f"{score:.6f} {round(box[0]):d} {round(box[1]):d} {round(box[2] - box[0]):d} "
                 f"{round(box[3] - box[1]):d}" for c, score, box in found if c == RSNA_CLASS]
        out.append([image_id, " ".join(parts)])
    return out


SUBMISSION_HEADERS = {"vindr": ["image_id", "PredictionString"], "rsna": ["patientId", "PredictionString"]}
SUBMISSION_ROWS = {"vindr": vindr_submission, "rsna": rsna_submission}


def submission_id(path) -> str:
    """The id a challenge knows an image by: its file name without the suffix (VinDr's image_id, RSNA's
    patientId)."""
    name = Path(path).name
    for suffix in (".dicom", ".dcm", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# --- the metrics ---------------------------------------------------------------------------------------------------

METRICS = ("coco_ap", "coco_ap50", "coco_ap75", "map40", "rsna", "froc")
METRIC_NAMES = {"coco_ap": "COCO AP", "coco_ap50": "AP50", "coco_ap75": "AP75", "map40": "mAP@0.4 (VinBigData)",
                "rsna": "RSNA", "froc": "FROC"}


@dataclass
class Task:
    """What one detection evaluation scores: the images (weights of a bootstrap are given over them, in order), the
    ground truth on them and the classes with ground truth."""

    images: list
    truth: Boxes
    classes: list  # scored classes: those with a ground-truth box on the images
    min_probability: float  # the operating point: the RSNA metric scores the boxes of classes reaching it
    froc_iou: float

    @classmethod
    def of(cls, images: list, truth: Boxes, min_probability: float, froc_iou: float) -> "Task":
        return cls(list(images), truth, sorted({int(c) for c in truth.cls}), min_probability, froc_iou)

    def score(self, detections: Boxes, weights: np.ndarray | None = None) -> dict:
        """Every metric of :data:`METRICS` for ``detections`` on the task's images and classes: ``[R]`` arrays for
        image weights ``[R, images]`` (one row of ones when None), plus per class AP and the FROC curve of the
        unweighted (first) row. A class set mean is over :attr:`classes` in every row."""
        detections = detections.on(self.images, self.classes)
        truth, k = self.truth, len(FINDINGS)
        common = (truth.image, truth.cls, truth.boxes, detections.image, detections.cls, detections.boxes,
                  detections.score)
        coco = match_detections(*common, COCO_IOU_THRESHOLDS, rule="coco", max_per_image=COCO_MAX_DETECTIONS,
                                images=self.images)
        voc = match_detections(*common, (VINBIGDATA_IOU,), rule="voc", images=self.images)
        hits = match_detections(*common, (self.froc_iou,), rule="coco", images=self.images)
        ap = average_precision(coco, k, weights, "coco")[..., self.classes]  # [R, T, K]
        map40 = average_precision(voc, k, weights, "voc")[:, 0, self.classes]
        sensitivity = froc(hits, len(self.images), FROC_RATES, weights)
        reported = detections.take(detections.probability >= self.min_probability)
        rsna = np.mean([rsna_score(truth.image[truth.cls == c], truth.boxes[truth.cls == c],
                                   reported.image[reported.cls == c], reported.boxes[reported.cls == c],
                                   reported.score[reported.cls == c], self.images, RSNA_THRESHOLDS, weights)
                        for c in self.classes], axis=0) if self.classes else np.full(len(sensitivity), np.nan)
        return {"coco_ap": ap.mean((1, 2)), "coco_ap50": ap[:, AP50].mean(1), "coco_ap75": ap[:, AP75].mean(1),
                "map40": map40.mean(1), "rsna": rsna, "froc": froc_score(sensitivity),
                "per_class_ap": ap[0].mean(0), "per_class_ap50": ap[0, AP50], "per_class_map40": map40[0],
                "froc_curve": sensitivity[0]}
