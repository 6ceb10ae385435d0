"""``dmfast``: one click command per pipeline stage."""

import sys
from pathlib import Path

import click

import dmfast

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dmfast.__version__, prog_name="dmfast")
def main():
    """Weakly supervised thoracic disease localization via disease masks (Kim, Jung, Lee)."""


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", default=2000, show_default=True, help="Number of images.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-finding", default=0.4, show_default=True, help="Fraction of images without findings.")
def synth(out_dir, count, size, seed, no_finding):
    """Write a synthetic chest-phantom dataset in ChestX-ray14 format to OUT_DIR."""
    from dmfast.data.phantom import synthesize

    _run(lambda: synthesize(out_dir, count=count, size=size, seed=seed, no_finding=no_finding))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--size", default=512, show_default=True, help="Working image size (the paper's is 512).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache folder [default: DATA_DIR/cache-SIZE, or ~/.cache/dmfast/... if DATA_DIR is read-only].")
@click.option("--workers", default=0, help="Decoding processes [default: all cores].")
@click.option("--skip-problems", is_flag=True, help="Leave out missing or unreadable images instead of stopping.")
def prepare(data_dir, size, cache_dir, workers, skip_problems):
    """Decode and resize every image of DATA_DIR once into a memory-mapped cache (resumable)."""
    from dmfast.data.cache import prepare as prepare_cache

    _run(lambda: prepare_cache(data_dir, cache_dir, size=size, workers=workers or None, skip_problems=skip_problems))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, metrics).")
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Image cache [default: see prepare].")
@click.option("--arch", default="resnet50", show_default=True, type=click.Choice(["resnet18", "resnet34", "resnet50"]))
@click.option("--cam-stride", default=32, show_default=True, type=int,
              help="Output stride of the CAMs (16: conv5_x without downsampling, finer maps).")
