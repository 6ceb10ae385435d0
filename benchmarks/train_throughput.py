"""Training throughput of ``dmfast train`` as a user runs it (the batch loader over the image cache, the precision
default, channels_last) and whether it is data-bound: images/s of the training steps and the share of their time
spent waiting for batches.

    python -m benchmarks.train_throughput [--arch resnet50] [--size 512] [--batch 64] [--steps 30] [--images 1024]

A phantom of ``--images`` images at ``--size`` px is written and prepared in a temporary folder; one epoch of
``--steps`` steps runs on the default device (CUDA when there is one: what ``benchmarks/gpu_check.sh`` reports).
"""

import json
import tempfile
from pathlib import Path

from rich.console import Console

from dmfast import ops, train
from dmfast.config import TrainConfig
from dmfast.data.cache import prepare
from dmfast.phantom import synthesize
from dmfast.io import atomic_write_json
from dmfast.models import resolve_precision

from .common import environment, parse, parser


def run(args) -> dict:
    quiet = Console(quiet=True)
    device = ops.default_device()
    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(Path(tmp) / "phantom", count=args.images, size=args.size, seed=0, console=quiet)
        cache = prepare(data, Path(tmp) / "cache", size=args.size, console=quiet)
        train.run(TrainConfig(data=str(data), out=str(Path(tmp) / "run"), cache=str(cache), arch=args.arch,
                              size=args.size, batch=args.batch, epochs=1, max_steps=args.steps, split="official",
                              precision=args.precision, compile=args.compile, fp32_steps=0),  # steady state
                  console=quiet)
        epoch = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    waiting = epoch["data_wait_seconds"] / epoch["step_seconds"]
    result = {"images_per_second": epoch["images_per_second"], "step_seconds": epoch["step_seconds"],
              "data_wait_seconds": epoch["data_wait_seconds"], "data_wait_share": waiting,
              "validation_seconds": epoch.get("validation_seconds"),
              "precision": resolve_precision(args.precision, device, training=True)}
    print(f"{args.arch} at {args.size} px, batch {args.batch}, {result['precision']} on {device}: "
          f"{result['images_per_second']:.1f} images/s; waiting for batches {waiting:.1%} of the step time "
          f"({'data-bound' if waiting > 0.1 else 'compute-bound'})")
    env = environment(device.type, args.threads)
    payload = {"benchmark": "train_throughput", "environment": env,
               "config": {k: v for k, v in vars(args).items() if k != "out"}, "result": result}
    atomic_write_json(args.out, payload, indent=2)
    return payload


def parse_args(argv=None):
    p = parser(__doc__, rounds=1)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=1024, help="phantom images (the loader draws batches from them)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    return parse(p, "train_throughput", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
