"""The scores of ``dmfast eval``: each method's probabilities, CAM boxes and the paper's localization accuracy
(:func:`evaluate_checkpoint`, :func:`mask_only` for a set of masks alone), and the patient-bootstrap intervals of
every mean (:func:`uncertainty`)."""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console

from .. import checkpoints
from ..config import CAM_METHODS, EvalConfig
from ..data.cache import ImageCache
from ..data.dataset import FINDINGS, image_size
from ..data.images import square_geometry
from ..detection import FROC_RATES, METRICS, Boxes, Task
from ..inference import Classifier, scored_boxes
from ..io import finite, progress
from ..metrics import (REPORTED_THRESHOLDS, class_preserving_bootstrap, interval, localization, predictions_from_padded,
                      roc_auc, weighted_mean_accuracy, weighted_mean_auroc)


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
        levels = [t for t in REPORTED_THRESHOLDS if t in iou.thresholds]
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
                         "difference": {k: {"point": point_estimate(m, k) - point_estimate(methods[0], k),
                                            "interval": interval(v - first[k])}
                                        for k, v in mine.items() if v is not None and first.get(k) is not None}}


def point_estimate(method: Method, key: str) -> float:
    if key == "mean_auroc":
        return method.mean_auroc
    if key in METRICS:
        return float(method.detection[key][0])
    iou = method.localization["iou"]
    return float(iou.mean_accuracy[list(iou.thresholds).index(float(key.split("@")[1]))])


def check_against_pycocotools(method: Method, console: Console) -> None:
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


def chosen_for_overlays(truth: GroundTruth, per_class: int) -> set:
    chosen = set()
    for c in range(len(FINDINGS)):
        chosen.update((n, c) for n in sorted({n for n, k in zip(truth.image, truth.cls) if k == c})[:per_class])
    return chosen


def geometry(dataset, names: list, frame: int) -> dict:
    """Where each image lies in the ``frame``-px cache square: ``(scale, pad_x, pad_y, width, height)`` as
    :meth:`detection.Boxes.to_image_pixels` takes it."""
    out = {}
    for name in names:
        width, height = image_size(dataset.paths[name])
        _, _, scale, pad_x, pad_y = square_geometry(width, height, frame)
        out[name] = (scale, pad_x, pad_y, width, height)
    return out


def score_methods(config: EvalConfig, classifiers: list, caches: dict, dataset, test_names: list, labels: np.ndarray,
                  detected: frozenset, console: Console) -> tuple:
    """Every row of the tables: each classifier with each CAM method (:func:`evaluate_checkpoint`), the mask-only
    baseline of each one's masks and of each ``--masks`` file (:func:`mask_only`); with each row's boxes in image
    pixels (``detections``) and those reaching the box floor on the ``detected`` images (``scored``). Returns the
    methods, the overlay images kept per method and the ground truth at the first classifier's size."""
    methods, kept_by_method, truth_at = [], {}, {}
    keep = None
    for (name, classifier), cam_method in ((c, m) for c in classifiers for m in config.cam_methods):
        name = name if cam_method == CAM_METHODS[0] else f"{name} {cam_method}"  # a row per kind of map
        cache = caches[classifier.config.size]
        if cache.size not in truth_at:
            truth_at[cache.size] = GroundTruth(dataset, test_names, cache.size)
        truth = truth_at[cache.size]
        keep = chosen_for_overlays(truth, config.overlays) if keep is None else keep
        method, kept = evaluate_checkpoint(name, classifier, cache, test_names, labels, truth, config, keep, console,
                                           detected, cam_method)
        methods.append(method)
        kept_by_method[name] = kept
        if classifier.masks is not None and cam_method == config.cam_methods[0]:
            methods.append(mask_only(f"{name} mask only", classifier.masks.cpu(), truth, config, method.probabilities,
                                     test_names, detected))
    truth = truth_at[classifiers[0][1].config.size]
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
    return methods, kept_by_method, truth
