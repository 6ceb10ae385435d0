"""Every stage's settings, each written once: the data fields all stages share live in :class:`DataConfig`, the
split fields of the training stages in :class:`SplitConfig`, and each stage's config extends them. The CLI
generates its options' defaults from these dataclasses (:func:`defaults`), and its options' ranges from the fields'
:class:`Range` (:func:`range_of`), so neither is written twice; building a config checks every number against its
range, so Python callers get the same errors as the command line."""

import dataclasses
import inspect
import re
from dataclasses import dataclass, field

from .data.dataset import BLANK_POLICIES, BOX_SPACES, UNCERTAIN_POLICIES
from .data.formats import FORMATS as DATA_FORMATS
from .errors import SettingsError
from .limits import CAM_STRIDES, DEFAULT_SIZE, FRACTION, MAX_BOXES, SIZE, Range  # noqa: F401 (settings' vocabulary)
from .metrics import DEFAULT_THRESHOLDS

# the backbones (dmfast.backbones): torchvision's, and any timm model as "timm:<name>" (its extra installed)
ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")
TIMM = "timm:"
CAM_METHODS = ("cam", "gradcam", "gradcam++", "eigencam")  # the maps eval and predict can draw boxes from
OPTIMIZERS = ("adam", "sgd")
# a classifier's arithmetic (train, align, masks, eval, predict): float32, or its backbone under autocast in
# bfloat16 / float16; "auto" picks by device (dmfast.models.resolve_precision)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_SPLITS = ("test", "train_val", "all")  # which of a release's lists eval scores (--split)
SUBMISSIONS = ("vindr", "rsna")  # the challenges whose submission files predict writes (see dmfast.detection)
BOX_SCORES = ("mean", "peak", "probability")  # a box's confidence: p x the region's mean or peak CAM, or p alone
WANG_THRESHOLDS = (60 / 255, 180 / 255)  # Wang et al.'s two CAM levels for boxes (`--box-threshold wang`)
ASYMMETRIC = ("Cardiomegaly",)  # the classes whose CAMs are not mirrored into their masks (Eq. 3)
MIN_POOLED_CELLS = 8  # the alignment loss's pooled grid, per side: 4 x 4 cells let a warp lower it while misaligning
MIN_CAM_CELLS = 4  # CAMs of fewer cells a side (2 x 2 at 64 px and stride 32) give half-plane masks


def ranged(default, low=None, high=None, integer: bool | None = None, open_low: bool = False):
    """A dataclass field with its :class:`Range` (int-valued when the default is an int)."""
    integer = isinstance(default, int) if integer is None else integer
    return field(default=default, metadata={"range": Range(low, high, integer, open_low)})




def chosen(default, choices):
    """A dataclass field whose value must be one of ``choices``."""
    return field(default=default, metadata={"choices": tuple(choices)})


def arch_problem(value) -> str | None:
    """What is wrong with a backbone's name (one of :data:`ARCHS`, or ``timm:<model>``), or None; whether timm has
    the model is checked when it is built."""
    if value in ARCHS or isinstance(value, str) and value.startswith(TIMM) and \
            re.fullmatch(r"[A-Za-z0-9_.\-]+", value[len(TIMM):]):
        return None
    return f"must be one of {', '.join(ARCHS)} or {TIMM}<model> (a timm model), got {value!r}"


def device_problem(value) -> str | None:
    """What is wrong with a device's name as written (cpu, cuda or cuda:N), or None; whether this machine has it
    is checked when it is used (:func:`dmfast.ops.chosen_device`)."""
    if value is None or isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return None
    return f"must be cpu, cuda or cuda:N, got {value!r}"


def arch_field(default: str):
    """A dataclass field naming a backbone (:func:`arch_problem`)."""
    return field(default=default, metadata={"valid": arch_problem})


def metadata_of(owner, name: str) -> dict:
    """The metadata of field ``name`` of a config dataclass (its ``range`` or ``choices``); {} for a function's
    keyword or a field without."""
    for f in dataclasses.fields(owner) if dataclasses.is_dataclass(owner) else ():
        if f.name == name:
            return dict(f.metadata)
    return {}


