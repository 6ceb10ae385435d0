"""What ``dmfast eval`` writes: the tables (the paper's, detection, intervals) as text and Markdown, the per-image
CSV files, the COCO files and the overlay figures."""

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from .. import __version__
from ..data.cache import ImageCache
from ..data.dataset import FINDINGS, image_size
from ..detection import (DECIMALS, FROC_RATES, METRICS, METRIC_NAMES, Task, coco_ground_truth, coco_results,
                         pycocotools_ap)
from ..figures import TRUTH, WHITE, draw, grid, heat_overlay
from ..io import atomic_write_csv, atomic_write_json, save_png, versions
from ..metrics import REPORTED_THRESHOLDS
from .scoring import GroundTruth, Method, point_estimate


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
    for t in REPORTED_THRESHOLDS:
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
    stamp = versions()
    lines = [f"# dmfast eval\n\ndmfast {stamp['dmfast']}, torch {stamp['torch']}\n"]
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
                                "version": __version__})
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


def interval_tables(methods: list) -> list:
    """(title, header, rows) of the intervals and of the paired differences from the first method."""
    keys = list(dict.fromkeys(k for m in methods for k in m.uncertainty["intervals"]))
    header = ["method"] + [METRIC_NAMES.get(k) or k.replace("iou_accuracy@", "accuracy T(IoU) ").replace(
        "mean_auroc", "mean AUROC") for k in keys]
    resamples = methods[0].uncertainty["resamples"]

    def cell(point, bounds, sign=""):
        return "-" if point is None or not np.isfinite(point) else \
            f"{point:{sign}.3f} [{bounds[0]:{sign}.3f}, {bounds[1]:{sign}.3f}]"

    rows = [[m.name] + [cell(point_estimate(m, k), m.uncertainty["intervals"][k]) if k in m.uncertainty["intervals"]
                        else "-" for k in keys] for m in methods]
    diffs = [[m.name] + [cell(d["point"], d["interval"], "+") if (d := m.uncertainty["difference"].get(k)) else "-"
                         for k in keys] for m in methods[1:]]
    return [(f"Point estimates with 95% intervals ({resamples} patient bootstrap resamples)", header, rows)] + \
        ([(f"Difference from {methods[0].name} with its paired 95% interval (same resamples)", header, diffs)]
         if diffs else [])
