"""``dmfast predict``: a trained model on anyone's X-rays. Files and folders of PNG (8/16-bit, grey, RGB, RGBA,
palette), JPEG and DICOM go in; for every image that can be read come out the 14 probabilities and, for each class
reaching ``min_probability``, its CAM boxes in the image's own pixels (images are padded to a centred square,
never squashed; CAMs of aligned models are warped back onto the image, as in eval).

Writes to ``out``: ``predictions.csv`` (path, width, height, one column per class), ``predictions.json`` (per image
its probabilities, the reported findings with their boxes and scores, and every box of the classes reaching
``box_floor`` for detection metrics, plus the settings used), ``predictions.coco.json`` (those boxes as a COCO
dataset whose annotations carry scores), ``problems.csv`` (every file that could not be read, and why), and on
request ``submission.csv`` (``submission``: the VinBigData or RSNA challenge's format, of the reported findings),
``cams.npz`` (every class's CAM per image, float16,
over the centred square that pads the image: see :class:`dmfast.inference.ImagePrediction`) and ``overlays/``
(one PNG per image: a panel per reported class with its CAM, boxes, name and probability, and a colour bar).
"""

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape


from . import __version__
from .config import PredictConfig, box_levels, min_probability
from .data.dataset import FINDINGS
from .data.formats import open_dataset
from .data.images import ImageError, list_xrays, load_gray
from .detection import DECIMALS, SUBMISSION_HEADERS, SUBMISSION_ROWS, coco_predictions, submission_id
from .errors import DataError, SettingsError
from .figures import finding_panels, normalize
from .inference import ImagePrediction, load_model
from .io import (atomic_npz, atomic_write_bytes, atomic_write_csv, atomic_write_json_streamed, check_outputs,
                 clear_outputs, csv_text, json_text, naming, print_table, progress, save_png, versions,
                 writing)

OVERLAY_SIDE = (320, 768)  # an overlay panel's longest side: small images are enlarged, large ones reduced


def _read(path: Path, model, keep: bool) -> tuple:
    """``(square, pixels if keep else None, None)`` or ``(None, None, reason)``: decoding and resizing run in
    threads, and a bad file must not stop the others."""
    try:
        pixels = load_gray(path)
        return model.square(pixels), pixels if keep else None, None
    except ImageError as error:
        return None, None, str(error).removeprefix(f"{path}: ")
    except Exception as error:  # e.g. PIL's decompression-bomb guard, or memory: this file alone is left out
        return None, None, f"{type(error).__name__}: {error}"


def output_names(files: list, roots: list) -> list:
    """A distinct name per file for its overlay: its path inside the folder it was found in (its own name when
    given directly), without the suffix; a name already taken (ignoring case) gets -2, -3, ..."""
    names, taken = [], set()
    for path, root in zip(files, roots):
        base = path.relative_to(root).with_suffix("").as_posix() if path != root else path.stem
        name, k = base, 1
        while name.lower() in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name.lower())
        names.append(name)
    return names


def overlay(gray: np.ndarray, result: ImagePrediction, min_probability: float, title: str | None = None
            ) -> torch.Tensor:
    """One panel per reported class (most probable first): the X-ray, the class's heat, its boxes, its name and
    probability; with a colour bar and ``title`` (the file, the thresholds) above. The heat is the class's
    probability times its min-max normalised CAM, on one scale for every panel (a class at p = 0.04 is faint, at
    p = 1 full), and hatched where the model saw nothing (outside an aligned model's field of view). With no
    reported class, the X-ray and the most probable class."""
    scale = min(max(1.0, OVERLAY_SIDE[0] / max(gray.shape)), OVERLAY_SIDE[1] / max(gray.shape))
    size = (max(round(gray.shape[0] * scale), 1), max(round(gray.shape[1] * scale), 1))
    image = F.interpolate(torch.tensor(gray)[None, None].float() / 255, size=size, mode="bilinear",
                          align_corners=False, antialias=True)[0, 0]
    reported = sorted(result.boxes, key=lambda name: -result.probabilities[name])
    heats = result.heatmaps(reported, scale, outside=float("nan")) if reported else []
    heats = [normalize(heat) * result.probabilities[name] for name, heat in zip(reported, heats)]
    panels = [(f"{name}  p = {result.probabilities[name]:.2f}", heat,
               [[v * scale for v in box[:4]] for box in result.boxes[name]]) for name, heat in zip(reported, heats)]
    if not panels:
        top = max(result.probabilities, key=result.probabilities.get)
        panels = [(f"no finding reaches p = {min_probability:g} (highest: {top} {result.probabilities[top]:.2f})",
                   None, [])]
    if result.out_of_distribution:  # said where it is read first
        caption, heat, boxes = panels[0]
        panels[0] = (f"UNLIKE THE TRAINING X-RAYS (score {result.ood_score:.1f} > {result.ood_threshold:.1f}): "
                     f"{caption}", heat, boxes)
    return finding_panels(image, panels, scale=(0.0, 1.0), bar=("0", "1"), title=title)



