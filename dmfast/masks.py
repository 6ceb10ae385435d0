"""``dmfast masks``: per-disease masks, the regions where each disease mainly occurs, in the classifier's input
frame (the anchor's, when the classifier was trained on aligned images). Written as a masks file
(:mod:`dmfast.checkpoints`) with a figure and a summary.

Disease masks (DM, the paper's section 3.2): the trained classifier's CAMs S_c (Eq. 1) and probabilities P_c (Eq. 2)
over the training images; per class, the images labelled with it whose P_c >= ``confidence`` (0.8) are kept, each
CAM is upsampled to the mask grid and min-max normalised to [0, 1], the symmetric classes (all but cardiomegaly by
default) also count each CAM's mirror image (Eq. 3), the kept maps are averaged, the average is min-max normalised
again and thresholded at ``threshold`` (0.5): the mask is 1 where the average reaches half its range, else 0.
A class with fewer than ``min_images`` confident images falls back to its ``min_images`` most probable labelled
images (reported); a class without labelled training images gets no mask.

Pseudo disease masks (PDM, section 4.4, ``--pseudo``): drawn from the anatomy of the anchor image instead of from
CAMs (:mod:`dmfast.anatomy`).
"""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from . import checkpoints
from .anatomy import make_anchor, pseudo_masks
from .checkpoints import MASK_SIZE
from .config import MIN_CAM_CELLS, AlignConfig, MasksConfig, SplitConfig
from .data.cache import open_cache, report_left_out
from .data.dataset import FINDINGS
from .data.formats import open_data
from .data.splits import make_splits
from .errors import DataError, ModelFileError, SettingsError
from .figures import masks_figure
from .inference import Classifier
from .io import atomic_write_json, check_outputs, clear_outputs, print_table, progress, save_png, writing


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of ``[..., h, w]`` to [0, 1] (a constant map becomes 0)."""
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


def _symmetrize(maps: torch.Tensor, asymmetric) -> torch.Tensor:
    """Eq. 3: the mean of each symmetric class's map and its mirror image (averaging is linear, so mirroring the
    average equals averaging the mirrored CAMs)."""
    unknown = sorted(set(asymmetric) - set(FINDINGS))
    if unknown:
        raise SettingsError(f"unknown asymmetric class(es) {unknown}; classes are {list(FINDINGS)}")
    out = (maps + maps.flip(-1)) / 2
    for name in asymmetric:
        out[FINDINGS.index(name)] = maps[FINDINGS.index(name)]
    return out


def _upsampled(cams: torch.Tensor) -> torch.Tensor:
    return F.interpolate(cams.double(), size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)


def disease_masks(classifier, cache, names: list, labels: np.ndarray, config: MasksConfig,
                  console: Console) -> dict:
    """Average the normalised CAMs of the confident training images per class; see the module docstring."""
    if not 0 < config.confidence <= 1 or not 0 < config.threshold < 1:
        raise SettingsError(f"confidence must lie in (0, 1] and threshold in (0, 1), got {config.confidence} and "
                            f"{config.threshold}")
    classes = len(FINDINGS)
    sums = torch.zeros(classes, MASK_SIZE, MASK_SIZE, dtype=torch.float64)
    kept = torch.zeros(classes, dtype=torch.long)
    positive = torch.from_numpy(labels == 1)  # unknown labels (-1) are not positives
    probabilities = torch.zeros(len(names), classes)
    with progress("masks: CAMs of the training images", console) as bar:
        task = bar.add_task("cams", total=len(names))
        for start in range(0, len(names), config.batch):
            prediction = classifier(cache.batch(names[start:start + config.batch]))
            probs = prediction.probabilities.cpu()
            probabilities[start:start + len(probs)] = probs
            chosen = (probs >= config.confidence) & positive[start:start + len(probs)]
            sums += torch.einsum("bc,bchw->chw", chosen.double(), _normalized(_upsampled(prediction.cams.cpu())))
            kept += chosen.sum(0)
            bar.update(task, advance=len(probs))

    fallback = {}
    for c, name in enumerate(FINDINGS):
        candidates = torch.nonzero(positive[:, c]).flatten()
        if kept[c] >= config.min_images or len(candidates) == 0:
            if len(candidates) == 0:
                fallback[name] = "no labelled training image: no mask"
            continue
        # Too few confident images: the most probable labelled ones instead.
        order = torch.sort(probabilities[candidates, c], descending=True, stable=True).indices
        top = candidates[order[:config.min_images]]
        cams = torch.cat([classifier(cache.batch([names[i] for i in top[s:s + config.batch].tolist()])).cams
                          [:, c:c + 1].cpu() for s in range(0, len(top), config.batch)])
        sums[c] = _normalized(_upsampled(cams)).sum(0)[0]
        fallback[name] = (f"{int(kept[c])} image(s) with P >= {config.confidence}; used the {len(top)} most "
                          f"probable labelled images (lowest P {probabilities[top[-1], c]:.3f})")
        kept[c] = len(top)

    has_mask = kept > 0
    average = torch.where(has_mask[:, None, None], sums / kept.clamp_min(1)[:, None, None], torch.zeros_like(sums))
    average = _normalized(_symmetrize(average, config.asymmetric))
    masks = (average >= config.threshold).double() * has_mask[:, None, None]
    return {"masks": masks.float(), "average": average.float(), "has_mask": has_mask.tolist(),
            "counts": dict(zip(FINDINGS, kept.tolist())), "fallback": fallback, "kind": "DM"}


def _anchor_for(config: MasksConfig, given, classifier, cache, dataset, train_names) -> tuple:
    """The anchor image ``[S, S]`` and where it came from: ``given`` (``--anchor``, read), else the classifier's
    alignment run, else the mean of the No Finding training images."""
    if given is not None:
        return given, str(config.anchor)
    if getattr(classifier, "anchor", None) is not None:  # beside its alignment checkpoint, or in its model file
        return classifier.anchor, classifier.anchor_source
    return make_anchor(cache, dataset, train_names, AlignConfig.anchor_images)[0, 0], \
        "mean of the No Finding training images"


OUTPUTS = ("masks.pt", "masks.png", "masks.json")


def run(config: MasksConfig, console: Console | None = None) -> Path:
    """Make the masks; writes ``masks.pt``, ``masks.png`` and ``masks.json`` to ``config.out``; returns masks.pt."""
    with writing(config.out, "dmfast masks"):
        return _run(config, console)


def _run(config: MasksConfig, console: Console | None) -> Path:
    console = console or Console(stderr=True)
    out = Path(config.out)
    if config.checkpoint is None and not config.pseudo:
        raise SettingsError("dmfast masks needs --checkpoint (a trained classifier), or --pseudo for anatomy masks")
    earlier = check_outputs(out, OUTPUTS, "dmfast masks", config.overwrite)
    classifier = Classifier(config.checkpoint, precision=config.precision, compile=config.compile) \
        if config.checkpoint else None
    if classifier is not None and not config.pseudo and not classifier.splits_known:
        raise ModelFileError(f"{classifier.path}: a model file of an older dmfast, without its run's splits; masks "
                             "come from the CAMs of its training images: give the run's checkpoint.pt or best.pt, or "
                             "a model file this dmfast exports from it")
    if classifier is not None and not config.pseudo:
        cells = classifier.config.size // classifier.config.cam_stride
        if cells < MIN_CAM_CELLS:
            raise ModelFileError(f"{config.checkpoint}: its CAMs are {cells} x {cells} ({classifier.config.size} px, "
                                 f"CAM stride {classifier.config.cam_stride}); masks need at least {MIN_CAM_CELLS} x "
                                 f"{MIN_CAM_CELLS}: train at a larger --size or with --cam-stride 16")
    given = checkpoints.load_anchor(config.anchor) if config.anchor else None  # read before any cache is built
    size = classifier.config.size if classifier else (config.size or SplitConfig.size)
    dataset = open_data(config, lists=False)
    report_left_out(dataset, console)
    cache = open_cache(config, size, console)
    splits = classifier.splits if classifier is not None and classifier.splits_known else make_splits(dataset)
    train_names = [n for n in splits.train if n in cache]
    anchor, anchor_source = _anchor_for(config, given, classifier, cache, dataset, train_names)

    if config.pseudo:
        payload = pseudo_masks(anchor)
        if not payload["lungs_segmented"]:
            console.print("[yellow]the lung fields could not be segmented in the anchor; canonical positions used")
    else:
        if not train_names:
            raise DataError(f"{config.checkpoint}: none of its training images is in {cache.folder}")
        label_of = {r.image: r.labels for r in dataset.records}
        labels = np.stack([label_of[n] for n in train_names])
        payload = disease_masks(classifier, cache, train_names, labels, config, console)
    payload.update({"classes": list(FINDINGS), "threshold": config.threshold, "confidence": config.confidence,
                    "asymmetric": list(config.asymmetric), "anchor": anchor_source, "size": size,
                    "checkpoint": str(classifier.path.resolve()) if classifier is not None else None,
                    "config": asdict(config)})

    clear_outputs(out, earlier)
    path = checkpoints.save(out / "masks.pt", checkpoints.MASKS, payload)
    picture = save_png(out / "masks.png", masks_figure(anchor, payload))
    summary = {k: v for k, v in payload.items() if k not in ("masks", "average")}
    summary["mask_area"] = dict(zip(FINDINGS, payload["masks"].mean((1, 2)).tolist()))
    atomic_write_json(out / "masks.json", summary)

    rows = [[name, payload["regions"][name] if config.pseudo else str(payload["counts"][name]),
             f"{summary['mask_area'][name]:.0%}", payload.get("fallback", {}).get(name, "")] for name in FINDINGS]
    print_table(console, f"{payload['kind']} masks ({'anatomy of the anchor' if config.pseudo else config.checkpoint})",
                ["class", "region" if config.pseudo else "images", "mask area", "note"], rows,
                justify=["left", "left", "right", "left"])
    console.print(f"masks {path}, figure {picture}")
    return path
