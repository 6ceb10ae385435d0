"""``dmfast``: one click command per pipeline stage. Every option's default comes from the stage's config
dataclass (:mod:`dmfast.config`) or function, so it is written once."""

import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import click

import dmfast
from dmfast import phantom
from dmfast.config import (ARCHS, CAM_METHODS, DATA_FORMATS, FRACTION, PRECISIONS, SIZE, SUBMISSIONS, TIMM,
                           WANG_THRESHOLDS, AlignConfig, BoxConfig, DemoConfig, EvalConfig, MasksConfig, PredictConfig,
                           Range, SplitConfig, TrainConfig, defaults, metadata_of)
from dmfast.data.cache import WORKERS
from dmfast.data.cache import prepare as prepare_cache
from dmfast.errors import Error
from dmfast.phantom import synthesize

FILE = click.Path(exists=True, dir_okay=False)
TRAINED = click.Path(exists=True)  # a trained classifier: model file, run folder, checkpoint.pt or best.pt
TRAINED_HELP = ("a model file, a dmfast train run folder (its model.pt, else its checkpoint.pt), a checkpoint.pt or "
                "a best.pt")
FOLDER = click.Path(file_okay=False)
DATA_DIR = click.argument("data_dir", type=click.Path(exists=True, file_okay=False))


class Number(click.ParamType):
    """A command-line number within a :class:`dmfast.config.Range` (ints, or finite floats: never NaN)."""

    def __init__(self, valid: Range):
        self.valid = valid
        self.name = "integer" if valid.integer else "float"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = int(value) if self.valid.integer else float(value)
            except ValueError:
                self.fail(f"{value!r} is not {self.valid.describe()}", param, ctx)
        problem = self.valid.problem(value)
        if problem:
            self.fail(problem, param, ctx)
        return int(value) if self.valid.integer else float(value)


class Valid(click.ParamType):
    """Text that ``problem`` (a function returning what is wrong, or None) accepts, e.g. a backbone's name."""

    name = "text"

    def __init__(self, problem):
        self.problem = problem

    def convert(self, value, param, ctx):
        if self.problem(value):
            self.fail(self.problem(value), param, ctx)
        return value


def option(owner, name: str, flag: str | None = None, **kwargs):
    """``--name`` (or ``flag``) for field ``name`` of a config dataclass (or keyword of a function), with its
    default, and its range or choices from the field."""
    default = defaults(owner)[name]
    flag = flag or "--" + name.replace("_", "-")
    if isinstance(default, bool):
        return click.option(flag, name, is_flag=True, default=default, **kwargs)
    metadata = metadata_of(owner, name)
    if "range" in metadata:
        kwargs.setdefault("type", Number(metadata["range"]))
    if "valid" in metadata:
        kwargs.setdefault("type", Valid(metadata["valid"]))
    if "choices" in metadata:
        choices = metadata["choices"]
        kwargs.setdefault("type", click.Choice([str(c) for c in choices if c is not None]))  # None: not given
        if all(isinstance(c, int) for c in choices):  # e.g. the CAM stride: given as text, used as an int
            kwargs.setdefault("callback", lambda ctx, param, value: None if value is None else int(value))
    kwargs.setdefault("show_default", default is not None)
    return click.option(flag, name, default=default, **kwargs)


def options(owner, *specs):
    """Several :func:`option` decorators; a spec is a field name or ``(name, {click keyword arguments})``."""
    def decorate(function):
        for spec in reversed(specs):
            name, kwargs = (spec, {}) if isinstance(spec, str) else spec
            function = option(owner, name, **kwargs)(function)
        return function
    return decorate


def _expected(error: BaseException) -> bool:
    """Whether ``error`` is about the input rather than a bug: one of dmfast's errors (:class:`dmfast.errors.Error`:
    data, images, model files, settings), the file system's answer (OSError) or a lack of memory."""
    import torch

    return isinstance(error, (Error, OSError, MemoryError, torch.OutOfMemoryError))


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return f"out of memory ({str(error).splitlines()[0] if str(error) else 'MemoryError'}): try a smaller --batch"
    return str(error)