def range_of(owner, name: str) -> Range | None:
    """The :class:`Range` of field ``name`` of a config dataclass, or None."""
    return metadata_of(owner, name).get("range")


def check_ranges(config) -> None:
    """Every field of ``config`` with a :class:`Range` checked (a SettingsError naming the first bad one)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "range" in f.metadata:
            setattr(config, f.name, f.metadata["range"].check(value, f.name))
        if "valid" in f.metadata and f.metadata["valid"](value):
            raise SettingsError(f"{f.name} {f.metadata['valid'](value)}")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise SettingsError(f"{f.name} must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")


class Checked:
    """A config whose numbers are checked against their ranges when it is built."""

    def __post_init__(self):
        check_ranges(self)


@dataclass(kw_only=True)
class DataConfig(Checked):
    data: str  # the folder of a release (see dmfast.data.formats)
    out: str  # the stage's output folder
    format: str | None = chosen(None, (None, *DATA_FORMATS))  # the release's layout (default: detected)
    uncertain: str = chosen("ignore", UNCERTAIN_POLICIES)  # CheXpert-style -1 labels: unknown, positive or negative
    blank: str = chosen("unknown", BLANK_POLICIES)  # blank label cells (finding not mentioned)
    cache: str | None = None  # image cache folder (default: see data.cache.default_cache_dir)
    batch: int = ranged(32, 1, 65536)
    skip_problems: bool = False  # leave out missing or unreadable images instead of stopping
    overwrite: bool = False  # replace the outputs of an earlier run in ``out`` (never without it)


@dataclass(kw_only=True)
class SplitConfig(DataConfig):
    size: int = ranged(DEFAULT_SIZE, SIZE.low, SIZE.high)  # working image size
    seed: int = ranged(0, 0, 2**32 - 1)
    val_fraction: float = ranged(0.1, 0, 0.9)  # patients of train_val held out for validation
    # "patients": a patient-grouped test split (for data without official lists)
    split: str = chosen("official", ("official", "patients"))
    max_steps: int | None = ranged(None, 1, integer=True)  # stop each epoch after this many steps (quick runs)


@dataclass(kw_only=True)
class TrainConfig(SplitConfig):
    arch: str = arch_field("resnet50")
    cam_stride: int = chosen(32, CAM_STRIDES)  # 16: finer CAMs (conv5_x without downsampling)
    epochs: int = ranged(5, 1, 100000)
    lr: float = ranged(1e-4, 0, 10, open_low=True)
    lr_decay: float = ranged(1.0, 0, 1, open_low=True)  # per-epoch multiplicative decay (1 = constant, the paper's)
    optimizer: str = chosen("adam", OPTIMIZERS)  # the paper's; "sgd" (momentum 0.9) too
    weights: str | None = None  # torchvision-format state dict
    pretrained: bool = False
    amp: bool = False  # the same as precision "fp16" (CUDA; no effect on the CPU, as before precision existed)
    # the backbone's arithmetic: float32, or bf16 / fp16 under autocast in channels_last (see PRECISIONS)
    precision: str = chosen("auto", PRECISIONS)
    # the first steps in float32 before bf16 / fp16 take over: a fresh network's gradients are the ones they blur
    # (32: about the demo's first epoch; bf16's AUROC against float32's: -0.011 over 40 seeds without it, +0.001
    # [-0.009, +0.010] over 68 with it; docs/performance.md)
    fp32_steps: int = ranged(32, 0, 10**9)
    compile: bool = False  # run the classifier under torch.compile (dmfast.models.compiled)
    aligned: str | None = None  # alignment checkpoint: train on aligned images
    init: str | None = None  # start from this trained classifier's weights (model file, run folder, checkpoint)
    masks: str | None = None  # disease masks file: attention retraining
    freeze_bn: bool = False  # BatchNorm in inference mode (statistics from the loaded weights)
    tensorboard: bool = False  # also log the epoch scalars to RUN/tensorboard
    mix: list = field(default_factory=list)  # folders of other releases whose training images are added


@dataclass(kw_only=True)
class AlignConfig(SplitConfig):
    batch: int = ranged(16, 1, 65536)
    anchor_images: int = ranged(2000, 1)
    epochs: int = ranged(5, 1, 100000)
    lr: float = ranged(1e-3, 0, 10, open_low=True)
    momentum: float = ranged(0.9, 0, 0.999)  # SGD only
    optimizer: str = chosen("sgd", OPTIMIZERS)  # the paper's; "adam" converges faster on the phantom (docs/demo.md)
    clip: float = ranged(1.0, 0, 1e6, open_low=True)  # gradient-norm clipping: no batch throws the transform far
    pool: int = ranged(16, 1, 512)
    perceptual: str | None = None  # trained classifier for the perceptual loss (model file, run, checkpoint)
    perceptual_weight: float = ranged(1.0, 0, 1e6)
    input_size: int = ranged(128, SIZE.low, 1024)
    arch: str = arch_field("resnet18")  # the alignment network's backbone (the paper's ResNet-18)
    grid_images: int = ranged(8, 1, 64)
    precision: str = chosen("auto", PRECISIONS)  # of the networks' convolutions in training (resolve_precision)

    def __post_init__(self):
        super().__post_init__()
        cells = self.size // self.pool
        if self.size % self.pool:
            raise SettingsError(f"pool {self.pool} must divide the image size {self.size}")
        if cells < MIN_POOLED_CELLS:
            raise SettingsError(f"pool {self.pool} leaves {cells} x {cells} cells of a {self.size} px image; the "
                                f"alignment loss needs at least {MIN_POOLED_CELLS} x {MIN_POOLED_CELLS} to see the "
                                f"chest's layout (a larger size or a pool of at most {self.size // MIN_POOLED_CELLS})")


@dataclass(kw_only=True)
class MasksConfig(DataConfig):
    checkpoint: str | None = None  # the trained classifier (model file, run, checkpoint) whose CAMs make the masks
    confidence: float = ranged(0.8, 0, 1)
    threshold: float = ranged(0.5, 0, 1)
    asymmetric: list = field(default_factory=lambda: list(ASYMMETRIC))
    min_images: int = ranged(5, 1)
    pseudo: bool = False
    anchor: str | None = None  # anchor.pt of dmfast align (default: the classifier's alignment run)
    size: int | None = ranged(None, SIZE.low, SIZE.high, integer=True)  # working size without a checkpoint
    precision: str = chosen("auto", PRECISIONS)  # of the classifier's CAMs, see dmfast.inference.Model
    compile: bool = False  # run the classifier under torch.compile (dmfast.models.compiled)


@dataclass(kw_only=True)
class BoxConfig(Checked):
    """How CAMs become boxes (eval and predict): thresholds on the min-max normalised CAM, boxes per CAM."""
    box_thresholds: tuple = (0.5,)
    max_boxes: int = ranged(1, 1, MAX_BOXES)
    box_score: str = chosen(BOX_SCORES[0], BOX_SCORES)  # see inference.Prediction.boxes
    # classes of an image with at least this probability get boxes in the detection outputs: 0 keeps every box, so
    # a precision-recall curve (AP, FROC) is never cut short
    box_floor: float = ranged(0.0, 0, 1)


def box_levels(thresholds, max_boxes: int) -> tuple:
    """The box thresholds as floats, after checking them and ``max_boxes`` (a clear error for bad values)."""
    range_of(BoxConfig, "max_boxes").check(max_boxes, "max_boxes")
    levels = tuple(FRACTION.check(t, "box threshold") for t in thresholds)
    if not levels:
        raise SettingsError("give at least one box threshold")
    return levels


def min_probability(value: float, name: str = "min_probability") -> float:
    """The probability a class must reach to get boxes, checked (``name``: the setting, for the message)."""
    return FRACTION.check(value, name)


@dataclass(kw_only=True)
class EvalConfig(DataConfig, BoxConfig):
    checkpoints: list = field(default_factory=list)  # [(name, path)] of trained classifiers, in table order
    masks: list = field(default_factory=list)  # [(name, path)] extra masks files for mask-only rows
    # the maps each checkpoint is scored with, a row each ("cam": the head's own; dmfast.cam_methods)
    cam_methods: tuple = field(default=CAM_METHODS[:1], metadata={"valid": lambda methods: None if methods and all(
        m in CAM_METHODS for m in methods) and len(set(methods)) == len(methods) else
        f"must be distinct names among {', '.join(CAM_METHODS)}, got {methods!r}"})
    overlays: int = ranged(2, 0, 1000)  # images per class in the overlay figures
    overlap_thresholds: tuple = DEFAULT_THRESHOLDS
    split: str | None = chosen(None, (None, *EVAL_SPLITS))  # None: see eval.select_images
    images: str | None = None  # a file of image names to score instead
    strict: bool = False  # refuse evaluation images that may share a patient with the training images (unknown)
    allow_overlap: bool = False  # score images that share a name or patient with the training images anyway
    # the pixels the boxes are in: ChestX-ray14's 1024 x 1024 ("release"), or each image's own ("image");
    # default: the release's own
    box_space: str | None = chosen(None, (None, *BOX_SPACES))
    fuse_readers: bool = False  # fuse overlapping boxes of several readers (VinDr-CXR) into one
    # the operating point: classes reaching it are the reported findings (the RSNA metric scores these boxes)
    min_probability: float = ranged(0.5, 0, 1)
    froc_iou: float = ranged(0.4, 0, 1, open_low=True)  # a detection hits a ground-truth box at IoU >= this (FROC)
    precision: str = chosen("auto", PRECISIONS)  # see dmfast.inference.Model
    compile: bool = False  # run the classifier under torch.compile (dmfast.models.compiled)
    bootstrap: int = ranged(1000, 0, 1000000)  # patient resamples for the 95% intervals (0: none)
    seed: int = ranged(0, 0, 2**32 - 1)  # of the resampling


@dataclass(kw_only=True)
class PredictConfig(BoxConfig):
    model: str  # a model file (dmfast export, RUN/model.pt), a run folder, or a dmfast train checkpoint
    inputs: list  # X-ray files and folders (searched recursively)
    out: str
    min_probability: float = ranged(0.5, 0, 1)  # classes reaching this get boxes (0: every class)
    batch: int = ranged(16, 1, 65536)
    cams: bool = False  # write cams.npz
    cam_method: str = chosen(CAM_METHODS[0], CAM_METHODS)  # the maps boxes are drawn from (dmfast.cam_methods)
    overlays: bool = False  # write one overlay PNG per image
    device: str | None = field(default=None, metadata={"valid": device_problem})  # default: CUDA when available
    precision: str = chosen("auto", PRECISIONS)  # see dmfast.inference.Model
    compile: bool = False  # run the classifier under torch.compile (dmfast.models.compiled)
    overwrite: bool = False  # replace the outputs of an earlier prediction in ``out``
    # the inputs are release folders (of this format, or "auto": detected): the images they list, not every file
    format: str | None = chosen(None, (None, "auto", *DATA_FORMATS))
    submission: str | None = chosen(None, (None, *SUBMISSIONS))  # also write a challenge's submission.csv


@dataclass(kw_only=True)
class DemoConfig(Checked):
    out: str = "out/demo"
    data: str | None = None  # a ChestX-ray14-format directory instead of the phantom
    count: int = ranged(1600, 50, 1000000)  # phantom images (fewer leave splits without every class)
    size: int = ranged(128, 64, SIZE.high)  # 64 at least: the alignment loss's 8 x 8 pooled cells
    arch: str = arch_field("resnet18")
    cam_stride: int = chosen(16, CAM_STRIDES)
    epochs: int = ranged(3, 1, 100000)
    attention_epochs: int = ranged(2, 1, 100000)
    align_epochs: int = ranged(3, 1, 100000)
    batch: int = ranged(32, 1, 65536)
    lr: float = ranged(1e-3, 0, 10, open_low=True)
    seed: int = ranged(0, 0, 2**32 - 1)
    val_fraction: float = ranged(0.15, 0.05, 0.5)  # each split needs images
    max_steps: int | None = ranged(None, 1, integer=True)  # per epoch, for quick runs
    overlays: int = ranged(2, 0, 1000)
    predict_images: int = ranged(8, 0, 10000)  # test images with boxes run through `dmfast predict` at the end
    overwrite: bool = False  # replace the outputs of an earlier demo in OUT


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
