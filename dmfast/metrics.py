"""Evaluation metrics: box localization accuracy (IoU and IoBB, Wang et al., CVPR 2017), average false positives,
and exact ROC AUC. Pure functions over numpy arrays (torch tensors are accepted), vectorised.

Boxes are ``(x0, y0, x1, y1)`` in pixels, inclusive-exclusive (as ``dmfast.ops.cam_boxes`` returns them), so a
box's area is ``(x1 - x0) * (y1 - y0)``.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from .errors import SettingsError

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
REPORTED_THRESHOLDS = (0.3, 0.5, 0.7)  # the paper's T(IoU) columns (eval's tables, the demo's ablation)


def _array(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes(x, name: str) -> np.ndarray:
    boxes = _array(x, np.float64).reshape(-1, 4) if np.size(_array(x)) else np.zeros((0, 4))
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise SettingsError(f"{name}: box {bad} {boxes[bad].tolist()} has x1 < x0 or y1 < y0")
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
        raise SettingsError(f"metric must be 'iou' or 'iobb', got {metric!r}")
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
        raise SettingsError("localization: image, class and box arrays must have the same length "
                            f"(gt {len(gt_i)}/{len(gt_c)}/{len(gt_b)}, pred {len(pred_i)}/{len(pred_c)}/{len(pred_b)})")
    for name, c in (("gt_class", gt_c), ("pred_class", pred_c)):
        if len(c) and (c.min() < 0 or c.max() >= num_classes):
            raise SettingsError(f"localization: {name} must lie in [0, {num_classes}), got {c.min()}..{c.max()}")
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
        raise SettingsError(f"roc_auc: labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isin(y, (0, 1, -1)).all():
        raise SettingsError("roc_auc: labels must be 0, 1 or -1 (unknown)")
    if not np.isfinite(s).all():
        raise SettingsError("roc_auc: scores contain NaN or infinite values")
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
    """Mean AUROC for image weights ``[R, N]`` (a bootstrap's multiplicities) over the classes the unweighted data
    defines (those :func:`roc_auc` averages), so every resample measures the statistic of the estimate; NaN for a
    resample in which one of them lacks positives or negatives. The Mann-Whitney statistic with ties counting one
    half, as :func:`roc_auc` (a label of -1, unknown, counts as neither). ``[R]``."""
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
    classes = ((y == 1).any(0) & (y == 0).any(0)) if len(y) else np.zeros(y.shape[1], dtype=bool)
    if not classes.any():
        return np.full(len(weights), np.nan)
    mean = total[:, classes].mean(1)
    return np.where(defined[:, classes].all(1), mean, np.nan)


def weighted_mean_accuracy(found: np.ndarray, gt_class, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean localization accuracy over the classes with boxes in the unweighted data (those
    :class:`Localization` averages), for box weights ``[R, G]``: ``found [T, G]`` (ground-truth box found at each
    threshold). NaN for a resample in which one of those classes keeps no box. ``[R, T]``."""
    gt_class = _array(gt_class, np.int64)
    onehot = np.eye(num_classes)[gt_class]  # [G, C]
    classes = np.bincount(gt_class, minlength=num_classes) > 0
    boxes = (weights @ onehot)[:, classes]  # [R, K]
    hit = np.einsum("rg,tg,gc->rtc", weights, found.astype(np.float64), onehot[:, classes])
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (hit / boxes[:, None]).mean(2) if classes.any() else np.full(hit.shape[:2], np.nan)
    return np.where((boxes > 0).all(1)[:, None], accuracy, np.nan)


def interval(values, level: float = 0.95) -> list:
    """The central ``level`` percentile interval of bootstrap ``values`` (NaNs left out): ``[low, high]``."""
    values = _array(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


# ---------------------------------------------------------------------------------------------------------------------
# Detection metrics: scored boxes greedily matched to ground truth (COCO, PASCAL VOC and RSNA rules), average
# precision, FROC, the RSNA Pneumonia Detection Challenge score, and a stratified patient bootstrap for their
# intervals. Bootstrap resamples enter as image weights (multiplicities), so one matching serves every resample.
# ---------------------------------------------------------------------------------------------------------------------

MATCH_RULES = ("coco", "voc", "strict")
# pycocotools' IoU thresholds and recall points, computed with its own expressions so that the floats are identical.
COCO_IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist())
COCO_RECALLS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
# RSNA's 0.4:0.05:0.75, rounded: np.arange gives 0.6499999999999999, which an IoU of exactly 0.65 would exceed.
RSNA_THRESHOLDS = tuple(np.round(np.arange(0.4, 0.751, 0.05), 2).tolist())
FROC_RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)
_CHUNK_ELEMENTS = 1 << 20  # bound on resamples x thresholds x detections held at once