def _save_traceback(error: BaseException) -> str:
    """Where the traceback of ``error`` was saved (the system's temporary folder), or, when it cannot be, the
    traceback itself."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        folder = Path(tempfile.gettempdir()) / "dmfast-errors"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(f"dmfast {dmfast.__version__}: {' '.join(sys.argv)}\n\n{text}")
        return str(path)
    except OSError:
        return f"(not saved: the temporary folder is not writable)\n{text}"


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one line of dmfast's: the file being decoded when there is one, and the library."""
    from dmfast.data.images import decoding_file

    parts = Path(filename).parts
    library = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else None
    where = decoding_file()
    text = " ".join(str(message).split())[:300]
    click.echo(f"note: {f'{where}: ' if where else ''}{text}{f' ({library})' if library else ''}", err=True)


class Group(click.Group):
    """The command group: no Python traceback reaches the user. An error about the input (data, files, settings)
    prints ``error: ...`` and exits 1; anything else (a bug) prints a short message and the path of a saved
    traceback (``DMFAST_TRACEBACK=1`` shows it instead)."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = _note
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as error:
            if os.environ.get("DMFAST_TRACEBACK"):
                raise
            if _expected(error):
                click.echo(f"error: {_message(error)}", err=True)
            else:
                first = (str(error).strip().splitlines() or [""])[0][:300]
                click.echo(f"error: unexpected {type(error).__name__}: {first}\n(an unforeseen case, please report "
                           f"it: the traceback is in {_save_traceback(error)})", err=True)
            sys.exit(1)


CACHE = ("cache", {"type": FOLDER, "help": "Image cache [default: DATA_DIR/cache-SIZE, or ~/.cache/dmfast/... if "
                                            "DATA_DIR is read-only]."})
SKIP = ("skip_problems", {"help": "Leave out missing or unreadable images instead of stopping."})
MAX_STEPS = ("max_steps", {"help": "Steps per epoch at most (quick runs)."})
FORMAT = ("format", {"type": click.Choice(DATA_FORMATS), "help": "The release's layout (docs/datasets.md) "
                     "[default: detected from DATA_DIR]."})
UNCERTAIN = ("uncertain", {"help": "Uncertain labels (-1: CheXpert, MIMIC-CXR, csv): unknown (ignore, left out of "
                                   "loss and AUROC), positive or negative."})
BLANK = ("blank", {"help": "Blank label cells (finding not mentioned): unknown or negative."})
LABELS = (FORMAT, UNCERTAIN, BLANK)
SPLIT = ("split", {"help": "The official test list, or a patient-grouped split (data without official lists)."})
ARCH = ("arch", {"help": f"The backbone: {', '.join(ARCHS)}, or {TIMM}MODEL for a timm model "
                         "(pip install 'dmfast[timm]'; e.g. timm:convnext_tiny)."})


def out_option(help: str):
    return click.option("--out", required=True, type=FOLDER, help=help)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dmfast.__version__, prog_name="dmfast")
def main():
    """Weakly supervised thoracic disease localization via disease masks (Kim, Jung, Lee)."""


OVERWRITE = ("overwrite", {"help": "Replace the outputs of an earlier run in --out (never done without it)."})
PRECISION = ("precision", {"type": click.Choice(PRECISIONS),
                            "help": "The classifier's arithmetic: fp32, or its backbone in bf16 (CPUs with AMX or "
                                    "AVX512-BF16, GPUs) or fp16 (GPUs) under autocast, channels_last; auto: bf16 on "
                                    "GPUs (fp16 before Ampere) and on CPUs with native bf16, else fp32."})
COMPILE = ("compile", {"help": "Run the classifier under torch.compile: its first batch of each shape compiles "
                               "(minutes), later ones run faster where the compiler helps (GPUs)."})
TRAINING_PRECISION = ("precision", {"type": click.Choice(PRECISIONS),
                                    "help": "The networks' arithmetic in training: fp32, or bf16 (CPUs with AMX or "
                                            "AVX512-BF16, GPUs) / fp16 (GPUs, with a gradient scaler) under autocast, "
                                            "channels_last; auto: bf16 on GPUs (fp16 before Ampere), fp32 on CPUs."})


@main.command()
@click.argument("out_dir", type=FOLDER)
@options(synthesize, *((name, {"type": Number(phantom.RANGES[name]), "help": text}) for name, text in (
    ("count", "Number of images."), ("size", "Image side in pixels."), ("seed", "Random seed."),
    ("no_finding", "Fraction of images without findings."))),
         ("overwrite", {"help": "Replace an earlier phantom in OUT_DIR (never done without it)."}))
def synth(out_dir, **kwargs):
    """Write a synthetic chest-phantom dataset in ChestX-ray14 format to OUT_DIR."""
    synthesize(out_dir, **kwargs)


@main.command()
@DATA_DIR
@options(prepare_cache, ("size", {"type": Number(SIZE), "help": "Working image size (the paper's is 512)."}), FORMAT,
         ("cache_dir", {**CACHE[1], "flag": "--cache"}),
         ("workers", {"type": Number(WORKERS), "help": "Decoding processes [default: all cores]."}), SKIP)
def prepare(data_dir, **kwargs):
    """Decode and resize every image of DATA_DIR once into a memory-mapped cache (resumable)."""
    prepare_cache(data_dir, **kwargs)


@main.command()
@DATA_DIR
@out_option("Run folder (checkpoints, metrics).")
@options(TrainConfig, CACHE, ARCH,
         ("cam_stride", {"help": "Output stride of the CAMs (16: conv5_x without downsampling, finer maps)."}),
         ("size", {"help": "Image size."}), "epochs", ("batch", {"help": "Global batch size."}),
         ("lr", {"help": "Learning rate."}), ("lr_decay", {"help": "Per-epoch learning-rate factor."}),
         ("optimizer", {"help": "Adam (the paper's) or SGD, momentum 0.9."}),
         "seed", ("val_fraction", {"help": "Patients of train_val held out for validation."}), SPLIT,
         ("weights", {"type": FILE, "help": "torchvision-format state dict."}),
         ("pretrained", {"help": "Ask torchvision for ImageNet weights (needs a network)."}),
         ("amp", {"help": "Mixed precision: the same as --precision fp16 (CUDA; no effect on the CPU)."}),
         TRAINING_PRECISION,
         ("fp32_steps", {"help": "Train the first N steps in float32 before bf16 / fp16 take over (a fresh "
                                 "network's gradients are the ones they blur; docs/performance.md)."}), COMPILE,
         ("aligned", {"type": FILE, "help": "Alignment checkpoint."}),
         ("init", {"type": TRAINED, "help": f"Start from the weights of a trained classifier: {TRAINED_HELP}."}),
         ("masks", {"type": FILE, "help": "Disease masks: attention retraining."}),
         ("freeze_bn", {"help": "Keep BatchNorm statistics fixed."}),
         ("tensorboard", {"help": "Also log loss and validation AUROC to OUT/tensorboard (dmfast[tensorboard])."}),
         ("mix", {"multiple": True, "type": click.Path(exists=True, file_okay=False),
                  "help": "Another release's folder whose training images are added (format detected; labels it "
                          "lacks are unknown). Repeatable."}),
         *LABELS, MAX_STEPS, SKIP, OVERWRITE)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt (with its settings; a model file "
              "holds no optimiser state: start from it with --init).")
def train(data_dir, resume, **kwargs):
    """Train the CAM classifier with weighted BCE on DATA_DIR (runs under torchrun for DDP)."""
    import dmfast.train

    from click.core import ParameterSource

    context = click.get_current_context()
    given = {name for name in kwargs if context.get_parameter_source(name) != ParameterSource.DEFAULT}
    dmfast.train.run(TrainConfig(data=data_dir, **{**kwargs, "mix": list(kwargs["mix"])}), resume=resume,
                     given=given)


@main.command()
@DATA_DIR
@out_option("Run folder (checkpoint, anchor, grid, statistics).")
@options(AlignConfig, CACHE, ("size", {"help": "Image size."}),
         ("anchor_images", {"help": "No Finding images averaged into the anchor."}), "epochs", "batch", "lr",
         ("optimizer", {"help": "SGD with momentum (the paper's) or Adam (faster on the phantom)."}), "momentum",
         ("clip", {"help": "Gradient-norm clipping."}),
         ("pool", {"help": "Smoothing pool of the loss (phi = B(G(affine(I))))."}),
         ("perceptual", {"type": TRAINED, "help": f"Trained classifier for the perceptual loss: {TRAINED_HELP}."}),
         "perceptual_weight", ("input_size", {"help": "Resolution the alignment network sees."}),
         ("arch", {"help": "The alignment network's backbone (the paper's resnet18; any --arch of train)."}), "seed",
         "val_fraction", SPLIT, ("grid_images", {"help": "Validation images in the before/after grid."}),
         TRAINING_PRECISION, *LABELS, MAX_STEPS, SKIP, OVERWRITE)
def align(data_dir, **kwargs):
    """Train the alignment module on DATA_DIR: anchor image, checkpoint, before/after grid, statistics."""
    import dmfast.align

    dmfast.align.run(AlignConfig(data=data_dir, **kwargs))


@main.command()
@DATA_DIR
@out_option("Folder for masks.pt/.png/.json.")
@options(MasksConfig, ("checkpoint", {"type": TRAINED, "help": "Trained classifier whose CAMs (over its training "
                                                               f"images) make the disease masks: {TRAINED_HELP}."}),
         ("pseudo", {"help": "Pseudo disease masks from the anchor's anatomy instead (section 4.4)."}),
         ("anchor", {"type": FILE, "help": "anchor.pt of dmfast align [default: the classifier's alignment run, "
                                           "else the mean of the No Finding training images]."}),
         ("confidence", {"help": "Keep images with P_c at least this."}),
         ("threshold", {"help": "Mask where the normalised average CAM reaches this."}),
         ("min_images", {"help": "Fewer confident images than this: use this many most probable labelled images."}),
         ("size", {"help": f"Working size with --pseudo and no --checkpoint [{SplitConfig.size}]."}),
         "batch", CACHE, *LABELS, SKIP, OVERWRITE, PRECISION, COMPILE)
@click.option("--asymmetric", default=",".join(defaults(MasksConfig)["asymmetric"]), show_default=True,
              help="Comma-separated classes whose CAMs are not mirrored (Eq. 3); '' for none.")
def masks(data_dir, asymmetric, **kwargs):
    """Average confident CAMs into per-disease masks (or draw pseudo masks from anatomy), with a figure."""
    import dmfast.masks

    from dmfast.data.dataset import FINDINGS

    classes = [c.strip() for c in asymmetric.split(",") if c.strip()]
    unknown = [c for c in classes if c not in FINDINGS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not among the classes ({', '.join(FINDINGS)})",
                                 param_hint="--asymmetric")
    dmfast.masks.run(MasksConfig(data=data_dir, asymmetric=classes, **kwargs))


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The model file to write.")
@click.option("--half", is_flag=True, help="Store the weights as float16 (half the size).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def export(source, out, half, overwrite):
    """Write the portable model file of a trained classifier SOURCE (run folder, checkpoint.pt, best.pt, or a model
    file to write again, e.g. --half): weights only, the alignment network and anchor embedded, with the run's
    settings, splits and training patients for eval's overlap check; use it with dmfast predict or
    dmfast.load_model."""
    from dmfast.inference import export_model

    click.echo(f"model file {export_model(source, out, half, overwrite, warn=lambda m: click.echo(f'warning: {m}'))}")


def _named_paths(values, option_name: str, folders: bool = False) -> list:
    """NAME=PATH pairs (a bare PATH is named after its run: a file after its folder, a folder after itself); with
    ``folders``, PATH may be a (run) folder."""
    pairs = []
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        if not (Path(path).is_file() or folders and Path(path).is_dir()):
            raise click.BadParameter(f"{path} is not a file" + (" or folder" if folders else ""),
                                     param_hint=option_name)
        run = Path(path).resolve()
        pairs.append((name or (run.name if run.is_dir() else run.parent.name), path))
    return pairs


def _box_thresholds(value: str) -> tuple:
    if value.strip().lower() == "wang":
        return WANG_THRESHOLDS
    try:
        levels = tuple(float(t) for t in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither fractions nor 'wang'", param_hint="--box-threshold") from None
    for level in levels:
        if FRACTION.problem(level):
            raise click.BadParameter(f"each threshold {FRACTION.problem(level)}", param_hint="--box-threshold")
    return levels


BOX_THRESHOLD = click.option(
    "--box-threshold", "box_threshold", default=",".join(f"{t:g}" for t in defaults(BoxConfig)["box_thresholds"]),
    show_default=True, help="CAM threshold(s) for boxes, comma-separated fractions, or 'wang' for 60/255,180/255.")
MAX_BOXES = ("max_boxes", {"help": "Boxes per CAM (best first)."})
BOX_SCORE = ("box_score", {"help": "A box's confidence: the class probability times the mean (or peak) normalised "
                                   "CAM inside its region, or the probability alone."})
BOX_FLOOR = ("box_floor", {"help": "Classes of an image with at least this probability get boxes in the detection "
                                   "outputs (0: every class, so no precision-recall curve is cut short)."})


@main.command(name="eval")
@DATA_DIR
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="NAME=PATH of a trained model (model file, run folder, checkpoint.pt or best.pt); repeat to "
                   "compare (table order).")
@click.option("--masks", "masks_files", multiple=True, help="NAME=PATH of a masks file: an extra mask-only row.")
@click.option("--cam", "cam_methods", multiple=True, type=click.Choice(CAM_METHODS), default=CAM_METHODS[:1],
              show_default=True, help="The maps each checkpoint's boxes come from, a row each (repeat): its own CAM "
                                      "(with its disease masks), Grad-CAM, Grad-CAM++ or Eigen-CAM (gradient-free).")
@out_option("Folder for eval.json/.md and the overlays.")
@BOX_THRESHOLD
@options(EvalConfig, MAX_BOXES, BOX_SCORE, BOX_FLOOR,
         ("min_probability", {"help": "The operating point: classes reaching it are the reported findings (the RSNA "
                                      "metric scores their boxes)."}),
         ("froc_iou", {"help": "A detection hits a ground-truth box of its class at IoU >= this (FROC)."}),
         ("overlays", {"help": "Overlay images per class (0: none)."}), "batch", CACHE, SKIP,
         OVERWRITE, ("split", {"help": "Which of DATA_DIR's images to score [default: the checkpoint's test split when "
                            "DATA_DIR is its training data, else DATA_DIR's test_list.txt]."}),
         ("images", {"type": FILE, "help": "A file of image names (one per line) to score instead."}),
         ("strict", {"help": "Stop when it cannot be told whether evaluation images share a patient with the "
                             "training images (their data is not here)."}),
         ("allow_overlap", {"help": "Score images that share a name or patient with the training images anyway."}),
         ("box_space", {"help": "Pixels of the boxes: the 1024 x 1024 release images (ChestX-ray14's BBox_List_2017"
                                ".csv) or each stored image's own [default: the release's own]."}),
         ("fuse_readers", {"help": "Fuse overlapping boxes of several readers (VinDr-CXR) into one box (IoU >= "
                                   "0.5, mean corners) before scoring."}), *LABELS,
         ("bootstrap", {"help": "Patient resamples for the 95% intervals and paired differences (0: none)."}),
         ("seed", {"help": "Seed of the resampling."}), PRECISION, COMPILE)
def evaluate(data_dir, checkpoints, masks_files, box_threshold, **kwargs):
    """Score AUROC, box localization (IoU, IoBB, AFP) and detection (COCO AP, VinBigData mAP@0.4, RSNA, FROC) of
    trained models side by side, with patient-bootstrap intervals, COCO files and overlays."""
    import dmfast.eval

    if kwargs.get("images") and kwargs.get("split"):
        raise click.UsageError("give --images or --split, not both")
    config = EvalConfig(data=data_dir, checkpoints=_named_paths(checkpoints, "--checkpoint", folders=True),
                        masks=_named_paths(masks_files, "--masks"), box_thresholds=_box_thresholds(box_threshold),
                        **kwargs)
    dmfast.eval.run(config)


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@out_option("Folder for predictions.csv/.json, problems.csv, cams.npz and overlays/.")
@BOX_THRESHOLD
@options(PredictConfig, ("min_probability", {"help": "Report the boxes of classes with at least this probability "
                                                      "(0: all)."}),
         MAX_BOXES, BOX_SCORE, BOX_FLOOR, ("batch", {"help": "Images per forward pass."}),
         ("submission", {"type": click.Choice(SUBMISSIONS),
                         "help": "Also write the VinBigData or RSNA Pneumonia challenge's submission.csv (the reported "
                                 "findings' boxes; image ids are the file names without suffix)."}),
         ("cams", {"help": "Also write every class's CAM per image to cams.npz."}),
         ("cam_method", {"flag": "--cam", "help": "The maps the boxes come from: the model's own CAM, Grad-CAM, "
                                                  "Grad-CAM++ or Eigen-CAM."}),
         ("overlays", {"help": "Also write one overlay PNG per image (CAMs, boxes, probabilities)."}),
         ("device", {"help": "cpu, cuda or cuda:N [default: cuda when available]."}),
         PRECISION, COMPILE,
         ("format", {"help": "INPUTS are release folders (of this layout, or auto: detected): predict the images each "
                             "lists (its frontal X-rays) instead of every image file."}), OVERWRITE)
def predict(model, inputs, box_threshold, **kwargs):
    """Probabilities, CAMs and boxes of a trained MODEL (model file, run folder or checkpoint) for X-ray INPUTS:
    PNG, JPEG and DICOM files, or folders of them (recursive). Boxes are in each image's own pixels."""
    import dmfast.predict

    config = PredictConfig(model=model, inputs=list(inputs), box_thresholds=_box_thresholds(box_threshold),
                           **kwargs)
    dmfast.predict.run(config)


@main.command()
@options(DemoConfig, ("out", {"type": FOLDER, "help": "Folder for every stage's outputs."}),
         ("data", {"type": click.Path(exists=True, file_okay=False),
                   "help": "A ChestX-ray14-format directory (patient-grouped split) instead of the phantom."}),
         ("count", {"help": "Phantom images."}), ("size", {"help": "Working image size."}),
         ARCH, "cam_stride",
         ("epochs", {"help": "Epochs of the base and aligned classifiers."}),
         ("attention_epochs", {"help": "Epochs of attention retraining."}), "align_epochs", "batch", "lr", "seed",
         "val_fraction", MAX_STEPS, ("overlays", {"help": "Overlay images per class."}),
         ("predict_images", {"help": "Test images with boxes run through dmfast predict at the end."}), OVERWRITE)
def demo(**kwargs):
    """Phantom (or --data) -> base -> align -> aligned -> masks -> attention (DM, PDM) -> eval, with the ablation."""
    import dmfast.demo

    dmfast.demo.run(DemoConfig(**kwargs))


if __name__ == "__main__":
    main()
