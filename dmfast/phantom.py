"""Synthetic chest phantom: the embedded default dataset (``dmfast synth OUT_DIR``).

It writes a small ChestX-ray14-format directory (``images/``, ``Data_Entry_2017.csv``, ``BBox_List_2017.csv`` with a
box for every positive finding, in the 1024 x 1024 release space, ``train_val_list.txt`` / ``test_list.txt``, split
by patient) plus ``phantom_transforms.csv``, the random misalignment of every image, so the whole pipeline runs on
it unchanged and every stage can be scored against known truth.

Anatomy (in canonical, aligned coordinates, x to the image's right, y down, both in [-1, 1]): soft-tissue body,
two lung fields cut by diaphragm domes, mediastinum and spine, an asymmetric heart shadow on the patient's left (the
image's right, as in a PA film), ribs, clavicles, noise and contrast variation. Each finding has its own anatomy:
cardiomegaly enlarges the heart, effusion fills a costophrenic angle, pneumothorax darkens a lung apex behind a
pleural line, nodule and mass are small and large round opacities, atelectasis a plate-like band, infiltration and
pneumonia patchy opacities in their zones, and the other six distinct patterns (see ``_FINDINGS``). Distractor
opacities on the soft tissue outside the lungs and a side marker give a CAM something wrong to latch onto. After
drawing, each image is warped by a random affine (rotation, anisotropic scale, shift) with ``dmfast.ops``.
Deterministic for a seed.
"""

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import ops
from .anatomy import HEART, LUNGS
from .data.chestxray14 import PHANTOM_TRANSFORMS
from .data.dataset import FINDINGS, RELEASE_SIZE
from .io import atomic_write_bytes, check_outputs, clear_outputs, progress, torch_threads, writing
from .limits import FRACTION, SIZE, Range

# Prevalence of each finding among images with findings (ChestX-ray14's order of magnitude, rare ones lifted so a
# small phantom still has some).
PREVALENCE = {
    "Atelectasis": 0.20, "Cardiomegaly": 0.08, "Effusion": 0.22, "Infiltration": 0.30, "Mass": 0.09, "Nodule": 0.10,
    "Pneumonia": 0.05, "Pneumothorax": 0.09, "Consolidation": 0.07, "Edema": 0.05, "Emphysema": 0.05,
    "Fibrosis": 0.04, "Pleural_Thickening": 0.05, "Hernia": 0.03,
}


@dataclass
class Misalignment:
    sx: float
    sy: float
    tx: float
    ty: float
    angle: float  # radians

    def theta(self) -> torch.Tensor:
        return ops.affine_matrix(self.sx, self.sy, self.tx, self.ty, self.angle).to(torch.float32)


class Canvas:
    """One image being drawn in canonical coordinates, with helpers for soft shapes."""

    def __init__(self, size: int, rng: np.random.Generator):
        lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        self.y, self.x = torch.meshgrid(lin, lin, indexing="ij")
        self.rng = rng
        self.size = size
        self.image = torch.zeros(size, size)

    def u(self, lo, hi) -> float:
        return float(self.rng.uniform(lo, hi))

    def ellipse(self, cx, cy, rx, ry, edge=0.03) -> torch.Tensor:
        d = ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2
        return torch.sigmoid((1 - d) / edge)

    def blob(self, cx, cy, r) -> torch.Tensor:
        return torch.exp(-((self.x - cx) ** 2 + (self.y - cy) ** 2) / (2 * r * r))


def _lung_point(c: Canvas, side: int, zone: tuple) -> tuple:
    """A point inside lung ``side`` (0 image-left, 1 image-right) within vertical zone (fractions of its height)."""
    cx, cy, rx, ry = LUNGS[side]
    t = c.u(*zone)
    y = cy - ry + 2 * ry * t
    half = rx * math.sqrt(max(0.0, 1 - ((y - cy) / ry) ** 2)) * 0.75
    return cx + c.u(-half, half), y