def _record(path: Path, result: ImagePrediction) -> dict:
    """An image's entry of predictions.json: its probabilities, the reported findings with their boxes, and every
    box of the classes reaching the box floor (``boxes``, best score first) for detection metrics."""
    def box(values: list) -> list:
        return [round(v, DECIMALS) for v in values[:4]]

    every = sorted(((name, b) for name, boxes in result.all_boxes.items() for b in boxes), key=lambda nb: -nb[1][4])
    return {"path": str(path), "width": result.width, "height": result.height,
            "ood_score": result.ood_score, "out_of_distribution": result.out_of_distribution,
            "probabilities": result.probabilities,
            "findings": {name: {"probability": result.probabilities[name],
                                "boxes": [{"box": box(b), "score": b[4]} for b in boxes]}
                         for name, boxes in result.boxes.items()},
            "boxes": [{"class": name, "box": box(b), "probability": result.probabilities[name], "score": b[4]}
                      for name, b in every]}


OUTPUTS = ("predictions.csv", "predictions.json", "predictions.coco.json", "submission.csv", "problems.csv", "cams.npz",
           "overlays")


def _release_files(inputs, format: str) -> tuple:
    """The images that release folders list (as :func:`~dmfast.data.images.list_xrays`' ``files, roots,
    problems``): their records' files, frontal views only where the release says; what the readers left out as
    problems."""
    files, roots, problems = [], [], []
    for folder in map(Path, inputs):
        if not folder.is_dir():
            raise SettingsError(f"{folder}: with --format, each input is a release's folder")
        dataset = open_dataset(folder, None if format == "auto" else format, skip_problems=True, lists=False)
        files += [dataset.paths[n] for n in dataset.images]
        roots += [folder] * len(dataset.images)
        for kinds in (dataset.problems.items, dataset.problems.notes):
            problems += [(str(folder), f"{kind}: {item}") for kind, items in kinds.items() for item in items]
    return files, roots, problems


def detection_files(out: Path, records, config: PredictConfig) -> None:
    """``predictions.coco.json`` (every box as a COCO dataset with scores) and, with ``config.submission``, the
    challenge's ``submission.csv`` (the reported findings' boxes, in each image's own pixels), streamed from
    ``records()`` (a fresh iterator over the images' records at each call)."""
    index = {name: c for c, name in enumerate(FINDINGS)}
    images = ((r["path"], r["width"], r["height"]) for r in records())
    detections = ((k, index[b["class"]], b["box"], b["score"], b["probability"]) for k, r in enumerate(records())
                  for b in r["boxes"])
    atomic_write_json_streamed(out / "predictions.coco.json", coco_predictions(
        images, detections, {"description": f"dmfast predict with {config.model}", "version": __version__}))
    if config.submission:
        rows = (row for r in records() for row in SUBMISSION_ROWS[config.submission](
            [(submission_id(r["path"]), [(index[name], b["score"], b["box"]) for name, f in r["findings"].items()
                                         for b in f["boxes"]])]))
        atomic_write_csv(out / "submission.csv", SUBMISSION_HEADERS[config.submission], rows)


def run(config: PredictConfig, console: Console | None = None) -> dict:
    """Predict every X-ray of ``config.inputs``; write the outputs (see the module) and return the report."""
    with writing(config.out, "dmfast predict"):
        return _run(config, console)


