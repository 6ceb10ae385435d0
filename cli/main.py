"""``dmfast``: one click command per pipeline stage."""

import sys

import click

import dmfast

PENDING = {
    "masks": "average confident class activation maps into per-disease masks",
    "eval": "score AUROC and box localization accuracy",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dmfast.__version__, prog_name="dmfast")
def main():
    """Weakly supervised thoracic disease localization via disease masks (Kim, Jung, Lee)."""


def _pending(name: str, summary: str) -> click.Command:
    @click.command(name, help=f"{summary[0].upper()}{summary[1:]}. (Not implemented yet.)",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command():
        click.echo(f"dmfast {name}: not implemented yet", err=True)
        sys.exit(2)

    return command


for _name, _summary in PENDING.items():
    main.add_command(_pending(_name, _summary))


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


def _run(job):
    """Run a command's job, turning data problems into a clear message and exit status 1."""
    from dmfast.data.chestxray14 import DataError

    try:
        return job()
    except (DataError, ValueError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)


@main.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the figure.")
@click.option("--size", default=512, show_default=True, help="Side of the generated image (multiple of --pool).")
@click.option("--pool", default=16, show_default=True, help="Pooling window of the smoothed warp.")
@click.option("--seed", default=0, show_default=True)
def demo(out_dir, size, pool, seed):
    """Run the fused warp on a generated chest-like image and write a before/after figure."""
    from dmfast.demo import run_demo

    run_demo(out_dir, size=size, pool=pool, seed=seed)


if __name__ == "__main__":
    main()
