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