def _run(config: PredictConfig, console: Console | None) -> dict:
    console = console or Console(stderr=True)
    levels, floor = box_levels(config.box_thresholds, config.max_boxes), min_probability(config.min_probability)
    out = Path(config.out)
    earlier = check_outputs(out, OUTPUTS, "dmfast predict", config.overwrite)
    inside = next((p for p in map(Path, config.inputs) if p.is_dir() and Path(os.path.realpath(p)).is_relative_to(
        os.path.realpath(out))), None)
    if inside is not None:  # the search leaves --out out (never reading its own overlays back as X-rays)
        raise SettingsError(f"--out {out}: the input folder {inside} is --out or inside it, and the search for X-rays "
                            "leaves --out out; give --out a folder of its own")
    files, roots, problems = _release_files(config.inputs, config.format) if config.format else \
        list_xrays(config.inputs, exclude=[out])
    if not files:
        raise DataError(f"no PNG, JPEG or DICOM files in {', '.join(map(str, config.inputs))}")
    if config.submission:
        seen = {}
        for path in files:
            other = seen.setdefault(submission_id(path), path)
            if other != path:
                raise SettingsError(f"--submission {config.submission}: {other} and {path} have one image id, "
                                    f"{submission_id(path)!r} (a challenge knows an image by its file name)")
    model = load_model(config.model, config.device, config.precision, config.compile)
    model.cam_method = config.cam_method
    clear_outputs(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files, roots)
    # each image's record goes to an unnamed file as it comes (JSON lines; nothing is left if the run is killed) and
    # the outputs are written from it at the end: memory stays flat however many images a release has
    spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out)
    count, frames = 0, []

    def records():
        spool.flush()
        spool.seek(0)
        for line in spool:
            yield json.loads(line)

    batches = [range(i, min(i + config.batch, len(files))) for i in range(0, len(files), config.batch)]
    started = time.perf_counter()
    with spool, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, \
            (atomic_npz(out / "cams.npz") if config.cams else nullcontext()) as add_cams, \
            progress("predict", console, "{task.fields[rate]:.1f} img/s") as bar:
        task = bar.add_task("predict", total=len(files), rate=0.0)
        def read(k: int) -> list:
            return [pool.submit(_read, files[i], model, config.overlays) for i in batches[k]] \
                if k < len(batches) else []

        read_ahead = read(0)
        for k, batch in enumerate(batches):  # the next batch decodes while this one runs
            current, read_ahead = read_ahead, read(k + 1)
            good = []
            for i, future in zip(batch, current):
                square, pixels, reason = future.result()
                if reason is None:
                    good.append((i, square, pixels))
                else:
                    problems.append((str(files[i]), reason))
            results = model.predict_squares([square for _, square, _ in good], floor, levels,
                                            config.max_boxes, [str(files[i]) for i, _, _ in good], config.box_score,
                                            config.box_floor) if good else []
            for (i, _, pixels), result in zip(good, results):
                if add_cams is not None:
                    add_cams(str(count), result.image_cams().half().numpy())
                    frames.append([result.width, result.height, *result.frame])
                if config.overlays:
                    save_png(out / "overlays" / f"{names[i]}.png", overlay(
                        pixels, result, floor, f"{files[i].name}   heat: p x CAM (min-max), one scale   boxes at "
                        f"{', '.join(f'{t:g}' for t in levels)} of the CAM's range, classes with p >= {floor:g}"),
                        durable=False)
                with naming(out, "writing the records of the run"):  # the spool is unnamed: name its folder
                    spool.write(json_text(_record(files[i], result)) + "\n")
                count += 1
            elapsed = time.perf_counter() - started
            bar.update(task, advance=len(batch), rate=count / elapsed if elapsed else 0.0)
        if add_cams is not None:
            add_cams("paths", np.array([r["path"] for r in records()], dtype=str))
            add_cams("classes", np.array(FINDINGS, dtype=str))
            add_cams("frames", np.array(frames, dtype=np.int64).reshape(-1, 5))  # width, height, side, pad_x, pad_y
        seconds = time.perf_counter() - started

        atomic_write_bytes(out / "problems.csv", csv_text(["path", "reason"], problems).encode())
        atomic_write_csv(out / "predictions.csv", ["path", "width", "height", *FINDINGS, "ood_score",
                                                   "out_of_distribution"],
                         ([r["path"], r["width"], r["height"], *(f"{r['probabilities'][c]:.6f}" for c in FINDINGS),
                           "" if r["ood_score"] is None else f"{r['ood_score']:.4f}",
                           "" if r["out_of_distribution"] is None else int(r["out_of_distribution"])]
                          for r in records()))
        detection_files(out, records, config)
        report = {"model": str(config.model), "precision": model.precision, "min_probability": floor,
                  "box_thresholds": list(levels), "max_boxes": config.max_boxes, "box_score": config.box_score,
                  "box_floor": config.box_floor, "classes": list(FINDINGS), "images": records(),
                  "problems": [{"path": p, "reason": r} for p, r in problems], "seconds": seconds,
                  "images_per_second": count / seconds if seconds else None,
                  "versions": versions()}
        atomic_write_json_streamed(out / "predictions.json", report)
        report["images"] = count  # the records are in the file
    if problems:
        unreadable = len(files) - count  # of the X-ray files the bar counted; the others were not X-ray files
        print_table(console, f"{len(problems)} files left out: {unreadable} of the {len(files)} X-ray files could not "
                    f"be read, {len(problems) - unreadable} other files ({out / 'problems.csv'})", ["file", "reason"],
                    [[escape(path), escape(reason)] for path, reason in problems], justify=["left", "left"])
    if not count:
        raise DataError(f"none of the {len(files)} X-ray files could be read (see {out / 'problems.csv'})")
    console.print(escape(f"{count} images in {seconds:.1f} s ({report['images_per_second']:.1f} img/s): "
                         f"{out / 'predictions.csv'}, {out / 'predictions.json'}, {out / 'predictions.coco.json'}" +
                         (f", {out / 'submission.csv'}" if config.submission else "") +
                         (f", {out / 'cams.npz'}" if config.cams else "") +
                         (f"; overlays in {out / 'overlays'}" if config.overlays else "")))
    return report