# Each finding draws into the canvas (returning its box in canonical coordinates) given the lung side it affects.
def _atelectasis(c, side):
    x, y = _lung_point(c, side, (0.6, 0.8))
    w, h = c.u(0.12, 0.18), c.u(0.02, 0.035)
    tilt = c.u(-0.25, 0.25)
    band = torch.sigmoid((h - (c.y - y - tilt * (c.x - x)).abs()) / 0.008) * torch.sigmoid((w - (c.x - x).abs()) / 0.01)
    c.image += 0.28 * band
    return x - w, y - h - abs(tilt) * w, x + w, y + h + abs(tilt) * w


def _effusion(c, side):
    cx, cy, rx, ry = LUNGS[side]
    depth = c.u(0.18, 0.32)
    base, lateral = cy + ry * 0.92, cx + (-1 if side == 0 else 1) * rx * 0.55
    meniscus = base - depth + 0.25 * (c.x - lateral) ** 2 * (-1) + 0.12 * ((c.x - cx) * (-1 if side == 0 else 1))
    fill = torch.sigmoid((c.y - meniscus) / 0.02) * c.ellipse(cx, cy, rx, ry * 1.02, 0.02)
    c.image += 0.45 * fill
    return cx - rx, base - depth - 0.12 * rx, cx + rx, cy + ry


def _infiltration(c, side):
    boxes = []
    for _ in range(int(c.rng.integers(3, 6))):
        x, y = _lung_point(c, side, (0.2, 0.6))
        r = c.u(0.03, 0.055)
        c.image += 0.16 * c.blob(x, y, r)
        boxes.append((x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r))
    b = np.array(boxes)
    return b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()


def _round_opacity(c, side, r_range, strength):
    x, y = _lung_point(c, side, (0.2, 0.75))
    r = c.u(*r_range)
    c.image += strength * c.ellipse(x, y, r, r, 0.08)
    return x - r, y - r, x + r, y + r


def _mass(c, side):
    return _round_opacity(c, side, (0.09, 0.13), 0.38)


def _nodule(c, side):
    return _round_opacity(c, side, (0.025, 0.04), 0.42)


def _pneumonia(c, side):
    x, y = _lung_point(c, side, (0.55, 0.8))
    rx, ry = c.u(0.1, 0.14), c.u(0.08, 0.12)
    texture = 0.6 + 0.4 * torch.sin(c.x * 70 + c.u(0, 6)) * torch.sin(c.y * 63 + c.u(0, 6))
    c.image += 0.3 * c.ellipse(x, y, rx, ry, 0.25) * texture
    return x - rx * 1.2, y - ry * 1.2, x + rx * 1.2, y + ry * 1.2


def _pneumothorax(c, side):
    cx, cy, rx, ry = LUNGS[side]
    lateral = -1 if side == 0 else 1
    depth = c.u(0.06, 0.12)
    lung = c.ellipse(cx, cy, rx, ry, 0.02)
    inner = c.ellipse(cx - lateral * depth * 0.6, cy + depth, rx - depth, ry - depth, 0.01)
    rim = (lung - inner).clamp(min=0) * torch.sigmoid((cy - c.y + 0.1) / 0.05)
    c.image -= 0.22 * rim
    c.image += 0.25 * torch.exp(-((inner - 0.5) ** 2) / 0.005) * torch.sigmoid((cy - c.y + 0.1) / 0.05) * lung
    return (cx - rx, cy - ry, cx + rx, cy + 0.15) if side == 1 else (cx - rx, cy - ry, cx + rx, cy + 0.15)


def _consolidation(c, side):
    x, y = _lung_point(c, side, (0.4, 0.7))
    rx, ry = c.u(0.08, 0.12), c.u(0.12, 0.17)
    c.image += 0.42 * c.ellipse(x, y, rx, ry, 0.05) * c.ellipse(*LUNGS[side], 0.02)
    return x - rx, y - ry, x + rx, y + ry


def _edema(c, side):
    ry, rx = c.u(0.2, 0.26), c.u(0.12, 0.16)
    for cx in (-0.22, 0.22):
        c.image += 0.2 * c.ellipse(cx, 0.0, rx, ry, 0.3)
    return -0.22 - rx, -ry, 0.22 + rx, ry


