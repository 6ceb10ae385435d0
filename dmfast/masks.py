"""``dmfast masks``: per-disease masks, the regions where each disease mainly occurs, in the classifier's input
frame (the anchor's, when the classifier was trained on aligned images).

Disease masks (DM, the paper's section 3.2): the trained classifier's CAMs S_c (Eq. 1) and probabilities P_c (Eq. 2)
over the training images; per class, the images labelled with it whose P_c >= ``confidence`` (0.8) are kept, each
CAM is upsampled to the mask grid and min-max normalised to [0, 1], the symmetric classes (all but cardiomegaly by
default) also count each CAM's mirror image (Eq. 3), the kept maps are averaged, the average is min-max normalised
again and thresholded at ``threshold`` (0.5): the mask is 1 where the average reaches half its range, else 0.
A class with fewer than ``min_images`` confident images falls back to its ``min_images`` most probable labelled
images (reported); a class without labelled training images gets no mask.

Pseudo disease masks (PDM, section 4.4): drawn from the anatomy of the anchor image instead of from CAMs: the lung
fields are segmented (the two largest dark regions that do not touch the border, grown into the thorax's
dark pixels), and each disease gets the region
where it is found clinically (lungs, lower or upper zones, costophrenic angles, periphery, heart, hila, hiatus).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from scipy import ndimage

from .data.cache import ImageCache, default_cache_dir, prepare
from .data.chestxray14 import FINDINGS, open_dataset
from .figures import draw, grid, heat_overlay
from .io import atomic_torch_save, atomic_write_bytes, save_png

MASK_SIZE = 64  # side of the stored masks; the classifier resizes them to its feature map
ASYMMETRIC = ("Cardiomegaly",)

# Pseudo disease masks: the anatomical region of each disease (see ``anatomy``).
PSEUDO_REGIONS = {
    "Atelectasis": "lower_lungs", "Cardiomegaly": "heart", "Effusion": "costophrenic", "Infiltration": "lungs",
    "Mass": "lungs", "Nodule": "lungs", "Pneumonia": "lungs", "Pneumothorax": "upper_periphery",
    "Consolidation": "lungs", "Edema": "hila", "Emphysema": "lungs", "Fibrosis": "lungs",
    "Pleural_Thickening": "periphery", "Hernia": "hiatus",
}


@dataclass
class MasksConfig:
    data: str
    out: str
    checkpoint: str | None = None  # the classifier (dmfast train) whose CAMs make the masks
    cache: str | None = None
    confidence: float = 0.8
    threshold: float = 0.5
    asymmetric: list = field(default_factory=lambda: list(ASYMMETRIC))
    min_images: int = 5
    batch: int = 32
    pseudo: bool = False
    anchor: str | None = None  # anchor.pt of dmfast align (default: the classifier's alignment run)
    size: int | None = None  # working size when there is no checkpoint to take it from
    skip_problems: bool = False


def _progress(label: str, console: Console) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)


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
        raise ValueError(f"unknown asymmetric class(es) {unknown}; classes are {list(FINDINGS)}")
    out = (maps + maps.flip(-1)) / 2
    for name in asymmetric:
        out[FINDINGS.index(name)] = maps[FINDINGS.index(name)]
    return out


def _upsampled(cams: torch.Tensor) -> torch.Tensor:
    return F.interpolate(cams.double(), size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)


def disease_masks(classifier, cache: ImageCache, names: list, labels: np.ndarray, config: MasksConfig,
                  console: Console) -> dict:
    """Average the normalised CAMs of the confident training images per class; see the module docstring."""
    if not 0 < config.confidence <= 1 or not 0 < config.threshold < 1:
        raise ValueError(f"confidence must lie in (0, 1] and threshold in (0, 1), got {config.confidence} and "
                         f"{config.threshold}")
    classes = len(FINDINGS)
    sums = torch.zeros(classes, MASK_SIZE, MASK_SIZE, dtype=torch.float64)
    kept = torch.zeros(classes, dtype=torch.long)
    positive = torch.from_numpy(labels.astype(bool))
    probabilities = torch.zeros(len(names), classes)
    with _progress("masks: CAMs of the training images", console) as progress:
        task = progress.add_task("cams", total=len(names))
        for start in range(0, len(names), config.batch):
            prediction = classifier(cache.batch(names[start:start + config.batch]))
            probs = prediction.probabilities.cpu()
            probabilities[start:start + len(probs)] = probs
            chosen = (probs >= config.confidence) & positive[start:start + len(probs)]
            sums += torch.einsum("bc,bchw->chw", chosen.double(), _normalized(_upsampled(prediction.cams.cpu())))
            kept += chosen.sum(0)
            progress.update(task, advance=len(probs))

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


# --- pseudo disease masks ------------------------------------------------------------------------------------------

def _lungs(anchor: np.ndarray) -> tuple:
    """Segment the two lung fields of an anchor image ``[S, S]``: the largest dark component (not touching the
    border) in each half, at the darkness threshold that makes them largest while they stay on their own side.
    Returns (left, right) boolean masks, or None when no threshold gives two such regions."""
    size = anchor.shape[0]
    smooth = ndimage.gaussian_filter(anchor, sigma=size / 64)
    columns = np.arange(size)[None].repeat(size, 0)
    best, best_area = None, 0
    for quantile in np.arange(0.10, 0.625, 0.025):
        labels, count = ndimage.label(smooth <= np.quantile(smooth, quantile))
        if count == 0:
            continue
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
        areas = ndimage.sum_labels(np.ones_like(smooth), labels, index=np.arange(1, count + 1))
        centres = ndimage.mean(columns, labels, index=np.arange(1, count + 1))
        sides = []
        for side in (0, 1):
            ok = [i for i in range(count) if i + 1 not in border and areas[i] >= 0.01 * size * size
                  and (centres[i] < size / 2) == (side == 0)]
            sides.append(max(ok, key=lambda i: areas[i]) + 1 if ok else None)
        if None in sides:
            continue
        left, right = labels == sides[0], labels == sides[1]
        # each lung stays on its own side of the midline (a merged mediastinum is not a lung)
        if columns[left].max() > 0.55 * size or columns[right].min() < 0.45 * size:
            continue
        if left.sum() + right.sum() > best_area:
            best, best_area = (left, right), left.sum() + right.sum()
    return None if best is None else _grow(smooth, *best)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold: the cut of a 128-bin histogram that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    return float(centres[np.argmax(below * above * (mean_below - mean_above) ** 2)])


def _grow(smooth: np.ndarray, left: np.ndarray, right: np.ndarray) -> tuple:
    """On real anchors the darkest cores found above are smaller than the lung fields (at lighter thresholds the
    lungs join the dark background through the axillae). Grow each core into the pixels darker than the Otsu
    threshold of the thorax, by at most 1/12 of the image, each on its own side of the midline."""
    size = smooth.shape[0]
    both = left | right
    rows, columns = np.nonzero(both.any(1))[0], np.nonzero(both.any(0))[0]
    height, width = rows[-1] - rows[0], columns[-1] - columns[0]
    thorax = smooth[max(0, rows[0] - height // 2):rows[-1] + height // 2,
                    max(0, columns[0] - width // 4):columns[-1] + width // 4]
    dark = smooth <= _otsu(thorax)
    middle = (np.nonzero(left.any(0))[0].max() + np.nonzero(right.any(0))[0].min()) // 2
    grown = []
    for core, own_side in ((left, np.arange(size) < middle), (right, np.arange(size) > middle)):
        grown.append(ndimage.binary_dilation(core, iterations=max(1, size // 12), mask=dark & own_side[None]) | core)
    return tuple(grown)


def _canonical_lungs(size: int) -> tuple:
    """Fallback lung fields: ellipses at the phantom's canonical positions."""
    from .data.phantom import LUNGS

    lin = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    return tuple(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1 for cx, cy, rx, ry in LUNGS)


