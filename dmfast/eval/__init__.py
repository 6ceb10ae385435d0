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

from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console

from ..config import EvalConfig, box_levels
from ..data.cache import open_cache, report_left_out
from ..data.dataset import FINDINGS, fuse_readers
from ..data.formats import open_data
from ..detection import Task, ground_truth, scored_images
from ..errors import SettingsError
from ..inference import Classifier
from ..io import atomic_write_bytes, atomic_write_json, check_outputs, clear_outputs, print_table, versions, writing
from .reporting import (coco_files, detection_tables, interval_tables, markdown, overlay_figures, per_image_files,
                        tables)
from .scoring import (GroundTruth, check_against_pycocotools, evaluate_checkpoint, mask_only,  # noqa: F401 (API)
                      score_methods, uncertainty)
from .selection import chosen_images, select_images, training_overlap  # noqa: F401 (API)


OUTPUTS = ("eval.json", "eval.md", "predictions.csv", "boxes.csv", "coco", "overlays")


def run(config: EvalConfig, console: Console | None = None) -> dict:
    """Evaluate every checkpoint; print the tables, write ``eval.json``, ``eval.md`` and overlay figures."""
    with writing(config.out, "dmfast eval"):
        return _run(config, console)


def _run(config: EvalConfig, console: Console | None) -> dict:
    console = console or Console(stderr=True)
    _check_names(config)
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
    caches = {}
    for _, classifier in classifiers:
        size = classifier.config.size
        if size not in caches:
            caches[size] = open_cache(config, size, console)
    first = classifiers[0][1]

    selection, test_names = chosen_images(config, dataset, classifiers, caches[first.config.size], console)
    label_of = {r.image: r.labels for r in dataset.records}
    labels = np.stack([label_of[n] for n in test_names])
    clear_outputs(out, earlier)

    detection_images = scored_images(dataset, test_names)
    methods, kept_by_method, truth = score_methods(config, classifiers, caches, dataset, test_names, labels,
                                                   frozenset(detection_images), console)
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
            check_against_pycocotools(m, console)
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
              "versions": versions("pycocotools")}
    per_image_files(out, methods, test_names, labels, detection_images)
    atomic_write_json(out / "eval.json", report)
    atomic_write_bytes(out / "eval.md", markdown(results).encode())
    console.print(f"results {out / 'eval.json'}, {out / 'eval.md'}, per image {out / 'predictions.csv'}, "
                  f"{out / 'boxes.csv'}" + (f", COCO files in {out / 'coco'}" if coco else "") +
                  (f"; overlays in {out / 'overlays'}" if figures else ""))
    return report


def _check_names(config: EvalConfig) -> None:
    if not config.checkpoints:
        raise SettingsError("dmfast eval needs at least one --checkpoint")
    names = [name for name, _ in [*config.checkpoints, *config.masks]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SettingsError(f"method names given twice: {', '.join(twice)} (name each --checkpoint/--masks NAME=PATH)")