def _emphysema(c, side):
    lungs = c.ellipse(*LUNGS[0], 0.02) + c.ellipse(*LUNGS[1], 0.02)
    c.image -= 0.16 * lungs
    c.image -= 0.08 * torch.sigmoid((c.y - 0.45) / 0.03) * lungs  # flattened, lower diaphragm
    return -0.63, -0.63, 0.63, 0.53


def _fibrosis(c, side):
    cx, cy, rx, ry = LUNGS[side]
    zone = c.ellipse(cx + (-1 if side == 0 else 1) * rx * 0.3, cy + ry * 0.45, rx * 0.6, ry * 0.4, 0.05)
    net = (torch.sin(c.x * 90) * torch.sin(c.y * 90)).abs()
    c.image += 0.22 * zone * net
    x0 = cx + (-1 if side == 0 else 1) * rx * 0.3
    return x0 - rx * 0.6, cy + ry * 0.05, x0 + rx * 0.6, cy + ry * 0.85


def _pleural_thickening(c, side):
    cx, cy, rx, ry = LUNGS[side]
    lateral = -1 if side == 0 else 1
    outer = c.ellipse(cx, cy, rx, ry, 0.01)
    inner = c.ellipse(cx - lateral * 0.025, cy + 0.02, rx - 0.04, ry - 0.04, 0.01)
    upper = torch.sigmoid((cy - 0.1 - c.y) / 0.04) * torch.sigmoid(lateral * (c.x - cx) / 0.03)
    c.image += 0.4 * (outer - inner).clamp(min=0) * upper
    x_edge = cx + lateral * rx
    return min(x_edge, cx), cy - ry, max(x_edge, cx), cy - 0.05


def _hernia(c, side):
    x, y, r = c.u(-0.02, 0.1), c.u(0.42, 0.5), c.u(0.07, 0.1)
    c.image += 0.3 * c.ellipse(x, y, r, r * 0.85, 0.04)
    c.image -= 0.15 * c.ellipse(x, y - r * 0.3, r * 0.45, r * 0.25, 0.05)  # a gas bubble
    return x - r, y - r * 0.85, x + r, y + r * 0.85


