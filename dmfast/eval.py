"""``dmfast eval``: classification and weakly supervised localization of one or more trained classifiers on the
chosen images of a dataset (:func:`select_images`: by default the checkpoint's test split on its own training
data, else the data's ``test_list.txt``; evaluation images that share a name or patient with the training images
are reported, or refused with ``strict``), side by side (the paper's Tables 1, 2 and 4), with a mask-only baseline
for every set of disease masks.

Classification: AUROC of the 14 classes and their mean over the test images. Localization, on the test images with
ground-truth boxes, for each (image, class) box pair: the class's CAM (in the image's own frame: CAMs of a model
trained on aligned images are warped back with the inverse alignment) becomes boxes through the fused ``cam_boxes``
(min-max normalised, upsampled to the image, thresholded at ``box_thresholds``; 0.5 by default, Wang et al.'s
two-level 60/255 and 180/255 with ``wang``), and a ground-truth box counts as found when a predicted box of its
class overlaps it by more than T, for T(IoU) and T(IoBB) in 0.1..0.7. AFP, the false-positive boxes per image,
stands next to every accuracy, since more boxes can only raise accuracy.

The mask-only baseline scores the boxes of a disease mask alone: the same boxes for every image of a class. A pure
location prior does well at low IoU on ChestX-ray14 (cardiomegaly almost always), so the tables show what the
image-specific CAM adds beyond it.

Detection, as the rest of the field scores it (:mod:`dmfast.detection`): boxes of every class reaching the box
floor on every image, each with a confidence that ranks it (``box_score``), scored by COCO AP (pycocotools),
VinBigData's mAP@0.4, the RSNA metric and FROC, written as ``boxes.csv`` and COCO JSON. Every mean carries a
patient-bootstrap interval over the estimate's own class set, and a paired difference to the first method.
"""

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

import dmfast

from . import checkpoints
from .config import CAM_METHODS, EvalConfig, box_levels
from .data.cache import CacheSet, ImageCache, open_or_prepare, report_left_out
from .data.dataset import FINDINGS, DataError, fuse_readers, image_size, read_text
from .data import rsna
from .data.formats import detect_format, open_data, open_dataset
from .data.images import square_geometry
from .detection import (DECIMALS, FROC_RATES, METRIC_NAMES, METRICS, Boxes, Task, coco_ground_truth, coco_results,
                        ground_truth, pycocotools_ap, scored_images)
from .figures import TRUTH, WHITE, draw, grid, heat_overlay
from .inference import Classifier, scored_boxes
from .io import (atomic_write_bytes, atomic_write_json, atomic_write_csv, check_outputs, clear_outputs, finite,
                 print_table, progress, save_png, writing)
from .metrics import (class_preserving_bootstrap, interval, localization, predictions_from_padded, roc_auc,
                      weighted_mean_accuracy, weighted_mean_auroc)

REPORTED = (0.3, 0.5, 0.7)  # the paper's T(IoU) columns


@dataclass
class Method:
    """One row of the tables: a checkpoint, or the mask-only baseline of a set of masks."""

    name: str
    kind: str  # "checkpoint" or "mask-only"
    source: str
    localization: dict  # metric -> metrics.Localization
    auroc: np.ndarray | None = None
    mean_auroc: float | None = None
    seconds: float | None = None
    images: int = 0
    probabilities: np.ndarray | None = None  # [images, C] of the scored images, in order
    predicted: Boxes = field(default_factory=Boxes.of)  # every box, in pixels of the `frame`-px cache images
    frame: int = 0
    detections: Boxes = field(default_factory=Boxes.of)  # every box in its image's own pixels, as written
    scored: Boxes = field(default_factory=Boxes.of)  # those the detection metrics score (floor, detection images)
    detection: dict | None = None  # the detection metrics' point estimates (detection.Task.score)
    uncertainty: dict | None = None  # bootstrap intervals and paired differences (see uncertainty())

    def summary(self) -> dict:
        out = {"kind": self.kind, "source": self.source}
        if self.auroc is not None:
            out["auroc"] = dict(zip(FINDINGS, self.auroc.tolist()))
            out["mean_auroc"] = float(self.mean_auroc)
            out["seconds"], out["images"] = self.seconds, self.images
            out["images_per_second"] = self.images / self.seconds if self.seconds else None
        if self.uncertainty is not None:
            out["uncertainty"] = self.uncertainty
        if self.detection is not None:
            d = self.detection
            out["detection"] = {**{k: float(d[k][0]) for k in METRICS},
                                "ap_per_class": _by_class(d["per_class_ap"], d["classes"]),
                                "ap50_per_class": _by_class(d["per_class_ap50"], d["classes"]),
                                "map40_per_class": _by_class(d["per_class_map40"], d["classes"]),
                                "froc_curve": dict(zip(map(str, FROC_RATES), d["froc_curve"].tolist())),
                                "pycocotools": d["pycocotools"]}
        for metric, result in self.localization.items():
            out[metric] = {"thresholds": list(result.thresholds),
                           "accuracy": dict(zip(FINDINGS, result.accuracy.T.tolist())),
                           "afp": dict(zip(FINDINGS, result.afp.T.tolist())),
                           "mean_accuracy": result.mean_accuracy.tolist(), "mean_afp": result.mean_afp.tolist()}
        return finite(out)  # NaN (nothing to score) becomes None, in memory as in eval.json