def anatomy(anchor: torch.Tensor) -> tuple:
    """Anatomical regions of the anchor image ``[S, S]`` (boolean numpy arrays) and whether the lungs were
    segmented from it (False: canonical positions were used)."""
    image = anchor.double().cpu().numpy()
    size = image.shape[0]
    found = _lungs(image)
    left, right = found if found is not None else _canonical_lungs(size)
    lungs = left | right
    rows = np.nonzero(lungs.any(1))[0]
    top, bottom = rows.min(), rows.max() + 1
    height = bottom - top
    y, x = np.mgrid[0:size, 0:size]
    centre_left, centre_right = x[left].mean(), x[right].mean()
    middle, span = (centre_left + centre_right) / 2, centre_right - centre_left
    relative = (y - top) / height  # 0 at the apices, 1 at the lowest lung point
    periphery = lungs & ~ndimage.binary_erosion(lungs, iterations=max(1, int(round(0.04 * size))))
    lateral = (np.abs(x - middle) > 0.3 * span)

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    heart = ellipse(middle + 0.15 * span, top + 0.75 * height, 0.36 * span, 0.2 * height)
    regions = {
        "lungs": lungs,
        "lower_lungs": lungs & (relative >= 0.4),
        "costophrenic": ndimage.binary_dilation(lungs & (relative >= 0.62), iterations=max(1, size // 64)),
        "upper_periphery": (lungs & (relative < 0.5)) | (periphery & lateral & (relative < 0.75)),
        "periphery": periphery & lateral,
        "heart": heart,
        "hila": lungs & (np.abs(x - middle) < 0.55 * span) & (relative > 0.2) & (relative < 0.8),
        "hiatus": ellipse(middle + 0.05 * span, top + 0.95 * height, 0.2 * span, 0.12 * height),
    }
    return regions, found is not None


def pseudo_masks(anchor: torch.Tensor) -> dict:
    """The PDM of every class from the anchor's anatomy, on the mask grid."""
    regions, segmented = anatomy(anchor)
    maps = torch.stack([torch.from_numpy(regions[PSEUDO_REGIONS[name]]).double() for name in FINDINGS])
    masks = (F.interpolate(maps[None], size=(MASK_SIZE, MASK_SIZE), mode="area")[0] >= 0.5).float()
    return {"masks": masks, "average": masks.clone(), "has_mask": [True] * len(FINDINGS),
            "regions": dict(PSEUDO_REGIONS), "lungs_segmented": segmented, "kind": "PDM"}


# --- the command ---------------------------------------------------------------------------------------------------

def figure(anchor: torch.Tensor, payload: dict, tile: int = 192) -> torch.Tensor:
    """The masks over the anchor image, one labelled tile per class (the paper's Fig. 3): the averaged map as heat
    inside the mask, the anchor elsewhere."""
    gray = F.interpolate(anchor.float().reshape(1, 1, *anchor.shape[-2:]), size=(tile, tile), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]
    gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp_min(1e-12)
    tiles = []
    for c, name in enumerate(FINDINGS):
        mask = F.interpolate(payload["masks"][c][None, None], size=(tile, tile), mode="nearest")[0, 0]
        heat = payload["average"][c] if payload["kind"] == "DM" else payload["masks"][c]
        count = payload.get("counts", {}).get(name)
        label = name if count is None else f"{name} ({count})"
        tiles.append(draw(heat_overlay(gray, heat, 0.55, where=mask), text=label))
    return grid(tiles, columns=7)


def _anchor_for(config: MasksConfig, classifier, cache: ImageCache, dataset, train_names) -> tuple:
    """The anchor image ``[S, S]`` and where it came from."""
    candidates = [Path(config.anchor)] if config.anchor else []
    if classifier is not None and classifier.config.aligned:
        candidates.append(Path(classifier.config.aligned).parent / "anchor.pt")
    for path in candidates:
        if path.is_file():
            try:
                anchor = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"{path}: not a readable anchor ({type(error).__name__})") from None
            if not isinstance(anchor, torch.Tensor) or anchor.dim() != 4 or anchor.shape[:2] != (1, 1):
                raise ValueError(f"{path}: not an anchor image (expected a [1, 1, S, S] tensor)")
            return anchor[0, 0], str(path)
        if config.anchor and path == Path(config.anchor):
            raise FileNotFoundError(f"anchor {path} not found")
    from .align import make_anchor

    return make_anchor(cache, dataset, train_names, 2000)[0, 0], "mean of the No Finding training images"


def masks(config: MasksConfig, console: Console | None = None) -> Path:
    """Make the masks; writes ``masks.pt``, ``masks.png`` and ``masks.json`` to ``config.out``; returns masks.pt."""
    from .inference import Classifier

    console = console or Console(stderr=True)
    out = Path(config.out)
    if config.checkpoint is None and not config.pseudo:
        raise ValueError("dmfast masks needs --checkpoint (a trained classifier), or --pseudo for anatomy masks")
    classifier = Classifier(config.checkpoint) if config.checkpoint else None
    size = classifier.config.size if classifier else (config.size or 512)
    dataset = open_dataset(config.data, skip_problems=config.skip_problems)
    cache_dir = Path(config.cache) if config.cache else default_cache_dir(config.data, size)
    if not (cache_dir / "index.json").is_file():
        prepare(config.data, cache_dir, size=size, skip_problems=config.skip_problems, console=console)
    cache = ImageCache(cache_dir)
    if cache.size != size:
        raise ValueError(f"cache {cache_dir} holds {cache.size} px images; the classifier works at {size} px")
    if classifier is not None:
        train_names = [n for n in classifier.splits.train if n in cache]
    else:
        from .data.splits import make_splits

        train_names = [n for n in make_splits(dataset).train if n in cache]
    anchor, anchor_source = _anchor_for(config, classifier, cache, dataset, train_names)

    if config.pseudo:
        payload = pseudo_masks(anchor)
        if not payload["lungs_segmented"]:
            console.print("[yellow]the lung fields could not be segmented in the anchor; canonical positions used")
    else:
        if not train_names:
            raise ValueError(f"{config.checkpoint}: none of its training images is in {cache_dir}")
        label_of = {r.image: r.labels for r in dataset.records}
        labels = np.stack([label_of[n] for n in train_names])
        payload = disease_masks(classifier, cache, train_names, labels, config, console)
    payload.update({"classes": list(FINDINGS), "threshold": config.threshold, "confidence": config.confidence,
                    "asymmetric": list(config.asymmetric), "anchor": anchor_source, "size": size,
                    "checkpoint": str(Path(config.checkpoint).resolve()) if config.checkpoint else None,
                    "config": asdict(config)})

    path = atomic_torch_save(out / "masks.pt", payload)
    picture = save_png(out / "masks.png", figure(anchor, payload))
    summary = {k: v for k, v in payload.items() if k not in ("masks", "average")}
    summary["mask_area"] = dict(zip(FINDINGS, payload["masks"].mean((1, 2)).tolist()))
    atomic_write_bytes(out / "masks.json", (json.dumps(summary, indent=1) + "\n").encode())

    table = Table(title=f"{payload['kind']} masks ({'anatomy of the anchor' if config.pseudo else config.checkpoint})")
    table.add_column("class")
    table.add_column("images" if not config.pseudo else "region")
    table.add_column("mask area", justify="right")
    table.add_column("note")
    for c, name in enumerate(FINDINGS):
        used = payload["regions"][name] if config.pseudo else str(payload["counts"][name])
        table.add_row(name, used, f"{summary['mask_area'][name]:.0%}", payload.get("fallback", {}).get(name, ""))
    console.print(table)
    console.print(f"masks {path}, figure {picture}")
    return path
