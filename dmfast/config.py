"""Every stage's settings, each written once: the data fields all stages share live in :class:`DataConfig`, the
split fields of the training stages in :class:`SplitConfig`, and each stage's config extends them. The CLI
generates its options' defaults from these dataclasses (:func:`defaults`), so a default is never written twice."""

import dataclasses
import inspect
from dataclasses import dataclass, field

from .metrics import DEFAULT_THRESHOLDS

ARCHS = ("resnet18", "resnet34", "resnet50")
WANG_THRESHOLDS = (60 / 255, 180 / 255)  # Wang et al.'s two CAM levels for boxes (`--box-threshold wang`)
ASYMMETRIC = ("Cardiomegaly",)  # the classes whose CAMs are not mirrored into their masks (Eq. 3)


@dataclass(kw_only=True)
class DataConfig:
    data: str  # a ChestX-ray14-format directory
    out: str  # the stage's output folder
    cache: str | None = None  # image cache folder (default: see data.cache.default_cache_dir)
    batch: int = 32
    skip_problems: bool = False  # leave out missing or unreadable images instead of stopping


@dataclass(kw_only=True)
class SplitConfig(DataConfig):
    size: int = 512  # working image size (the paper's)
    seed: int = 0
    val_fraction: float = 0.1  # patients of train_val held out for validation
    split: str = "official"  # or "patients": a patient-grouped test split (for data without official lists)
    max_steps: int | None = None  # stop each epoch after this many steps (quick runs and tests)


@dataclass(kw_only=True)
class TrainConfig(SplitConfig):
    arch: str = "resnet50"
    cam_stride: int = 32  # 16: finer CAMs (conv5_x without downsampling)
    epochs: int = 5
    lr: float = 1e-4
    lr_decay: float = 1.0  # per-epoch multiplicative decay (1 = constant, the paper's)
    optimizer: str = "adam"  # the paper's; "sgd" (momentum 0.9) too
    weights: str | None = None  # torchvision-format state dict
    pretrained: bool = False
    amp: bool = False
    aligned: str | None = None  # alignment checkpoint: train on aligned images
    init: str | None = None  # start from this classifier checkpoint
    masks: str | None = None  # disease masks file: attention retraining
    freeze_bn: bool = False  # BatchNorm in inference mode (statistics from the loaded weights)
    tensorboard: bool = False  # also log the epoch scalars to RUN/tensorboard


@dataclass(kw_only=True)
class AlignConfig(SplitConfig):
    batch: int = 16
    anchor_images: int = 2000
    epochs: int = 5
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    optimizer: str = "sgd"  # the paper's; "adam" converges faster on the phantom (see the README)
    clip: float = 1.0  # gradient-norm clipping: no single batch can throw the transform to its bounds
    pool: int = 16
    perceptual: str | None = None  # classifier checkpoint for the perceptual loss
    perceptual_weight: float = 1.0
    input_size: int = 128
    grid_images: int = 8


@dataclass(kw_only=True)
class MasksConfig(DataConfig):
    checkpoint: str | None = None  # the classifier (dmfast train) whose CAMs make the masks
    confidence: float = 0.8
    threshold: float = 0.5
    asymmetric: list = field(default_factory=lambda: list(ASYMMETRIC))
    min_images: int = 5
    pseudo: bool = False
    anchor: str | None = None  # anchor.pt of dmfast align (default: the classifier's alignment run)
    size: int | None = None  # working size when there is no checkpoint to take it from (SplitConfig.size)


@dataclass(kw_only=True)
class BoxConfig:
    """How CAMs become boxes (eval and predict): thresholds on the min-max normalised CAM, boxes per CAM."""
    box_thresholds: tuple = (0.5,)
    max_boxes: int = 1


def box_levels(thresholds, max_boxes: int) -> tuple:
    """The box thresholds as floats, after checking them and ``max_boxes`` (a clear error for bad values)."""
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    levels = tuple(float(t) for t in thresholds)
    if not levels or any(not 0 <= t <= 1 for t in levels):
        raise ValueError(f"box thresholds must lie in [0, 1], got {list(levels)}")
    return levels


def min_probability(value: float) -> float:
    """The probability a class must reach to get boxes, checked."""
    if not 0 <= value <= 1:
        raise ValueError(f"min_probability must lie in [0, 1], got {value}")
    return float(value)


@dataclass(kw_only=True)
class EvalConfig(DataConfig, BoxConfig):
    checkpoints: list = field(default_factory=list)  # [(name, path)] of dmfast train checkpoints, in table order
    masks: list = field(default_factory=list)  # [(name, path)] extra masks files for mask-only rows
    overlays: int = 2  # images per class in the overlay figures
    overlap_thresholds: tuple = DEFAULT_THRESHOLDS
    split: str | None = None  # test, train_val or all of the data's lists (default: see eval.select_images)
    images: str | None = None  # a file of image names to score instead
    strict: bool = False  # refuse evaluation images that share a name or patient with the training images
    box_space: str = "release"  # the pixels BBox_List_2017.csv uses: ChestX-ray14's 1024 x 1024, or "image"
    bootstrap: int = 1000  # patient resamples for the 95% intervals (0: none)
    seed: int = 0  # of the resampling


@dataclass(kw_only=True)
class PredictConfig(BoxConfig):
    model: str  # a model file (dmfast export, RUN/model.pt), a run folder, or a dmfast train checkpoint
    inputs: list  # X-ray files and folders (searched recursively)
    out: str
    min_probability: float = 0.5  # classes reaching this get boxes (0: every class)
    batch: int = 16
    cams: bool = False  # write cams.npz
    overlays: bool = False  # write one overlay PNG per image
    device: str | None = None  # default: CUDA when available, else the CPU


@dataclass(kw_only=True)
class DemoConfig:
    out: str = "out/demo"
    data: str | None = None  # a ChestX-ray14-format directory instead of the phantom
    count: int = 1600  # phantom images
    size: int = 128
    arch: str = "resnet18"
    cam_stride: int = 16
    epochs: int = 3
    attention_epochs: int = 2
    align_epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.15
    max_steps: int | None = None  # per epoch, for quick runs
    overlays: int = 2
    predict_images: int = 8  # test images with boxes run through `dmfast predict` at the end (with overlays)


def defaults(owner) -> dict:
    """Default values of a config dataclass's fields, or of a function's keyword parameters."""
    missing = dataclasses.MISSING
    if dataclasses.is_dataclass(owner):
        return {f.name: f.default_factory() if f.default is missing else f.default for f in dataclasses.fields(owner)
                if f.default is not missing or f.default_factory is not missing}
    return {name: p.default for name, p in inspect.signature(owner).parameters.items()
            if p.default is not inspect.Parameter.empty}


def from_dict(cls, values: dict):
    """``cls(**values)`` without the keys ``cls`` does not know (settings of older files that were dropped)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
