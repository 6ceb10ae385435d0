"""``dmfast``: one click command per pipeline stage."""

import sys

import click

import dmfast

PENDING = {
    "align": "train the alignment module and warp X-rays onto the canonical chest",
    "train": "train the CAM classifier with weighted BCE (optionally with disease-mask attention)",
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


def _run(job):
    """Run a command's job, turning data problems into a clear message and exit status 1."""
    from dmfast.data.chestxray14 import DataError

    try:
        return job()
    except (DataError, ValueError) as error:
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