def _by_class(values, classes) -> dict:
    return {FINDINGS[c]: float(v) for c, v in zip(classes, values)}


class GroundTruth:
    """The test images with boxes and their (image, class) pairs, boxes in the pixels of ``size``-px images."""

    def __init__(self, dataset, test_names: list, size: int, space: str | None = None):
        boxes = dataset.boxes_in_square(test_names, size, space)
        self.images = [n for n in test_names if n in boxes]
        rows = [(n, int(b[0]), b[1:]) for n in self.images for b in boxes[n]]
        self.image = np.array([r[0] for r in rows], dtype=object)
        self.cls = np.array([r[1] for r in rows], dtype=np.int64)
        self.boxes = np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4)
        self.pairs = {}  # image -> its classes with boxes, sorted
        for image, cls, _ in rows:
            self.pairs.setdefault(image, set()).add(cls)
        self.pairs = {n: sorted(self.pairs[n]) for n in self.images}
        self.size = size
        self.dataset = dataset
        self.regions = {}  # image -> the image inside the padding, as needed

    def clip(self, predicted: Boxes) -> Boxes:
        """Predicted boxes cut to their image inside the padded square (as predict reports them); boxes wholly in
        the padding are dropped."""
        if not len(predicted):
            return predicted
        for n in predicted.image:
            if n not in self.regions:
                self.regions[n] = self.dataset.image_in_square(n, self.size)
        region = np.array([self.regions[n] for n in predicted.image], dtype=np.float64)
        boxes = predicted.boxes
        boxes = np.concatenate([np.maximum(boxes[:, :2], region[:, :2]), np.minimum(boxes[:, 2:], region[:, 2:])], 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Boxes(predicted.image, predicted.cls, boxes, predicted.probability, predicted.score).take(keep)

    def score(self, predicted: Boxes, thresholds) -> dict:
        """The paper's accuracy and AFP (:func:`dmfast.metrics.localization`): only the boxes of the (image,
        class) pairs with ground truth count."""
        return {metric: localization(self.image, self.cls, self.boxes, predicted.image, predicted.cls,
                                     predicted.boxes, len(FINDINGS), thresholds, metric) for metric in ("iou", "iobb")}


def _chosen_for_overlays(truth: GroundTruth, per_class: int) -> set:
    chosen = set()
    for c in range(len(FINDINGS)):
        chosen.update((n, c) for n in sorted({n for n, k in zip(truth.image, truth.cls) if k == c})[:per_class])
    return chosen


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
            raise FileNotFoundError(f"--images {path}: no such file")
        wanted = [line.strip() for line in read_text(path).splitlines() if line.strip() and
                  not line.strip().startswith("#")]
        missing = [n for n in wanted if n not in present]
        if missing:
            raise ValueError(f"--images {path}: {len(missing)} names are not images of {config.data}, e.g. "
                             f"{', '.join(missing[:3])}")
        wanted = list(dict.fromkeys(wanted))
        if not wanted:
            raise ValueError(f"--images {path}: no image names in it")
        return Selection(wanted, f"the {len(wanted)} names of {path}", own)
    if config.split is None and own:
        names = [n for n in first.splits.test if n in present]
        if not names:
            raise ValueError(f"{config.data}: the checkpoint's test split is empty or none of its images is here; "
                             "choose --split or --images")
        return Selection(names, "the checkpoint's test split", own)
    split = config.split or "test"
    if split not in ("test", "train_val", "all"):
        raise ValueError(f"--split must be test, train_val or all, got {split!r}")
    if split == "all":
        return Selection(dataset.images, f"all {len(dataset.images)} images of {config.data}", own)
    listed = dataset.test if split == "test" else dataset.train_val
    lists = dataset.format == "chestxray14"  # other releases split by folder or file, not by lists
    if not listed:
        raise ValueError(f"{config.data}: " + (f"no {split}_list.txt (or it is empty)" if lists else
                         f"the {dataset.format} release has no official {split} images") +
                         ": choose --split all or --images FILE")
    names = [n for n in dataset.images if n in listed]
    if not names:
        raise ValueError(f"{config.data}: none of the images in {split}_list.txt is present")
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
    rsna_unmapped = dataset.format == "rsna" and not rsna.mapped(dataset)
    for i, folder in enumerate(classifier.config.mix):
        prefix = CacheSet.key(i, "")
        if Path(folder).resolve() == here:
            mixed = {n[len(prefix):] for n in classifier.splits.train if n.startswith(prefix)}
            trained |= mixed
            patients = (patients or set()) | {key(r.patient) for r in dataset.records if r.image in mixed}
        if rsna_unmapped:  # did ChestX-ray14 images (perhaps these) go into training?
            try:
                formats.add(detect_format(folder))
            except DataError:
                formats.add(None)
    if rsna_unmapped and formats & {"chestxray14", None}:
        patients, why = None, ("RSNA Pneumonia's images are ChestX-ray14 images under new names; put the challenge's "
                               f"{rsna.MAPPING} into {dataset.root} to tell which")
    patient_of = {r.image: r.patient for r in dataset.records}
    same_as = {r.image: r.same_as for r in dataset.records}
    return {"names": sum(n in trained or same_as[n] in trained for n in names),
            "patients": None if patients is None else sum(key(patient_of[n]) in patients for n in names),
            "unknown_because": why if patients is None else None}


def evaluate_checkpoint(name: str, classifier: Classifier, cache: ImageCache, test_names: list, labels: np.ndarray,
                        truth: GroundTruth, config: EvalConfig, keep: set, console: Console,
                        detected: frozenset = frozenset(), cam_method: str = CAM_METHODS[0]) -> tuple:
    """One pass over the test images: probabilities for AUROC, CAM boxes of every class reaching the box floor on
    the images ``detected`` (those scored for detection) and of every ground-truth class, whatever its probability,
    for the paper's accuracy. Returns the :class:`Method` and the maps/boxes of the (image, class) pairs in
    ``keep``."""
    started = time.perf_counter()
    scores, parts, kept = [], [], {}
    with progress(f"eval {name}", console) as bar:
        task = bar.add_task("eval", total=len(test_names))
        for start in range(0, len(test_names), config.batch):
            names = test_names[start:start + config.batch]
            prediction = classifier(cache.batch(names), cam_method)
            probabilities = prediction.probabilities.cpu()
            scores.append(probabilities)
            wanted = probabilities >= config.box_floor
            rows = [(b, n, c) for b, n in enumerate(names) for c in range(len(FINDINGS))
                    if (wanted[b, c] and n in detected) or c in truth.pairs.get(n, ())]
            if rows:
                c_index = torch.tensor([r[2] for r in rows])
                maps, boxes, box_scores, counts = prediction.boxes([r[0] for r in rows], c_index.tolist(), cache.size,
                                                                   config.box_thresholds, config.max_boxes,
                                                                   [f"{classifier.path}: {r[1]}" for r in rows],
                                                                   config.box_score)
                parts.append(_flatten(boxes, box_scores, counts, [r[1] for r in rows], c_index.numpy(),
                                      probabilities[[r[0] for r in rows], c_index].double().numpy()))
                for i, (_, n, c) in enumerate(rows):
                    if (n, c) in keep:
                        shown = int(min(counts[i].item(), config.max_boxes))
                        kept[(n, c)] = (maps[i].cpu(), boxes[i, :shown].cpu().numpy())
            bar.update(task, advance=len(names))
    seconds = time.perf_counter() - started
    probabilities = torch.cat(scores).numpy()
    auroc = roc_auc(labels, probabilities)
    predicted = truth.clip(Boxes.concat(parts))
    result = truth.score(predicted, config.overlap_thresholds)
    method = Method(name, "checkpoint", str(classifier.path), result, auroc.per_class, auroc.mean, seconds,
                    len(test_names), probabilities, predicted, cache.size)
    return method, kept


def _flatten(boxes, scores, counts, images: list, classes, probabilities) -> Boxes:
    """The boxes of ``ops.cam_boxes``-style padded output (maps of ``images[i]``, ``classes[i]``, class probability
    ``probabilities[i]``) as a :class:`Boxes` table."""
    pred_image, pred_class, pred_boxes = predictions_from_padded(boxes, counts, np.array(images, dtype=object),
                                                                 classes)
    shown = np.arange(boxes.shape[-2])[None] < np.minimum(np.asarray(counts), boxes.shape[-2])[:, None]
    return Boxes.of(pred_image, pred_class, pred_boxes, np.repeat(probabilities, shown.sum(1)),
                    np.asarray(scores)[shown])


def mask_only(name: str, masks: torch.Tensor, truth: GroundTruth, config: EvalConfig,
              probabilities: np.ndarray | None = None, test_names: list | None = None,
              detected: frozenset = frozenset()) -> Method:
    """The baseline of a set of masks ``[C, h, w]``: each class's mask boxes, predicted for every image of it. With
    the ``probabilities [images, C]`` of a classifier on ``test_names``, also on every image of ``detected`` where
    the class reaches the box floor, scored as that classifier's boxes (probability times the mask's region term):
    the location prior at the same image-level evidence."""
    boxes, region_scores, counts = scored_boxes(masks.float(), truth.size, config.box_thresholds, config.max_boxes,
                                                config.box_score)
    pairs = {n: set(c) for n, c in truth.pairs.items()}
    p_of = {}
    if probabilities is not None:
        for i, n in enumerate(test_names):
            p_of[n] = probabilities[i]
            if n in detected:
                pairs.setdefault(n, set()).update(np.flatnonzero(probabilities[i] >= config.box_floor).tolist())
    rows = [(n, c) for n in pairs for c in sorted(pairs[n])]
    if not rows:
        return Method(name, "mask-only", "", truth.score(Boxes.of(), config.overlap_thresholds), frame=truth.size)
    index = torch.tensor([c for _, c in rows])
    p = np.array([p_of[n][c] if n in p_of else 1.0 for n, c in rows])
    predicted = _flatten(boxes[index], region_scores[index].numpy() * p[:, None], counts[index], [n for n, _ in rows],
                         index.numpy(), p)
    predicted = truth.clip(predicted)
    return Method(name, "mask-only", "", truth.score(predicted, config.overlap_thresholds), predicted=predicted,
                  frame=truth.size)


def _cell(accuracy, afp) -> str:
    return "-" if not np.isfinite(accuracy) else f"{accuracy:.2f} ({afp:.2f})"


def tables(methods: list, truth: GroundTruth, test_images: int) -> list:
    """(title, header, rows) of every results table, shared by the console and the Markdown file."""
    out = []
    checkpoints = [m for m in methods if m.auroc is not None]
    rows = [[c] + [f"{m.auroc[i]:.3f}" if np.isfinite(m.auroc[i]) else "-" for m in checkpoints]
            for i, c in enumerate(FINDINGS)]
    rows.append(["Mean"] + [f"{m.mean_auroc:.3f}" for m in checkpoints])
    out.append((f"Classification AUROC ({test_images} test images)", ["class"] + [m.name for m in checkpoints], rows))
    for metric, label in (("iou", "T(IoU)"), ("iobb", "T(IoBB)")):
        thresholds = methods[0].localization[metric].thresholds
        rows = [[m.name] + [_cell(a, f) for a, f in zip(m.localization[metric].mean_accuracy,
                                                         m.localization[metric].mean_afp)] for m in methods]
        out.append((f"Mean localization accuracy (AFP) at {label}, {len(truth.boxes)} boxes on {len(truth.images)} "
                    "test images", ["method"] + [f"{t:g}" for t in thresholds], rows))
    has = np.bincount(truth.cls, minlength=len(FINDINGS)) > 0
    thresholds = list(methods[0].localization["iou"].thresholds)
    for t in REPORTED:
        if t not in thresholds:
            continue
        k = thresholds.index(t)
        rows = [[f"{c} ({int((truth.cls == i).sum())})"] + [_cell(m.localization["iou"].accuracy[k, i],
                                                                  m.localization["iou"].afp[k, i]) for m in methods]
                for i, c in enumerate(FINDINGS) if has[i]]
        rows.append(["Mean"] + [_cell(m.localization["iou"].mean_accuracy[k], m.localization["iou"].mean_afp[k])
                                for m in methods])
        out.append((f"Localization accuracy (AFP) per class at T(IoU) = {t:g}", ["class (boxes)"] +
                    [m.name for m in methods], rows))
    rows = [[m.name, str(m.images), f"{m.seconds:.1f}", f"{m.images / m.seconds:.1f}"] for m in checkpoints]
    out.append(("Evaluation throughput (whole pass: load, align, classify, CAM boxes)",
                ["checkpoint", "images", "seconds", "images/s"], rows))
    return out


def markdown(tables_: list) -> str:
    lines = [f"# dmfast eval\n\ndmfast {dmfast.__version__}, torch {torch.__version__}\n"]
    for title, header, rows in tables_:
        lines += [f"## {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def overlay_figures(out: Path, kept_by_method: dict, truth: GroundTruth, cache: ImageCache, tile: int = 256,
                    thresholds=()) -> list:
    """Per class: rows of images, one column per checkpoint; the X-ray with the CAM as heat (min-max per tile),
    ground-truth boxes magenta, predicted boxes white (the paper's Fig. 6), each tile captioned with the method,
    the image and the box ``thresholds``."""
    at = f" (boxes at {', '.join(f'{t:g}' for t in thresholds)})" if len(thresholds) else ""
    paths = []
    names = list(kept_by_method)
    pairs = sorted({p for kept in kept_by_method.values() for p in kept}, key=lambda p: (p[1], p[0]))
    scale = tile / cache.size
    for c, finding in enumerate(FINDINGS):
        mine = [p for p in pairs if p[1] == c]
        if not mine:
            continue
        tiles = []
        for image, _ in mine:
            gray = F.interpolate(cache.batch([image]).float()[None, 0] / 255, size=(tile, tile), mode="bilinear",
                                 align_corners=False, antialias=True)[0, 0]
            gt = [b * scale for b in truth.boxes[(truth.image == image) & (truth.cls == c)]]
            for method in names:
                heat, boxes = kept_by_method[method].get((image, c), (None, np.zeros((0, 4))))
                # colours the heat map never takes, each with a black halo: visible on every heat colour
                picture = draw(heat_overlay(gray, heat), gt, TRUTH, halo=True)
                tiles.append(draw(picture, [b * scale for b in boxes], WHITE, text=f"{method}: {image}{at}",
                                  halo=True))
        paths.append(save_png(out / "overlays" / f"{finding}.png", grid(tiles, columns=len(names))))
    return paths


def geometry(dataset, names: list, frame: int) -> dict:
    """Where each image lies in the ``frame``-px cache square: ``(scale, pad_x, pad_y, width, height)`` as
    :meth:`detection.Boxes.to_image_pixels` takes it."""
    out = {}
    for name in names:
        width, height = image_size(dataset.paths[name])
        _, _, scale, pad_x, pad_y = square_geometry(width, height, frame)
        out[name] = (scale, pad_x, pad_y, width, height)
    return out


def per_image_files(out: Path, methods: list, test_names: list, labels: np.ndarray, detected: list) -> tuple:
    """``predictions.csv`` (image, method, the 14 probabilities and the 14 labels) and ``boxes.csv``: every box of
    every method (image, class, method, box in the image's own pixels, class probability, score, best IoU and IoBB
    with a ground-truth box of the class on the image, empty where it has none), best score first per image: the
    boxes of every class at the box floor on the ``detected`` images (those scored for detection), and those of
    every ground-truth (image, class) pair; a detected image where no class reached the floor gets one row without
    a box. The tables can be recomputed from them without the model."""
    rows = ([image, m.name, *(f"{p:.9g}" for p in m.probabilities[i]), *map(int, labels[i])]
            for m in methods if m.probabilities is not None for i, image in enumerate(test_names))
    predictions = atomic_write_csv(out / "predictions.csv",
                                   ["image", "method", *FINDINGS, *(f"{c} label" for c in FINDINGS)], rows)
    position = {n: i for i, n in enumerate(test_names)}

    def box_rows(m: Method):  # a row at a time: a release's boxes never sit in memory as text
        d = m.detections
        overlaps = [m.localization[metric].best_for_pred for metric in ("iou", "iobb")]
        order = np.lexsort((-np.asarray(d.score, dtype=np.float64), [position[n] for n in d.image]))
        for k in order:
            yield [d.image[k], FINDINGS[d.cls[k]], m.name, *(f"{v:.{DECIMALS}f}" for v in d.boxes[k]),
                   f"{d.probability[k]:.6g}", f"{d.score[k]:.6g}",
                   *("" if v[k] < 0 else f"{v[k]:.4f}" for v in overlaps)]
        if m.probabilities is not None:
            boxed = set(d.image)
            yield from ([n, "", m.name, "", "", "", "", "", "", "", ""] for n in detected if n not in boxed)
    boxes_file = atomic_write_csv(out / "boxes.csv", ["image", "class", "method", "x0", "y0", "x1", "y1",
                                                      "probability", "score", "best_iou", "best_iobb"],
                                  (row for m in methods for row in box_rows(m)))
    return predictions, boxes_file


def coco_files(out: Path, methods: list, task: Task, dataset) -> dict:
    """``coco/ground_truth.json`` (the detection images with their boxes) and ``coco/<method>.json`` (each
    method's boxes there, as pycocotools' results), with pycocotools' AP of each into ``method.detection``."""
    sizes = {n: image_size(dataset.paths[n]) for n in task.images}
    files = {n: dataset.paths[n].relative_to(dataset.root) if dataset.paths[n].is_relative_to(dataset.root)
             else dataset.paths[n] for n in task.images}
    ground = coco_ground_truth(task.truth, task.images, sizes, files,
                               {"description": f"dmfast eval ground truth of {dataset.root}",
                                "version": dmfast.__version__})
    written = {"ground_truth": atomic_write_json(out / "coco" / "ground_truth.json", ground, indent=None)}
    for m in methods:
        results = coco_results(m.scored, task.images)
        written[m.name] = atomic_write_json(out / "coco" / f"{_file_name(m.name)}.json", results, indent=None)
        m.detection["pycocotools"] = {k: v for k, v in pycocotools_ap(ground, results).items() if k != "per_class"}
    return written


def _file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def detection_tables(methods: list, task: Task) -> list:
    """(title, header, rows) of the detection metrics per method, and of AP50 / mAP@0.4 per class."""
    header = ["method", *(METRIC_NAMES[k] for k in METRICS), *(f"S@{r:g}" for r in FROC_RATES)]
    rows = [[m.name, *(f"{m.detection[k][0]:.3f}" for k in METRICS), *(f"{v:.2f}" for v in m.detection["froc_curve"])]
            for m in methods]
    boxes = np.bincount(task.truth.cls, minlength=len(FINDINGS))
    per_class = [[f"{FINDINGS[c]} ({boxes[c]})", *(f"{m.detection['per_class_ap50'][k]:.3f} / "
                                                     f"{m.detection['per_class_map40'][k]:.3f}" for m in methods)]
                 for k, c in enumerate(task.classes)]
    return [(f"Detection on {len(task.images)} images, {len(task.truth)} boxes: COCO AP@[.5:.95], AP50, AP75, "
             f"VinBigData mAP@0.4, RSNA (boxes of p >= {task.min_probability:g}), FROC mean and sensitivity at 1/8..8 "
             f"false positives per image (IoU >= {task.froc_iou:g})", header, rows),
            ("AP50 / mAP@0.4 per class", ["class (boxes)", *(m.name for m in methods)], per_class)]


def uncertainty(methods: list, truth: GroundTruth, task: Task | None, test_names: list, labels: np.ndarray,
                patient_of: dict, resamples: int, seed: int) -> None:
    """95% patient-bootstrap intervals of each method's mean AUROC, mean accuracy at each reported T(IoU) and
    detection metrics, and of its difference from the first method on the same resamples (paired), into
    ``method.uncertainty``. A resample in which a class of an estimate's class set has no box (or no positive or
    negative) is drawn again
    (:func:`dmfast.metrics.class_preserving_bootstrap`), so every mean is over the classes of the estimate in every
    resample."""
    patients = np.array([patient_of[n] for n in test_names])
    column = {n: i for i, n in enumerate(test_names)}
    box_columns = [column[n] for n in truth.image]
    sets = [(box_columns, truth.cls)]
    if task is not None:
        det_columns = [column[n] for n in task.images]
        sets.append(([column[n] for n in task.truth.image], task.truth.cls))
    drawn, stratified = class_preserving_bootstrap(patients, labels, sets, resamples, seed)
    weights = drawn.weights
    box_weights = weights[:, box_columns]
    draws = {}
    for m in methods:
        iou = m.localization["iou"]
        levels = [t for t in REPORTED if t in iou.thresholds]
        found = iou.best_for_gt[None] > np.array(levels)[:, None]
        accuracy = weighted_mean_accuracy(found, truth.cls, box_weights, len(FINDINGS))
        draws[m.name] = {"mean_auroc": weighted_mean_auroc(labels, m.probabilities, weights)
                         if m.probabilities is not None else None,
                         **{f"iou_accuracy@{t:g}": accuracy[:, k] for k, t in enumerate(levels)}}
        if task is not None and m.detection is not None:
            scored = task.score(m.scored, weights[:, det_columns])
            draws[m.name].update({k: scored[k] for k in METRICS})
    first = draws[methods[0].name]
    for m in methods:
        mine = draws[m.name]
        m.uncertainty = {"resamples": resamples, "seed": seed, "stratified": stratified,
                         "redrawn": int((drawn.redrawn > 0).sum()), "incomplete": int(drawn.failed.sum()),
                         "intervals": {k: interval(v) for k, v in mine.items() if v is not None},
                         "versus": methods[0].name,
                         "difference": {k: {"point": _point(m, k) - _point(methods[0], k),
                                            "interval": interval(v - first[k])}
                                        for k, v in mine.items() if v is not None and first.get(k) is not None}}


def _point(method: Method, key: str) -> float:
    if key == "mean_auroc":
        return method.mean_auroc
    if key in METRICS:
        return float(method.detection[key][0])
    iou = method.localization["iou"]
    return float(iou.mean_accuracy[list(iou.thresholds).index(float(key.split("@")[1]))])


def interval_tables(methods: list) -> list:
    """(title, header, rows) of the intervals and of the paired differences from the first method."""
    keys = list(dict.fromkeys(k for m in methods for k in m.uncertainty["intervals"]))
    header = ["method"] + [METRIC_NAMES.get(k) or k.replace("iou_accuracy@", "accuracy T(IoU) ").replace(
        "mean_auroc", "mean AUROC") for k in keys]
    resamples = methods[0].uncertainty["resamples"]

    def cell(point, bounds, sign=""):
        return "-" if point is None or not np.isfinite(point) else \
            f"{point:{sign}.3f} [{bounds[0]:{sign}.3f}, {bounds[1]:{sign}.3f}]"

    rows = [[m.name] + [cell(_point(m, k), m.uncertainty["intervals"][k]) if k in m.uncertainty["intervals"]
                        else "-" for k in keys] for m in methods]
    diffs = [[m.name] + [cell(d["point"], d["interval"], "+") if (d := m.uncertainty["difference"].get(k)) else "-"
                         for k in keys] for m in methods[1:]]
    return [(f"Point estimates with 95% intervals ({resamples} patient bootstrap resamples)", header, rows)] + \
        ([(f"Difference from {methods[0].name} with its paired 95% interval (same resamples)", header, diffs)]
         if diffs else [])


OUTPUTS = ("eval.json", "eval.md", "predictions.csv", "boxes.csv", "coco", "overlays")


def run(config: EvalConfig, console: Console | None = None) -> dict:
    """Evaluate every checkpoint; print the tables, write ``eval.json``, ``eval.md`` and overlay figures."""
    with writing(config.out, "dmfast eval"):
        return _run(config, console)


def _run(config: EvalConfig, console: Console | None) -> dict:
    console = console or Console(stderr=True)
    if not config.checkpoints:
        raise ValueError("dmfast eval needs at least one --checkpoint")
    names = [name for name, _ in [*config.checkpoints, *config.masks]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"method names given twice: {', '.join(twice)} (name each --checkpoint/--masks NAME=PATH)")
    levels = box_levels(config.box_thresholds, config.max_boxes)
    out = Path(config.out)
    earlier = check_outputs(out, OUTPUTS, "dmfast eval", config.overwrite)
    classifiers = [(name, Classifier(path, precision=config.precision, compile=config.compile))
                   for name, path in config.checkpoints]
    dataset = open_data(config, lists=config.split != "all" and not config.images, box_space=config.box_space,
                        check_boxes=True)
    if config.fuse_readers:
        dataset.boxes = fuse_readers(dataset.boxes)
    report_left_out(dataset, console)
    label_of = {r.image: r.labels for r in dataset.records}
    caches = {}
    for _, classifier in classifiers:
        size = classifier.config.size
        if size not in caches:
            caches[size] = open_or_prepare(config.data, config.cache, size, config.skip_problems, console,
                                           config.format)
    first = classifiers[0][1]
    selection = select_images(config, dataset, first)
    test_names = [n for n in selection.names if n in caches[first.config.size]]
    if selection.own:
        for name, classifier in classifiers[1:]:
            if set(classifier.splits.test) != set(first.splits.test):
                console.print(f"[yellow]{name} was trained with a different test split; all are scored on the test "
                              f"split of {classifiers[0][0]}")
    if not test_names:
        raise ValueError(f"{config.data}: none of the {len(selection.names)} images of {selection.what} is in the "
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
                raise ValueError(f"{message}: scores on training images are not test scores (choose other images "
                                 "with --split or --images, or pass --allow-overlap to score them anyway)")
            if not known and config.strict:
                raise ValueError(f"{message} (--strict)")
            console.print(f"[yellow]warning: {message}")
    labels = np.stack([label_of[n] for n in test_names])

    clear_outputs(out, earlier)
    detection_images = scored_images(dataset, test_names)
    detected = frozenset(detection_images)
    methods, kept_by_method, truth_at = [], {}, {}
    keep = None
    for (name, classifier), cam_method in ((c, m) for c in classifiers for m in config.cam_methods):
        name = name if cam_method == CAM_METHODS[0] else f"{name} {cam_method}"  # a row per kind of map
        cache = caches[classifier.config.size]
        if cache.size not in truth_at:
            truth_at[cache.size] = GroundTruth(dataset, test_names, cache.size)
        truth = truth_at[cache.size]
        keep = _chosen_for_overlays(truth, config.overlays) if keep is None else keep
        method, kept = evaluate_checkpoint(name, classifier, cache, test_names, labels, truth, config, keep, console,
                                           detected, cam_method)
        methods.append(method)
        kept_by_method[name] = kept
        if classifier.masks is not None and cam_method == config.cam_methods[0]:
            methods.append(mask_only(f"{name} mask only", classifier.masks.cpu(), truth, config, method.probabilities,
                                     test_names, detected))
    truth = truth_at[first.config.size]
    for name, path in config.masks:
        masks = checkpoints.load(path, checkpoints.MASKS)["masks"]
        methods.append(mask_only(f"{name} mask only", masks, truth, config, methods[0].probabilities, test_names,
                                 detected))
    if not len(truth.images):
        console.print("[yellow]no test image has a ground-truth box: localization is not scored")

    frames = {m.frame: geometry(dataset, test_names, m.frame) for m in methods}
    for m in methods:  # the boxes of ground-truth pairs below the floor count for the paper's accuracy only
        m.detections = m.predicted.to_image_pixels(frames[m.frame])
        m.scored = m.detections.take(m.detections.probability >= config.box_floor).on(detected)
    task = Task.of(detection_images, ground_truth(dataset, detection_images, config.box_space),
                   config.min_probability, config.froc_iou) if detection_images else None
    task = task if task is not None and task.classes else None
    results = tables(methods, truth, len(test_names))
    coco = {}
    if task is not None:
        for m in methods:
            m.detection = {**task.score(m.scored), "classes": task.classes}
        coco = coco_files(out, methods, task, dataset)
        for m in methods:
            _check_against_pycocotools(m, console)
        results += detection_tables(methods, task)
    if config.bootstrap > 0:
        patient_of = {r.image: r.patient for r in dataset.records}
        uncertainty(methods, truth, task, test_names, labels, patient_of, config.bootstrap, config.seed)
        results += interval_tables(methods)
    for title, header, rows in results:
        print_table(console, title, header, rows)
    figures = overlay_figures(out, kept_by_method, truth, caches[first.config.size], thresholds=levels) \
        if config.overlays > 0 and len(truth.images) else []
    report = {"config": {**asdict(config), "box_thresholds": list(levels)}, "test_images": len(test_names),
              "selection": {"what": selection.what, "images": len(test_names), "overlap": selection.overlap},
              "box_images": len(truth.images), "gt_boxes": len(truth.boxes),
              "detection": None if task is None else {
                  "images": len(task.images), "gt_boxes": len(task.truth), "min_probability": task.min_probability,
                  "froc_iou": task.froc_iou, "classes": [FINDINGS[c] for c in task.classes],
                  "coco_files": {k: str(v) for k, v in coco.items()}},
              "methods": {m.name: m.summary() for m in methods}, "overlays": [str(p) for p in figures],
              "versions": {"dmfast": dmfast.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "numpy": np.__version__,
                           "pycocotools": _version("pycocotools")}}
    per_image_files(out, methods, test_names, labels, detection_images)
    atomic_write_json(out / "eval.json", report)
    atomic_write_bytes(out / "eval.md", markdown(results).encode())
    console.print(f"results {out / 'eval.json'}, {out / 'eval.md'}, per image {out / 'predictions.csv'}, "
                  f"{out / 'boxes.csv'}" + (f", COCO files in {out / 'coco'}" if coco else "") +
                  (f"; overlays in {out / 'overlays'}" if figures else ""))
    return report


def _check_against_pycocotools(method: Method, console: Console) -> None:
    """dmfast's COCO AP (whose twin draws the bootstrap) must be pycocotools' on the same files; where it is not,
    pycocotools' is reported and ``pycocotools["replaced"]`` names it."""
    reference = method.detection["pycocotools"]
    reference["replaced"] = []
    for key, name in (("coco_ap", "AP"), ("coco_ap50", "AP50"), ("coco_ap75", "AP75")):
        mine, theirs = float(method.detection[key][0]), reference[name]
        if not (np.isclose(mine, theirs, rtol=0, atol=1e-9) or (np.isnan(mine) and np.isnan(theirs))):
            console.print(f"[red]{method.name}: dmfast's {name} {mine:.6f} differs from pycocotools' {theirs:.6f} "
                          "(please report); pycocotools' is reported")
            method.detection[key] = np.concatenate([[theirs], method.detection[key][1:]])
            reference["replaced"].append(name)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