def _image_codes(ids: np.ndarray, images=None):
    """Integer codes of image ids (any hashable, compared as strings as in :func:`localization`) and the ids by
    code. Without ``images`` the codes follow the sorted strings; with it, that list's order (so images without
    boxes get a code too), and an id missing from it is an error."""
    keys = ids.astype(str)
    if images is None:
        _, first, codes = np.unique(keys, return_index=True, return_inverse=True)
        return codes.reshape(-1).astype(np.int64), ids[first]
    images = _array(images).reshape(-1)
    names = images.astype(str)
    order = np.argsort(names, kind="stable")
    ranked = names[order]
    twice = ranked[1:][ranked[1:] == ranked[:-1]]
    if len(twice):
        raise SettingsError(f"images: id {twice[0]!r} is listed more than once")
    if not len(ranked):
        if len(keys):
            raise SettingsError(f"image id {ids[0]!r} is not in images (which is empty)")
        return np.zeros(0, np.int64), images
    position = np.minimum(np.searchsorted(ranked, keys), len(ranked) - 1)
    missing = ranked[position] != keys
    if missing.any():
        raise SettingsError(f"image id {ids[np.flatnonzero(missing)[0]]!r} is not in images")
    return order[position].astype(np.int64), images


def _image_weights(weights, num_images: int, name: str) -> np.ndarray:
    """Resample weights ``[R, num_images]`` (one row of ones when None); a 1-D vector is one resample."""
    if weights is None:
        return np.ones((1, num_images))
    w = _array(weights, np.float64)
    w = w[None] if w.ndim == 1 else w
    if w.ndim != 2 or w.shape[1] != num_images:
        raise SettingsError(f"{name}: weights must be [resamples, {num_images}] (one column per image code), "
                            f"got {list(w.shape)}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise SettingsError(f"{name}: weights must be finite and non-negative")
    return w


def _count_below(values: np.ndarray, thresholds: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """For rows ``values [..., D]`` sorted ascending and ascending ``thresholds [K]``: how many values of each row
    lie below each threshold (at or below when ``inclusive``), ``[..., K]``. That is ``np.searchsorted(row,
    thresholds, "left")`` (``"right"`` when inclusive) for every row at once, with the same float comparisons."""
    flat = values.reshape(-1, values.shape[-1])
    k = len(thresholds)
    first = np.searchsorted(thresholds, flat, side="left" if inclusive else "right")  # thresholds it lies below
    offset = np.arange(len(flat))[:, None] * (k + 1)
    counts = np.bincount((offset + first).reshape(-1), minlength=len(flat) * (k + 1)).reshape(len(flat), k + 1)
    return np.cumsum(counts, axis=1)[:, :k].reshape(values.shape[:-1] + (k,))


def _chunk(resamples: int, per_resample: int, chunk: int) -> int:
    return max(1, min(chunk, _CHUNK_ELEMENTS // max(per_resample, 1), resamples))


@dataclass
class Matches:
    """Detections greedily matched to ground-truth boxes at each IoU threshold (:func:`match_detections`).
    Per-detection and per-box arrays keep the input order."""

    thresholds: tuple
    tp: np.ndarray  # [T, P] bool: the detection matched a ground-truth box at threshold t
    kept: np.ndarray  # [P] bool: among the max_per_image best of its (image, class); the others are neither TP nor FP
    gt_matched: np.ndarray  # [T, G] bool: the ground-truth box was matched at threshold t
    pred_image_index: np.ndarray  # [P] image codes: indices into `images`
    gt_image_index: np.ndarray  # [G]
    pred_class: np.ndarray  # [P]
    gt_class: np.ndarray  # [G]
    pred_scores: np.ndarray  # [P]
    images: np.ndarray  # [I]: the image ids, by code
    rule: str = "coco"

    @property
    def fp(self) -> np.ndarray:
        """[T, P] bool: kept and unmatched."""
        return self.kept[None] & ~self.tp


def match_detections(gt_image, gt_class, gt_boxes, pred_image, pred_class, pred_boxes, pred_scores, thresholds,
                     rule: str = "coco", max_per_image: int | None = None, images=None) -> Matches:
    """Greedy matching per (image, class): detections in descending score (ties keep input order) each take at most
    one ground-truth box of their image and class, and a box is taken at most once, at every IoU threshold.

    - ``"coco"``: as pycocotools' ``COCOeval.evaluateImg`` (iscrowd 0, area range "all"): a detection takes the
      still-free box with the highest IoU, if that IoU is >= t (t capped at 1 - 1e-10 as pycocotools does, so a
      perfect match counts at t = 1); of boxes tied in IoU, the later in input order (pycocotools' loop keeps the
      last maximum).
    - ``"voc"``: PASCAL VOC: a detection looks only at the box with the highest IoU (the first of ties, as
      ``np.argmax``); it is a TP if that IoU is > t and the box is free, else FP (a duplicate).
    - ``"strict"``: as ``"coco"`` but IoU > t (the RSNA challenge's hit rule), t not capped.

    ``max_per_image`` keeps the best detections per (image, class) (pycocotools' maxDets); the rest count as
    neither TP nor FP. Images are any hashable ids (compared as strings); ``images`` optionally lists all evaluated
    images, fixing the codes (its order) so that images without boxes or detections have one too.

    The loop runs over detection ranks within their (image, class), each step vectorised over all groups and
    thresholds (one detection per group per step, so steps never compete for a box)."""
    if rule not in MATCH_RULES:
        raise SettingsError(f"match_detections: rule must be one of {MATCH_RULES}, got {rule!r}")
    if max_per_image is not None and int(max_per_image) < 1:
        raise SettingsError(f"match_detections: max_per_image must be at least 1 or None, got {max_per_image}")
    thresholds = tuple(float(t) for t in np.atleast_1d(_array(thresholds, np.float64)).reshape(-1))
    gt_b, pred_b = _boxes(gt_boxes, "gt_boxes"), _boxes(pred_boxes, "pred_boxes")
    gt_c, pred_c = _array(gt_class, np.int64).reshape(-1), _array(pred_class, np.int64).reshape(-1)
    gt_i, pred_i = _array(gt_image).reshape(-1), _array(pred_image).reshape(-1)
    scores = _array(pred_scores, np.float64).reshape(-1)
    if not (len(gt_b) == len(gt_c) == len(gt_i)) or not (len(pred_b) == len(pred_c) == len(pred_i) == len(scores)):
        raise SettingsError("match_detections: image, class and box (and score) arrays must have the same length (gt "
                            f"{len(gt_i)}/{len(gt_c)}/{len(gt_b)}, pred {len(pred_i)}/{len(pred_c)}/{len(pred_b)}/"
                            f"{len(scores)})")
    if not np.isfinite(scores).all():
        raise SettingsError("match_detections: pred_scores contain NaN or infinite values")
    num_gt, num_pred = len(gt_b), len(pred_b)
    codes, image_ids = _image_codes(np.concatenate([gt_i.astype(object), pred_i.astype(object)]), images)
    class_values, class_codes = np.unique(np.concatenate([gt_c, pred_c]), return_inverse=True)
    key = codes * max(len(class_values), 1) + class_codes.reshape(-1)  # the (image, class) group
    gt_key, pred_key = key[:num_gt], key[num_gt:]

    # Rank of each detection within its group by descending score, ties in input order.
    order = np.argsort(-scores, kind="stable")
    order = order[np.argsort(pred_key[order], kind="stable")]
    rank = np.empty(num_pred, np.int64)
    rank[order] = np.arange(num_pred) - np.searchsorted(pred_key[order], pred_key[order], side="left")
    kept = rank < max_per_image if max_per_image is not None else np.ones(num_pred, bool)

    # Each detection's candidate boxes (those of its group, in input order), padded: [P, M].
    gt_order = np.argsort(gt_key, kind="stable")
    start = np.searchsorted(gt_key[gt_order], pred_key, side="left")
    stop = np.searchsorted(gt_key[gt_order], pred_key, side="right")
    width = int((stop - start).max(initial=0))
    slot = start[:, None] + np.arange(width)[None]
    valid = slot < stop[:, None]
    candidate = gt_order[np.where(valid, slot, 0)]
    overlap = np.where(valid, _overlap(pred_b[:, None], gt_b[candidate], "iou"), -np.inf)

    limit = np.asarray(thresholds)
    if rule == "coco":
        limit = np.minimum(limit, 1 - 1e-10)
    tp = np.zeros((len(limit), num_pred), bool)
    taken = np.zeros((len(limit), num_gt), bool)
    active = np.flatnonzero(kept & valid.any(1))
    active = active[np.argsort(rank[active], kind="stable")]
    bounds = np.searchsorted(rank[active], np.arange(int(rank[active].max(initial=-1)) + 2))
    for step in range(len(bounds) - 1):
        idx = active[bounds[step]:bounds[step + 1]]
        if not len(idx):
            continue
        iou, boxes, rows = overlap[idx], candidate[idx], np.arange(len(idx))
        if rule == "voc":
            best = np.argmax(iou, axis=1)  # the box it looks at, taken or not
            box = np.broadcast_to(boxes[rows, best], (len(limit), len(idx)))
            hit = (iou[rows, best][None] > limit[:, None]) & ~taken[np.arange(len(limit))[:, None], box]
        else:
            enough = iou[None] >= limit[:, None, None] if rule == "coco" else iou[None] > limit[:, None, None]
            free = np.where(enough & valid[idx][None] & ~taken[:, boxes], iou[None], -np.inf)  # [T, n, M]
            best = width - 1 - np.argmax(free[..., ::-1], axis=2)  # the last of tied maxima
            hit = np.take_along_axis(free, best[..., None], axis=2)[..., 0] > -np.inf
            box = boxes[rows[None], best]
        tp[:, idx] = hit
        taken[np.nonzero(hit)[0], box[hit]] = True
    return Matches(thresholds, tp, kept, taken, codes[num_gt:], codes[:num_gt], pred_c, gt_c, scores, image_ids, rule)


def average_precision(matches: Matches, num_classes: int, weights=None, interpolation: str = "coco",
                      chunk: int = 64) -> np.ndarray:
    """Average precision ``[R, T, C]`` per resample (rows of ``weights [R, I]``, image weights by code: bootstrap
    multiplicities; None is one row of ones), IoU threshold and class, over all images. NaN where a class has no
    (weighted) ground-truth box.

    Per class, the kept detections are ordered by descending score, ties by image code and then input order:
    pycocotools' ``accumulate`` (a stable sort by score of the detections listed image by image in sorted image id
    order), so with unit weights and the image codes in pycocotools' image order (``images=sorted ids``) the result
    equals pycocotools' per-class AP. Every detection adds its image's weight to the cumulative TP or FP count; the
    number of ground-truth boxes is their weighted count.

    - ``"coco"``: pycocotools' 101-point interpolation: precision ``tp / (tp + fp + eps)`` made monotone from the
      right, read at the first point whose recall reaches each of 0, 0.01, ..., 1 (0 past the last recall reached).
    - ``"voc"``: PASCAL VOC 2010+ all-point AP, the area under the monotone precision envelope.

    An integer weight equals duplicating the image when scores do not tie across images (with ties the order of
    the tied detections, and so the interpolated precision, can differ)."""
    if interpolation not in ("coco", "voc"):
        raise SettingsError(f"average_precision: interpolation must be 'coco' or 'voc', got {interpolation!r}")
    num_images = len(matches.images)
    w = _image_weights(weights, num_images, "average_precision")
    for name, c in (("gt_class", matches.gt_class), ("pred_class", matches.pred_class)):
        if len(c) and (c.min() < 0 or c.max() >= num_classes):
            raise SettingsError(f"average_precision: {name} must lie in [0, {num_classes}), got {c.min()}..{c.max()}")
    num_thresholds = len(matches.thresholds)
    boxes = np.zeros((num_images, num_classes))
    np.add.at(boxes, (matches.gt_image_index, matches.gt_class), 1)
    gt_count = w @ boxes  # [R, C]

    image, score, cls = matches.pred_image_index, matches.pred_scores, matches.pred_class
    order = np.flatnonzero(matches.kept)
    order = order[np.argsort(image[order], kind="stable")]
    order = order[np.argsort(-score[order], kind="stable")]
    order = order[np.argsort(cls[order], kind="stable")]
    bounds = np.searchsorted(cls[order], np.arange(num_classes + 1))
    out = np.full((len(w), num_thresholds, num_classes), np.nan)
    for c in range(num_classes):
        det = order[bounds[c]:bounds[c + 1]]
        hit = matches.tp[:, det][None]  # [1, T, D]
        step = _chunk(len(w), num_thresholds * len(det), chunk)
        for r0 in range(0, len(w), step):
            n = gt_count[r0:r0 + step, c][:, None]  # [r, 1]
            if not len(det):
                out[r0:r0 + step, :, c] = np.where(n > 0, 0.0, np.nan)
                continue
            wd = w[r0:r0 + step][:, image[det]]  # [r, D]
            tps = np.cumsum(wd[:, None] * hit, axis=2)  # [r, T, D]
            # TP + FP: every kept detection is one or the other (exactly pycocotools' fp + tp for integer weights)
            total = np.cumsum(wd, axis=1)[:, None]
            recall = tps / np.where(n > 0, n, 1.0)[..., None]
            if interpolation == "coco":
                precision = tps / (total + np.spacing(1))
            else:
                precision = tps / np.maximum(total, np.finfo(np.float64).eps)
            envelope = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]
            if interpolation == "coco":
                at = np.stack([np.searchsorted(row, COCO_RECALLS, side="left")  # first point reaching each recall
                               for row in recall.reshape(-1, len(det))]).reshape(recall.shape[:2] + (-1,))
                read = np.take_along_axis(envelope, np.minimum(at, len(det) - 1), axis=2)
                ap = np.where(at < len(det), read, 0.0).mean(2)
            else:
                ap = (np.diff(recall, axis=2, prepend=0.0) * envelope).sum(2)
            out[r0:r0 + step, :, c] = np.where(n > 0, ap, np.nan)
    return out


def froc(matches: Matches, num_images: int | None = None, fp_rates=FROC_RATES, weights=None,
         threshold_index: int = 0, chunk: int = 64) -> np.ndarray:
    """Lesion-level FROC pooled over classes: sensitivity ``[R, len(fp_rates)]`` at each average number of false
    positives per image. A detection hits when ``matches`` matched it at ``thresholds[threshold_index]`` (to a box of
    its own class; a second detection of a box already found is a false positive, as the greedy matching makes it).
    Kept detections enter by descending score, tied scores together (one cut); the sensitivity at rate k is the
    highest weighted TP / weighted ground-truth count reached at a cut whose weighted FP count / weighted image count
    is <= k (0 if none). ``num_images`` counts every evaluated image (codes ``0..num_images-1``; default: those coded
    in ``matches``, so pass ``images=`` to :func:`match_detections` for images without boxes or detections);
    ``weights [R, num_images]``. NaN in a resample without ground truth or images."""
    num_images = len(matches.images) if num_images is None else int(num_images)
    if num_images < len(matches.images):
        raise SettingsError(f"froc: num_images {num_images} is less than the {len(matches.images)} images in matches")
    w = _image_weights(weights, num_images, "froc")
    rates = np.asarray(fp_rates, np.float64).reshape(-1)
    rate_order = np.argsort(rates, kind="stable")
    det = np.flatnonzero(matches.kept)
    det = det[np.argsort(-matches.pred_scores[det], kind="stable")]
    hit = matches.tp[threshold_index, det][None]
    tied = matches.pred_scores[det]
    ends = np.flatnonzero(np.r_[tied[1:] != tied[:-1], True]) if len(det) else np.zeros(0, np.int64)
    gt_weight = w @ np.bincount(matches.gt_image_index, minlength=num_images)
    image_weight = w.sum(1)
    out = np.zeros((len(w), len(rates)))
    step = _chunk(len(w), len(det) + len(ends) * len(rates), chunk)
    for r0 in range(0, len(w) if len(ends) else 0, step):
        wd = w[r0:r0 + step][:, matches.pred_image_index[det]]
        with np.errstate(invalid="ignore", divide="ignore"):
            sensitivity = np.cumsum(wd * hit, axis=1)[:, ends] / gt_weight[r0:r0 + step, None]
            per_image = np.cumsum(wd * ~hit, axis=1)[:, ends] / image_weight[r0:r0 + step, None]
        cuts = _count_below(per_image, rates[rate_order], inclusive=True)  # [r, K]: cuts within each rate
        reached = np.take_along_axis(sensitivity, np.maximum(cuts - 1, 0), axis=1)  # sensitivity never decreases
        out[r0:r0 + step, rate_order] = np.where(cuts > 0, reached, 0.0)
    return np.where(((gt_weight > 0) & (image_weight > 0))[:, None], out, np.nan)


def froc_score(sensitivity) -> np.ndarray:
    """The FROC score: the mean sensitivity over the false-positive rates (the last axis of :func:`froc`)."""
    return _array(sensitivity, np.float64).mean(-1)


def rsna_score(gt_image, gt_boxes, pred_image, pred_boxes, pred_scores, images, thresholds=RSNA_THRESHOLDS,
               weights=None) -> np.ndarray:
    """The RSNA Pneumonia Detection Challenge metric for one class, ``[R]``: per image and IoU threshold t,
    detections in descending confidence each take a free ground-truth box with IoU > t (:func:`match_detections`,
    rule ``"strict"``), and precision(t) = TP / (TP + FP + FN); an image scores the mean over the thresholds. An
    image without ground truth scores 0 if it has any detection and is left out if it has none. The result is the
    mean over the counted images, weighted by ``weights [R, len(images)]`` (codes in the order of ``images``, all
    evaluated image ids)."""
    m = match_detections(gt_image, np.zeros(len(_array(gt_image).reshape(-1)), np.int64), gt_boxes, pred_image,
                         np.zeros(len(_array(pred_image).reshape(-1)), np.int64), pred_boxes, pred_scores,
                         thresholds, rule="strict", images=images)
    num_images = len(m.images)
    w = _image_weights(weights, num_images, "rsna_score")
    found = np.stack([np.bincount(m.pred_image_index, weights=row, minlength=num_images) for row in m.tp])  # [T, I]
    boxes = np.bincount(m.pred_image_index, minlength=num_images) + np.bincount(m.gt_image_index,
                                                                                minlength=num_images)
    counted = boxes > 0  # TP + FP + FN = detections + ground-truth boxes - TP
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(counted, found / np.maximum(boxes - found, 1), 0.0).mean(0)
        return (w @ (score * counted)) / (w @ counted.astype(np.float64))


@dataclass
class StratifiedBootstrap:
    """Image weights of a stratified patient bootstrap (:func:`stratified_patient_bootstrap`)."""

    weights: np.ndarray  # [R, N]: how often each image counts in each resample
    redrawn: np.ndarray  # [R] int: how many times each resample was drawn again because `required` rejected it
    failed: np.ndarray  # [R] bool: still rejected after max_redraws redraws (kept: report these as undefined)


def stratified_patient_bootstrap(patients, strata, resamples: int, seed: int, required=None,
                                 max_redraws: int = 100) -> StratifiedBootstrap:
    """Like :func:`patient_bootstrap`, but patients are drawn with replacement within their stratum (``strata``:
    each image's stratum; all images of a patient must share one), each stratum keeping its number of patients, so
    that rare classes are not left out of resamples by chance. ``required(weights_row [N]) -> bool`` optionally
    rejects a resample (e.g. one without a box of some class), which is then drawn again, at most ``max_redraws``
    times; a resample still rejected is kept and flagged in ``failed``."""
    _, patient = np.unique(_array(patients), return_inverse=True)
    stratum_names, stratum = np.unique(_array(strata).astype(str), return_inverse=True)
    patient, stratum = patient.reshape(-1), stratum.reshape(-1)
    if len(patient) != len(stratum):
        raise SettingsError(f"stratified_patient_bootstrap: {len(patient)} patients but {len(stratum)} strata")
    count = int(patient.max()) + 1 if len(patient) else 0
    of_patient = np.zeros(count, np.int64)
    of_patient[patient] = stratum
    mixed = np.flatnonzero(of_patient[patient] != stratum)
    if len(mixed):
        i = int(mixed[0])
        raise SettingsError(f"stratified_patient_bootstrap: the patient {_array(patients).reshape(-1)[i]!r} has images "
                            f"in strata {stratum_names[stratum[i]]!r} and {stratum_names[of_patient[patient[i]]]!r}")
    members = [np.flatnonzero(of_patient == s) for s in range(len(stratum_names))]
    rng = np.random.default_rng(seed)

    def draw(rows: int) -> np.ndarray:
        drawn = np.zeros((rows, count))
        for m in members:
            drawn[:, m] = rng.multinomial(len(m), np.full(len(m), 1 / len(m)), size=rows)
        return drawn[:, patient]

    weights = draw(resamples)
    redrawn, failed = np.zeros(resamples, np.int64), np.zeros(resamples, bool)
    if required is not None:
        rejected = np.array([r for r in range(resamples) if not required(weights[r])], np.int64)
        while len(rejected):
            failed[rejected[redrawn[rejected] >= max_redraws]] = True
            rejected = rejected[redrawn[rejected] < max_redraws]
            if not len(rejected):
                break
            weights[rejected] = draw(len(rejected))
            redrawn[rejected] += 1
            rejected = np.array([r for r in rejected if not required(weights[r])], np.int64)
    return StratifiedBootstrap(weights, redrawn, failed)


def patient_strata(patients, box_classes, labels=None) -> np.ndarray:
    """Each image's stratum for :func:`stratified_patient_bootstrap` (strings, ``[N]``): ``"box:c"`` for the rarest
    class c with a ground-truth box on any image of its patient, else ``"label:c"`` for the patient's rarest positive
    label, else ``"none"``. Rarity counts patients (with a box of the class, or positive for it); ties go to the
    lower class index. ``box_classes``: per image, the classes of its boxes (an iterable, possibly empty);
    ``labels``: ``[N, C]`` with 1 positive, 0 negative, -1 unknown (not positive), or None."""
    _, patient = np.unique(_array(patients), return_inverse=True)
    patient = patient.reshape(-1)
    box_classes = list(box_classes)
    if len(box_classes) != len(patient):
        raise SettingsError(f"patient_strata: {len(patient)} patients but {len(box_classes)} box class lists")
    pairs = np.array([(patient[i], int(c)) for i, cs in enumerate(box_classes) for c in cs], np.int64).reshape(-1, 2)
    y = np.zeros((len(patient), 0)) if labels is None else _array(labels).reshape(len(patient), -1)
    classes = max(y.shape[1], int(pairs[:, 1].max(initial=-1)) + 1)
    if len(pairs) and pairs[:, 1].min() < 0:
        raise SettingsError("patient_strata: box classes must be non-negative")
    count = int(patient.max()) + 1 if len(patient) else 0
    has_box = np.zeros((count, classes), bool)
    has_box[pairs[:, 0], pairs[:, 1]] = True
    positive = np.zeros((count, classes), bool)
    if y.shape[1]:
        np.logical_or.at(positive[:, :y.shape[1]], patient, y == 1)

    def rarest(has: np.ndarray) -> np.ndarray:
        rank = np.where(has, has.sum(0)[None], np.inf)
        return np.where(has.any(1), rank.argmin(1) if classes else -1, -1)

    box, label = rarest(has_box), rarest(positive)
    names = np.where(box >= 0, np.char.add("box:", box.astype(str)),
                     np.where(label >= 0, np.char.add("label:", label.astype(str)), "none"))
    return names[patient]


def class_preserving_bootstrap(patients, labels, boxes=(), resamples: int = 1000, seed: int = 0,
                               min_acceptance: float = 0.05) -> tuple:
    """Image weights ``[R, N]`` of a patient bootstrap whose every resample keeps the classes that define the
    estimates: each class with positives and negatives among ``labels [N, C]`` (1, 0, or -1 unknown) keeps both,
    and each class of every ground-truth box set in ``boxes`` (pairs ``(image indices [G], classes [G])``) keeps a
    box. Means over classes are then over the estimate's own classes in every resample, so the intervals describe
    the estimate's statistic.

    Patients are drawn plainly and a resample that loses a class is drawn again (the bootstrap conditioned on the
    class set). When fewer than ``min_acceptance`` of plain resamples would pass (many classes with a single box or
    positive), patients are drawn within :func:`patient_strata` instead, so a class's rarest patients come back in
    every resample. Returns ``(StratifiedBootstrap, stratified: bool)``."""
    patients = _array(patients).reshape(-1)
    labels = _array(labels).reshape(len(patients), -1)
    defined = (labels == 1).any(0) & (labels == 0).any(0)
    positive, negative = (labels == 1)[:, defined].astype(float), (labels == 0)[:, defined].astype(float)
    box_sets, boxed = [], [set() for _ in patients]
    for images, classes in boxes:
        images, classes = _array(images, np.int64).reshape(-1), _array(classes, np.int64).reshape(-1)
        present = np.unique(classes)
        box_sets.append((images, (classes[:, None] == present[None]).astype(float)))
        for i, c in zip(images, classes):
            boxed[i].add(int(c))

    def complete(w: np.ndarray) -> bool:
        return bool((w @ positive > 0).all() and (w @ negative > 0).all() and
                    all((w[images] @ onehot > 0).all() for images, onehot in box_sets))

    plain = np.zeros(len(patients), np.int64)
    probe = stratified_patient_bootstrap(patients, plain, min(resamples, 200), seed, complete, max_redraws=0)
    stratified = bool(probe.failed.mean() > 1 - min_acceptance)
    strata = patient_strata(patients, boxed, labels) if stratified else plain
    return stratified_patient_bootstrap(patients, strata, resamples, seed, complete), stratified