@click.option("--size", default=512, show_default=True, help="Image size.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--batch", default=32, show_default=True, help="Global batch size.")
@click.option("--lr", default=1e-4, show_default=True, help="Adam learning rate.")
@click.option("--lr-decay", default=1.0, show_default=True, help="Per-epoch learning-rate factor.")
@click.option("--seed", default=0, show_default=True)
@click.option("--val-fraction", default=0.1, show_default=True, help="Patients of train_val held out for validation.")
@click.option("--split", default="official", show_default=True, type=click.Choice(["official", "patients"]))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="torchvision-format state dict.")
@click.option("--pretrained", is_flag=True, help="Ask torchvision for ImageNet weights (needs a network).")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA).")
@click.option("--aligned", type=click.Path(exists=True, dir_okay=False), help="Alignment checkpoint.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), help="Start from a classifier checkpoint.")
@click.option("--masks", type=click.Path(exists=True, dir_okay=False), help="Disease masks: attention retraining.")
@click.option("--freeze-bn", is_flag=True, help="Keep BatchNorm statistics fixed.")
@click.option("--max-steps", type=int, default=None, help="Steps per epoch at most (quick runs).")
@click.option("--skip-problems", is_flag=True, help="Leave out missing or unreadable images.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
def train(data_dir, out, resume, **options):
    """Train the CAM classifier with weighted BCE on DATA_DIR (runs under torchrun for DDP)."""
    from dmfast.train import TrainConfig, train as run_training

    _run(lambda: run_training(TrainConfig(data=data_dir, out=out, **options), resume=resume))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Image cache [default: see prepare].")
@click.option("--size", default=512, show_default=True, help="Image size.")
@click.option("--anchor-images", default=2000, show_default=True, help="No Finding images averaged into the anchor.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]),
              help="SGD with momentum 0.9 (the paper's) or Adam (faster on the phantom).")
@click.option("--pool", default=16, show_default=True, help="Smoothing pool of the loss (phi = B(G(affine(I)))).")
@click.option("--perceptual", type=click.Path(exists=True, dir_okay=False),
              help="Classifier checkpoint (dmfast train) for the perceptual loss.")
@click.option("--perceptual-weight", default=1.0, show_default=True)
@click.option("--input-size", default=128, show_default=True, help="Resolution the alignment network sees.")
@click.option("--seed", default=0, show_default=True)
@click.option("--split", default="official", show_default=True, type=click.Choice(["official", "patients"]))
@click.option("--max-steps", type=int, default=None, help="Steps per epoch at most (quick runs).")
@click.option("--skip-problems", is_flag=True, help="Leave out missing or unreadable images.")
def align(data_dir, out, **options):
    """Train the alignment module on DATA_DIR: anchor image, checkpoint, before/after grid, statistics."""
    from dmfast.align import AlignConfig, align as run_alignment

    _run(lambda: run_alignment(AlignConfig(data=data_dir, out=out, **options)))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for masks.pt/.png/.json.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Trained classifier (dmfast train) whose CAMs make the disease masks.")
@click.option("--pseudo", is_flag=True, help="Pseudo disease masks from the anchor's anatomy instead (section 4.4).")
@click.option("--anchor", type=click.Path(exists=True, dir_okay=False),
              help="anchor.pt of dmfast align [default: the classifier's alignment run, else the mean of the "
                   "No Finding training images].")
@click.option("--confidence", default=0.8, show_default=True, help="Keep images with P_c at least this.")
@click.option("--threshold", default=0.5, show_default=True,
              help="Mask where the normalised average CAM reaches this.")
@click.option("--asymmetric", default="Cardiomegaly", show_default=True,
              help="Comma-separated classes whose CAMs are not mirrored (Eq. 3); '' for none.")
@click.option("--min-images", default=5, show_default=True,
              help="Fewer confident images than this: use this many most probable labelled images.")
@click.option("--size", type=int, default=None, help="Working size with --pseudo and no --checkpoint [512].")
@click.option("--batch", default=32, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Image cache [default: see prepare].")
@click.option("--skip-problems", is_flag=True, help="Leave out missing or unreadable images.")
def masks(data_dir, out, asymmetric, **options):
    """Average confident CAMs into per-disease masks (or draw pseudo masks from anatomy), with a figure."""
    from dmfast.masks import MasksConfig, masks as make_masks

    classes = [c.strip() for c in asymmetric.split(",") if c.strip()]
    _run(lambda: make_masks(MasksConfig(data=data_dir, out=out, asymmetric=classes, **options)))


def _named_paths(values, option: str) -> list:
    """NAME=PATH pairs (a bare PATH is named after its folder)."""
    pairs = []
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else (Path(value).parent.name, "", value)
        if not Path(path).is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint=option)
        pairs.append((name or Path(path).parent.name, path))
    return pairs


@main.command(name="eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="NAME=PATH of a dmfast train checkpoint; repeat to compare (table order).")
@click.option("--masks", "masks_files", multiple=True, help="NAME=PATH of a masks file: an extra mask-only row.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for eval.json/.md, overlays.")
@click.option("--box-threshold", default="0.5", show_default=True,
              help="CAM threshold(s) for boxes, comma-separated fractions, or 'wang' for 60/255,180/255.")
@click.option("--max-boxes", default=1, show_default=True, help="Boxes per CAM (best first).")
@click.option("--overlays", default=2, show_default=True, help="Overlay images per class (0: none).")
@click.option("--batch", default=32, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Image cache [default: see prepare].")
@click.option("--skip-problems", is_flag=True, help="Leave out missing or unreadable images.")
def evaluate(data_dir, checkpoints, masks_files, box_threshold, **options):
    """Score AUROC and box localization (IoU, IoBB, AFP) of checkpoints side by side, with overlays."""
    from dmfast.eval import WANG_THRESHOLDS, EvalConfig, evaluate as run_eval

    if box_threshold.strip().lower() == "wang":
        levels = WANG_THRESHOLDS
    else:
        try:
            levels = tuple(float(t) for t in box_threshold.split(","))
        except ValueError:
            raise click.BadParameter(f"{box_threshold!r} is neither fractions nor 'wang'", param_hint="--box-threshold")
    config = EvalConfig(data=data_dir, checkpoints=_named_paths(checkpoints, "--checkpoint"),
                        masks=_named_paths(masks_files, "--masks"), box_thresholds=levels, **options)
    _run(lambda: run_eval(config))


def _run(job):
    """Run a command's job, turning data problems into a clear message and exit status 1."""
    from dmfast.data.chestxray14 import DataError

    try:
        return job()
    except (DataError, ValueError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every stage's outputs.")
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="A ChestX-ray14-format directory (patient-grouped split) instead of the phantom.")
@click.option("--count", default=1600, show_default=True, help="Phantom images.")
@click.option("--size", default=128, show_default=True, help="Working image size.")
@click.option("--arch", default="resnet18", show_default=True, type=click.Choice(["resnet18", "resnet34", "resnet50"]))
@click.option("--cam-stride", default=16, show_default=True, type=int)
@click.option("--epochs", default=3, show_default=True, help="Epochs of the base and aligned classifiers.")
@click.option("--attention-epochs", default=2, show_default=True, help="Epochs of attention retraining.")
@click.option("--align-epochs", default=3, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Steps per epoch at most (quick runs).")
@click.option("--overlays", default=2, show_default=True, help="Overlay images per class.")
def demo(**options):
    """Phantom (or --data) -> base -> align -> aligned -> masks -> attention (DM, PDM) -> eval, with the ablation."""
    from dmfast.demo import DemoConfig, run_demo

    _run(lambda: run_demo(DemoConfig(**options)))


if __name__ == "__main__":
    main()