_FINDINGS = {
    "Atelectasis": _atelectasis, "Effusion": _effusion, "Infiltration": _infiltration, "Mass": _mass,
    "Nodule": _nodule, "Pneumonia": _pneumonia, "Pneumothorax": _pneumothorax, "Consolidation": _consolidation,
    "Edema": _edema, "Emphysema": _emphysema, "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}  # Cardiomegaly changes the anatomy itself (see draw_image)


def draw_image(size: int, findings: list, rng: np.random.Generator) -> tuple:
    """One canonical (aligned) image [size, size] in [0, 1] and its boxes {finding: (x0, y0, x1, y1) canonical}."""
    c = Canvas(size, rng)
    body = c.ellipse(c.u(-0.02, 0.02), 0.05, c.u(0.8, 0.9), 1.05, 0.05)
    lungs = [c.ellipse(cx + c.u(-0.02, 0.02), cy, rx * c.u(0.95, 1.05), ry * c.u(0.96, 1.04), 0.02)
             for cx, cy, rx, ry in LUNGS]
    heart_scale = c.u(1.3, 1.45) if "Cardiomegaly" in findings else c.u(0.92, 1.05)
    hx, hy, hrx, hry = HEART
    heart = c.ellipse(hx + c.u(-0.02, 0.02) + (heart_scale - 1) * 0.1, hy, hrx * heart_scale, hry * heart_scale, 0.03)
    lung_field = (lungs[0] + lungs[1]).clamp(max=1) * (1 - heart)
    ribs = 0.5 + 0.5 * torch.cos(2 * math.pi * (c.y * c.u(5.0, 6.0) + 0.7 * c.x.abs() ** 2 + c.u(0, 1)))
    spine = torch.sigmoid((0.06 - c.x.abs()) / 0.015) * body
    mediastinum = torch.sigmoid((0.14 - c.x.abs()) / 0.03) * torch.sigmoid((0.35 - c.y) / 0.05) * body
    clavicles = sum(torch.exp(-((c.y + 0.62 + 0.25 * (s * c.x - 0.35) ** 2 - 0.1 * s * c.x) ** 2) / 0.0012)
                    * torch.sigmoid((0.75 - (c.x - s * 0.35).abs()) / 0.05) for s in (-1, 1))
    c.image = 0.12 + 0.55 * body - 0.42 * lung_field * (1 - 0.3 * ribs) + 0.12 * heart + 0.12 * mediastinum
    c.image += 0.12 * spine + 0.18 * clavicles
    boxes = {}
    if "Cardiomegaly" in findings:
        boxes["Cardiomegaly"] = (hx - hrx * heart_scale, hy - hry * heart_scale, hx + hrx * heart_scale,
                                 hy + hry * heart_scale)
    for name in findings:
        if name in _FINDINGS:
            boxes[name] = tuple(float(v) for v in _FINDINGS[name](c, int(rng.integers(0, 2))))
    # Distractors: opacities on the soft tissue outside the lungs, and a side marker.
    for _ in range(int(rng.integers(0, 3))):
        s = 1 if rng.random() < 0.5 else -1
        c.image += 0.3 * c.blob(s * c.u(0.68, 0.8), c.u(-0.7, 0.6), c.u(0.02, 0.05))
    if rng.random() < 0.7:
        mx, my = c.u(-0.9, -0.75), c.u(-0.9, -0.75)
        c.image += 0.6 * ((c.x - mx).abs() < 0.04).float() * ((c.y - my).abs() < 0.05).float()
    contrast, gamma = c.u(0.85, 1.15), c.u(0.85, 1.2)
    image = (c.image * contrast).clamp(0, 1) ** gamma
    image = image + torch.randn(image.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * 0.02
    return image.clamp(0, 1), boxes


def random_misalignment(rng: np.random.Generator) -> Misalignment:
    """Rotation within +-10 degrees, anisotropic scale 0.88..1.12, shift within +-0.08 (of the half-width)."""
    return Misalignment(float(rng.uniform(0.88, 1.12)), float(rng.uniform(0.88, 1.12)), float(rng.uniform(-0.08, 0.08)),
                        float(rng.uniform(-0.08, 0.08)), float(math.radians(rng.uniform(-10, 10))))


def warp_box(box, theta: torch.Tensor) -> tuple:
    """Canonical box -> box in the warped image (affine_grid maps output to input, so invert theta)."""
    inverse = ops.affine_inverse(theta)
    x0, y0, x1, y1 = box
    corners = torch.tensor([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=torch.float64)
    moved = corners @ inverse.T
    return (moved[:, 0].min().item(), moved[:, 1].min().item(), moved[:, 0].max().item(), moved[:, 1].max().item())


def sample_findings(rng: np.random.Generator, no_finding: float) -> list:
    if rng.random() < no_finding:
        return []
    chosen = [name for name in FINDINGS if rng.random() < PREVALENCE[name] * 0.9]
    if not chosen:
        weights = np.array([PREVALENCE[n] for n in FINDINGS])
        chosen = [FINDINGS[int(rng.choice(len(FINDINGS), p=weights / weights.sum()))]]
    return chosen


# What synthesize writes (a folder holding any of them is not written over without overwrite).
OUTPUTS = ("images", "Data_Entry_2017.csv", "BBox_List_2017.csv", PHANTOM_TRANSFORMS, "train_val_list.txt",
           "test_list.txt")
RANGES = {"count": Range(1, 10**7), "size": SIZE, "seed": Range(0, 2**32 - 1), "no_finding": FRACTION,
          "test_fraction": Range(0, 0.9, integer=False)}


def synthesize(out_dir, count: int = 2000, size: int = 256, seed: int = 0, no_finding: float = 0.4,
               test_fraction: float = 0.2, console: Console | None = None, overwrite: bool = False) -> Path:
    """Write a phantom dataset of ``count`` images of ``size`` px to ``out_dir``; returns the folder."""
    given = {"count": count, "size": size, "seed": seed, "no_finding": no_finding, "test_fraction": test_fraction}
    count, size, seed, no_finding, test_fraction = (RANGES[k].check(v, k) for k, v in given.items())
    console = console or Console(stderr=True)
    out = Path(out_dir)
    with writing(out, "dmfast synth"):
        clear_outputs(out, check_outputs(out, OUTPUTS, "dmfast synth", overwrite))
        return _write_phantom(out, count, size, seed, no_finding, test_fraction, console)


def _write_phantom(out: Path, count: int, size: int, seed: int, no_finding: float, test_fraction: float,
                   console) -> Path:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, box_rows, transforms, names_by_patient = [], [], [], {}
    patient, follow = 1, 0
    with progress("synth", console) as bar, torch_threads(1):
        task = bar.add_task("synth", total=count)
        for _ in range(count):
            if follow >= int(rng.integers(1, 4)):
                patient, follow = patient + 1, 0
            name = f"{patient:08d}_{follow:03d}.png"
            follow += 1
            findings = sample_findings(rng, no_finding)
            image, boxes = draw_image(size, findings, rng)
            move = random_misalignment(rng)
            theta = move.theta()
            warped = ops.affine_smooth(image[None, None], theta[None], 1)[0, 0]
            pixels = (warped.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
            atomic_write_bytes(out / "images" / name, buffer.getvalue(), durable=False)
            entries.append([name, "|".join(findings) or "No Finding", follow - 1, patient, int(rng.integers(20, 80)),
                            "M" if rng.random() < 0.55 else "F", "PA", RELEASE_SIZE, RELEASE_SIZE, 0.143, 0.143])
            for finding, box in boxes.items():
                x0, y0, x1, y1 = (min(max(v, -1.0), 1.0) for v in warp_box(box, theta))
                scale = RELEASE_SIZE / 2  # canonical [-1, 1] -> release pixels
                box_rows.append([name, "Infiltrate" if finding == "Infiltration" else finding,
                                 (x0 + 1) * scale, (y0 + 1) * scale, (x1 - x0) * scale, (y1 - y0) * scale])
            transforms.append([name, move.sx, move.sy, move.tx, move.ty, math.degrees(move.angle),
                               *theta.reshape(-1).tolist()])
            names_by_patient.setdefault(patient, []).append(name)
            bar.update(task, advance=1)
    patients = rng.permutation(sorted(names_by_patient)).tolist()
    test_patients = set(patients[: max(1, int(round(test_fraction * len(patients))))])
    test = [n for p in sorted(names_by_patient) if p in test_patients for n in names_by_patient[p]]
    train_val = [n for p in sorted(names_by_patient) if p not in test_patients for n in names_by_patient[p]]

    def write_csv(name, header, rows):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write_bytes(out / name, buffer.getvalue().encode())

    write_csv("Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                      "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                      "OriginalImagePixelSpacing[x", "y]"], entries)
    write_csv("BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""], box_rows)
    write_csv(PHANTOM_TRANSFORMS, ["Image Index", "sx", "sy", "tx", "ty", "angle_degrees", "theta00",
                                         "theta01", "theta02", "theta10", "theta11", "theta12"], transforms)
    atomic_write_bytes(out / "train_val_list.txt", ("\n".join(train_val) + "\n").encode())
    atomic_write_bytes(out / "test_list.txt", ("\n".join(test) + "\n").encode())
    console.print(f"phantom: {count} images of {size}px, {len(box_rows)} boxes, {len(test)} test images -> {out}")
    return out


def read_transforms(data_dir) -> dict:
    """The phantom's known misalignments from ``phantom_transforms.csv``: image -> theta ``[2, 3]`` (output ->
    input); empty for data without that file."""
    path = Path(data_dir) / PHANTOM_TRANSFORMS
    if not path.is_file():
        return {}
    with open(path) as f:
        return {r["Image Index"]: torch.tensor([float(r[f"theta{i}{j}"]) for i in range(2) for j in range(3)])
                .view(2, 3) for r in csv.DictReader(f)}
