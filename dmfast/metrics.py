"""Evaluation metrics: box localization accuracy (IoU and IoBB, Wang et al., CVPR 2017), average false positives,
and exact ROC AUC. Pure functions over numpy arrays (torch tensors are accepted), vectorised.

Boxes are ``(x0, y0, x1, y1)`` in pixels, inclusive-exclusive (as ``dmfast.ops.cam_boxes`` returns them), so a
box's area is ``(x1 - x0) * (y1 - y0)``.
"""

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _array(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes(x, name: str) -> np.ndarray:
    boxes = _array(x, np.float64).reshape(-1, 4) if np.size(_array(x)) else np.zeros((0, 4))
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(f"{name}: box {bad} {boxes[bad].tolist()} has x1 < x0 or y1 < y0")
    return boxes


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of boxes a[..., 4] and b[..., 4] (broadcast)."""
    width = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    height = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def _area(a: np.ndarray) -> np.ndarray:
    return (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])


def box_overlap(pred, gt, metric: str = "iou") -> np.ndarray:
    """Pairwise overlaps ``[len(pred), len(gt)]``: ``"iou"`` (intersection over union) or ``"iobb"``
    (intersection over the predicted box's area, Wang et al.'s T(IoBB)). Empty boxes overlap nothing."""
    return _overlap(_boxes(pred, "pred")[:, None], _boxes(gt, "gt")[None], metric)


def _overlap(pred: np.ndarray, gt: np.ndarray, metric: str) -> np.ndarray:
    """Overlaps of broadcast box arrays pred[..., 4] and gt[..., 4]."""
    if metric not in ("iou", "iobb"):
        raise ValueError(f"metric must be 'iou' or 'iobb', got {metric!r}")
    inter = _intersection(pred, gt)
    area_p = np.broadcast_to(_area(pred), inter.shape)
    denom = area_p + _area(gt) - inter if metric == "iou" else area_p
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def _group_padded(keys: np.ndarray, boxes: np.ndarray, lookup: np.ndarray):
    """For each key in ``lookup``, the boxes with that key, padded: ``[len(lookup), M, 4]`` and a mask."""
    order = np.argsort(keys, kind="stable")
    keys_sorted, boxes_sorted = keys[order], boxes[order]
    start = np.searchsorted(keys_sorted, lookup, side="left")
    stop = np.searchsorted(keys_sorted, lookup, side="right")
    width = int((stop - start).max(initial=0))
    index = start[:, None] + np.arange(width)[None]
    valid = index < stop[:, None]
    padded = boxes_sorted[np.where(valid, index, 0)] if len(boxes_sorted) else np.zeros((len(lookup), width, 4))
    return padded, valid


@dataclass
class Localization:
    """Per-class localization results at each overlap threshold (rows) and class (columns)."""

    thresholds: tuple
    metric: str
    accuracy: np.ndarray  # [T, C]: fraction of ground-truth boxes found; NaN where a class has no box
    afp: np.ndarray  # [T, C]: false-positive boxes per image with a ground-truth box of the class
    gt_boxes: np.ndarray  # [C]: ground-truth boxes per class
    images: np.ndarray  # [C]: images with a ground-truth box of the class
    best_for_gt: np.ndarray | None = None  # [G]: each ground-truth box's best overlap with its predictions (-1: none)
    best_for_pred: np.ndarray | None = None  # [P]: each prediction's best overlap with its ground truth (-1: none)
    mean_accuracy: np.ndarray = field(init=False)  # [T]: unweighted mean over classes with boxes
    mean_afp: np.ndarray = field(init=False)

    def __post_init__(self):
        with np.errstate(invalid="ignore"):
            has = self.gt_boxes > 0
            self.mean_accuracy = self.accuracy[:, has].mean(1) if has.any() else np.full(len(self.thresholds), np.nan)
            self.mean_afp = self.afp[:, has].mean(1) if has.any() else np.full(len(self.thresholds), np.nan)


def localization(gt_image, gt_class, gt_boxes, pred_image, pred_class, pred_boxes, num_classes: int,
                 thresholds=DEFAULT_THRESHOLDS, metric: str = "iou") -> Localization:
    """Localization accuracy as in Wang et al.: per class, the fraction of ground-truth boxes for which some
    predicted box of that class on that image overlaps it by more than T (strictly: an overlap exactly at T does
    not count). AFP: predicted boxes of a class on an image with ground truth of that class whose overlap with every
    ground-truth box of that class there is at most T, averaged over those images.

    Images may be given as any hashable ids (ints or names); classes as integers in ``[0, num_classes)``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    gt_b, pred_b = _boxes(gt_boxes, "gt_boxes"), _boxes(pred_boxes, "pred_boxes")
    gt_c, pred_c = _array(gt_class, np.int64).reshape(-1), _array(pred_class, np.int64).reshape(-1)
    gt_i, pred_i = _array(gt_image).reshape(-1), _array(pred_image).reshape(-1)
    if not (len(gt_b) == len(gt_c) == len(gt_i)) or not (len(pred_b) == len(pred_c) == len(pred_i)):
        raise ValueError("localization: image, class and box arrays must have the same length "
                         f"(gt {len(gt_i)}/{len(gt_c)}/{len(gt_b)}, pred {len(pred_i)}/{len(pred_c)}/{len(pred_b)})")
    for name, c in (("gt_class", gt_c), ("pred_class", pred_c)):
        if len(c) and (c.min() < 0 or c.max() >= num_classes):
            raise ValueError(f"localization: {name} must lie in [0, {num_classes}), got {c.min()}..{c.max()}")
    _, image_codes = np.unique(np.concatenate([gt_i, pred_i]).astype(str), return_inverse=True)
    gt_key = image_codes[: len(gt_i)] * num_classes + gt_c
    pred_key = image_codes[len(gt_i):] * num_classes + pred_c

    # Best overlap of each ground-truth box with the predictions of its (image, class), and of each prediction
    # with the ground truth of its (image, class).
    candidates, valid = _group_padded(pred_key, pred_b, gt_key)
    best_for_gt = np.where(valid, _overlap(candidates, gt_b[:, None], metric), -1.0).max(1, initial=-1.0)
    truths, valid_t = _group_padded(gt_key, gt_b, pred_key)
    best_for_pred = np.where(valid_t, _overlap(pred_b[:, None], truths, metric), -1.0).max(1, initial=-1.0)
    pred_on_gt_image = valid_t.any(1)

    t = np.asarray(thresholds)[:, None]
    found = best_for_gt[None] > t  # [T, G]
    false_pos = (best_for_pred[None] <= t) & pred_on_gt_image[None]  # [T, P]
    gt_per_class = np.bincount(gt_c, minlength=num_classes)
    images_per_class = np.bincount(np.unique(gt_key) % num_classes, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.stack([np.bincount(gt_c, weights=f, minlength=num_classes) for f in found]) / gt_per_class
        afp = np.stack([np.bincount(pred_c, weights=f, minlength=num_classes) for f in false_pos]) / images_per_class
    return Localization(thresholds, metric, accuracy, afp, gt_per_class, images_per_class, best_for_gt, best_for_pred)


def predictions_from_padded(boxes, counts, image_ids, class_ids):
    """Flatten ``dmfast.ops.cam_boxes`` output ``boxes [N, M, 4]``, ``counts [N]`` (maps of ``image_ids[N]``,
    ``class_ids[N]``) into ``(pred_image, pred_class, pred_boxes)`` for :func:`localization`."""
    boxes, counts = _array(boxes), _array(counts, np.int64).reshape(-1)
    boxes = boxes.reshape(len(counts), -1, 4)
    kept = np.minimum(counts, boxes.shape[1])
    mask = np.arange(boxes.shape[1])[None] < kept[:, None]
    rows = np.nonzero(mask)[0]
    return _array(image_ids).reshape(-1)[rows], _array(class_ids, np.int64).reshape(-1)[rows], boxes[mask]


@dataclass
class AUROC:
    per_class: np.ndarray  # [C]; NaN where a class lacks positives or negatives
    undefined: list  # indices of those classes
    mean: float  # over the defined classes


def roc_auc(labels, scores) -> AUROC:
    """Exact ROC AUC per class (column): the Mann-Whitney statistic with average ranks, so tied scores count
    one half. A label of -1 (unknown: the image's release does not say) leaves that image out of that class.
    Classes without positives or without negatives are reported as undefined (NaN)."""
    y = _array(labels)
    s = _array(scores, np.float64)
    if y.ndim == 1:
        y, s = y[:, None], s[:, None]
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isin(y, (0, 1, -1)).all():
        raise ValueError("roc_auc: labels must be 0, 1 or -1 (unknown)")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores contain NaN or infinite values")
    if (y == -1).any():
        per_class = np.array([roc_auc(y[y[:, c] != -1, c], s[y[:, c] != -1, c]).per_class[0]
                              for c in range(y.shape[1])])
        undefined = np.flatnonzero(np.isnan(per_class))
        defined = np.delete(per_class, undefined)
        return AUROC(per_class, undefined.tolist(), float(defined.mean()) if len(defined) else float("nan"))
    y = y.astype(bool)
    positives, negatives = y.sum(0), (~y).sum(0)
    ranks = rankdata(s, axis=0, method="average") if len(s) else np.zeros_like(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - positives * (positives + 1) / 2) / (positives * negatives)
    undefined = np.flatnonzero((positives == 0) | (negatives == 0))
    auc[undefined] = np.nan
    defined = np.delete(auc, undefined)
    return AUROC(auc, undefined.tolist(), float(defined.mean()) if len(defined) else float("nan"))


def patient_bootstrap(patients, resamples: int, seed: int) -> np.ndarray:
    """Weights ``[resamples, N]`` of the N images with patients ``patients``: in each resample the patients are
    drawn with replacement and every image counts as often as its patient was drawn (images of one patient are
    not independent, so they are resampled together)."""
    _, index = np.unique(_array(patients), return_inverse=True)
    count = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(count, np.full(count, 1 / count), size=resamples) if count else np.zeros((resamples, 0))
    return draws[:, index].astype(np.float64)


def weighted_mean_auroc(labels, scores, weights: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Mean AUROC over the classes defined in each resample, for image weights ``[R, N]`` (a bootstrap's
    multiplicities): the Mann-Whitney statistic with ties counting one half, as :func:`roc_auc` (a label of -1,
    unknown, counts as neither). ``[R]``."""
    y, s = _array(labels), _array(scores, np.float64)
    total = np.zeros((len(weights), y.shape[1]))
    defined = np.zeros_like(total, dtype=bool)
    for c in range(y.shape[1]):
        order = np.argsort(s[:, c], kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(s[order, c]) != 0])  # groups of tied scores
        pos, neg = y[order, c] == 1, y[order, c] == 0
        for r0 in range(0, len(weights), chunk):
            w = weights[r0:r0 + chunk, order]
            wp, wn = w * pos, w * neg
            gp, gn = np.add.reduceat(wp, starts, axis=1), np.add.reduceat(wn, starts, axis=1)
            below = np.cumsum(gn, axis=1) - gn
            denominator = wp.sum(1) * wn.sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                total[r0:r0 + chunk, c] = (gp * (below + 0.5 * gn)).sum(1) / denominator
            defined[r0:r0 + chunk, c] = denominator > 0
    with np.errstate(invalid="ignore"):
        return np.where(defined, total, 0).sum(1) / defined.sum(1)


def weighted_mean_accuracy(found: np.ndarray, gt_class, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean localization accuracy over the classes with boxes in each resample: ``found [T, G]`` (ground-truth box
    found at each threshold), box weights ``[R, G]``. ``[R, T]``."""
    onehot = np.eye(num_classes)[_array(gt_class, np.int64)]  # [G, C]
    boxes = weights @ onehot  # [R, C]
    hit = np.einsum("rg,tg,gc->rtc", weights, found.astype(np.float64), onehot)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without boxes: NaN, left out of intervals
        return np.nanmean(np.where(boxes[:, None] > 0, hit / boxes[:, None], np.nan), axis=2)


def interval(values, level: float = 0.95) -> list:
    """The central ``level`` percentile interval of bootstrap ``values`` (NaNs left out): ``[low, high]``."""
    values = _array(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
