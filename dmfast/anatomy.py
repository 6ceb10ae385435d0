"""The anchor image and its anatomy: the canonical chest that alignment warps every X-ray onto (the mean of the
No Finding training images), the lung fields and anatomical regions segmented from it, and the pseudo disease
masks (PDM, the paper's section 4.4) drawn from those regions instead of from CAMs.

Lung fields: the two largest dark regions that do not touch the border, grown into the thorax's dark pixels; each
disease gets the region where it is found clinically (lungs, lower or upper zones, costophrenic angles, periphery,
heart, hila, hiatus).
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoints import MASK_SIZE
from .data.dataset import FINDINGS
from .data.images import to_model_input
from .errors import DataError

# The canonical chest in normalised coordinates (x to the image's right, y down, both in [-1, 1]): the lung fields
# (cx, cy, rx, ry) of the image-left and image-right lung and the heart shadow. The phantom is drawn in it, and
# PDM falls back to it when the anchor's lungs cannot be segmented.
LUNGS = ((-0.36, -0.05, 0.27, 0.58), (0.36, -0.05, 0.27, 0.58))
HEART = (0.13, 0.27, 0.25, 0.21)

# Pseudo disease masks: the anatomical region of each disease (see ``anatomy``).
PSEUDO_REGIONS = {
    "Atelectasis": "lower_lungs", "Cardiomegaly": "heart", "Effusion": "costophrenic", "Infiltration": "lungs",
    "Mass": "lungs", "Nodule": "lungs", "Pneumonia": "lungs", "Pneumothorax": "upper_periphery",
    "Consolidation": "lungs", "Edema": "hila", "Emphysema": "lungs", "Fibrosis": "lungs",
    "Pleural_Thickening": "periphery", "Hernia": "hiatus",
}


def anchor_images(dataset, names, count: int) -> list:
    """The images the anchor averages: up to ``count`` No Finding images among ``names`` (as the release says, else
    every one of the 14 findings known to be absent: see :attr:`~dmfast.data.dataset.Record.healthy`)."""
    allowed = set(names)
    return [r.image for r in dataset.records if r.healthy and r.image in allowed][:count]


def make_anchor(cache, dataset, names, count: int) -> torch.Tensor:
    """Pixel mean of the :func:`anchor_images` (of an image cache), as a float [-1, 1] image ``[1, 1, S, S]``."""
    healthy = anchor_images(dataset, names, count)
    if not healthy:
        raise DataError("no 'No Finding' training images to build the anchor from (images the release says are "
                        "free of findings; give --anchor of another run)")
    total = torch.zeros(1, 1, cache.size, cache.size, dtype=torch.float64)
    for start in range(0, len(healthy), 64):
        total += to_model_input(cache.batch(healthy[start:start + 64])).double().sum(0, keepdim=True)
    return (total / len(healthy)).float()


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
    """Fallback lung fields: the canonical chest's ellipses."""
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
