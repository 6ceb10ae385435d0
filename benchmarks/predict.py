"""Images per second of ``dmfast predict`` against ``dmfast eval`` on the same test images of a phantom, per model
size (ResNet-50 at 128 and 512 px by default).

    python -m benchmarks.predict [--sizes 128 512] [--arch resnet50] [--images 24] [--source-scale 1]

Each size gets a phantom (its PNGs at the model's size times --source-scale), its image cache at the model's size,
and a classifier trained for one step (the weights do not change the work). eval reads the cached pixels and draws
boxes for each ground-truth class; predict decodes the PNG files (and resizes them when --source-scale is not 1)
and draws boxes for every class (``min_probability`` 0), once more with ``--overlays`` (14 panels per image: the
time an overlay costs is the difference). All are whole passes (read, classify, CAM boxes) timed by the stages
themselves, in rounds that alternate which goes first, each at its best.
"""

import tempfile
from pathlib import Path

from rich.console import Console

from dmfast import eval as eval_stage
from dmfast import checkpoints, predict, train
from dmfast.config import EvalConfig, PredictConfig, TrainConfig
from dmfast.data.cache import prepare
from dmfast.data.formats import open_dataset
from dmfast.phantom import synthesize

from .common import environment, parse, parser, report

TEST_FRACTION = 0.2  # about the phantom's share of test images


def measure(size: int, args, folder: Path, quiet: Console) -> dict:
    count = max(int(args.images / TEST_FRACTION), 40)
    data = synthesize(folder / "phantom", count=count, size=round(args.source_scale * size), seed=0, console=quiet)
    cache = prepare(data, folder / "cache", size=size, console=quiet)
    checkpoint = train.run(TrainConfig(data=str(data), out=str(folder / "run"), cache=str(cache), arch=args.arch,
                                       size=size, batch=4, epochs=1, max_steps=1, split="official"), console=quiet)
    test = checkpoints.load(checkpoint, checkpoints.CLASSIFIER)["splits"]["test"]
    dataset = open_dataset(data)
    paths = [str(dataset.paths[n]) for n in test]
    def run_eval() -> float:
        report = eval_stage.run(EvalConfig(data=str(data), out=str(folder / "eval"), cache=str(cache),
                                           checkpoints=[("m", str(checkpoint))], batch=args.batch, overlays=0,
                                           overwrite=True),
                                console=quiet)
        return report["methods"]["m"]["images_per_second"]

    def run_predict(overlays: bool = False) -> float:
        return predict.run(PredictConfig(model=str(checkpoint.parent / "model.pt"), inputs=paths,
                                         out=str(folder / "predict"), batch=args.batch, device=args.device,
                                         overlays=overlays, min_probability=0.0, overwrite=True),
                           console=quiet)["images_per_second"]

    passes = {"eval": run_eval, "predict": run_predict, "predict + overlays": lambda: run_predict(True)}
    rounds = {name: [] for name in passes}
    for k in range(args.rounds):  # rotating which goes first
        for name in list(passes)[k % len(passes):] + list(passes)[:k % len(passes)]:
            rounds[name].append(passes[name]())
    rates = {name: max(values) for name, values in rounds.items()}
    return {"images": len(paths), "images_per_second": rates, "rounds": rounds}


def run(args) -> dict:
    quiet = Console(quiet=True)
    cases, measured = {}, {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            measured[size] = measure(size, args, Path(tmp), quiet)
        rates = measured[size]["images_per_second"]
        # report() ranks by time: milliseconds per image, predict as the reference.
        case = f"{args.arch} at {size}px, {measured[size]['images']} PNGs of {round(args.source_scale * size)}px"
        cases[case] = {k: 1e3 / v for k, v in rates.items()}
        drawing = 1 / rates["predict + overlays"] - 1 / rates["predict"]
        measured[size]["overlay_seconds_per_image"] = drawing
        print(f"{size}px: eval {rates['eval']:.1f} images/s, predict {rates['predict']:.1f} images/s, overlays "
              f"{drawing:.3f} s per image (14 panels each)")
    config = {"arch": args.arch, "batch": args.batch, "sizes": args.sizes, "source_scale": args.source_scale,
              "measured": measured}
    return report("predict vs eval (ms per image)", cases, "predict", environment(args.device, args.threads), config,
                  args.out)


def parse_args(argv=None):
    p = parser(__doc__, rounds=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--images", type=int, default=48, help="test images wanted (the phantom is sized for them)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--source-scale", type=float, default=1.0, help="PNG side / model input side")
    return parse(p, "predict", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
