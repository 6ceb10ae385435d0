"""Images per second of dmfast's classifier in float32 and bf16, each in the contiguous and the channels_last
layout: inference (probabilities and CAMs) and a training step (forward, weighted BCE, backward, Adam), with how far
bf16's probabilities lie from float32's on the same weights and images.

    python -m benchmarks.precision [--arch resnet50] [--size 256] [--batch 8] [--train-arch resnet18]
                                   [--train-size 128] [--train-batch 32]

``--precision bf16`` in dmfast means bf16 autocast in channels_last; the other two rows say what each half of that
contributes. The network is the CAM classifier with random weights (the arithmetic does not depend on them); the
images are phantom X-rays.

With ``--models out/demo`` (the default, when ``make demo`` has written it) it also times whole passes on trained
models, float32 against bf16 in alternating rounds: ``dmfast eval`` of the demo's four checkpoints on its test split
(the eval loop's own rate; no bootstrap, no overlays) and ``dmfast predict`` of each on the test PNGs, and says how
far bf16's outputs lie from float32's: the largest probability difference and the share of eval's CAM boxes at IoU
>= 0.9 with float32's. With ``--train-seeds K`` (default 4) it trains the demo's base classifier again K times in
each precision (seeds S..S+K-1, S = ``--train-first-seed``, default 0, so that separate runs can be pooled; each
seed's two runs from the same initial weights and validation split) and compares their validation AUROC after the
demo's epochs and their test AUROC (eval in float32), with the seed-paired mean difference and its 95% t-interval,
and their training images/s (``--train-init`` starts them from a trained classifier instead of random weights;
``--train-fp32-steps``, by default train's, runs the bf16 ones' first steps in float32). It also says how far one
training step's gradients in bf16 lie from float32's, per stage, at random weights and at the demo's trained base
classifier's. With ``--align-seeds K`` (default 2) it trains the demo's alignment module K times in each precision
(the same seeds; no float32 start, align has none) and compares their validation loss (each in its own precision)
and the known misalignment they leave on a phantom's held-out images (in float32).
"""

import copy
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from dmfast import eval as eval_stage
from dmfast import align, checkpoints, predict, train, training
from dmfast.config import AlignConfig, EvalConfig, PredictConfig, TrainConfig, from_dict
from dmfast.data.dataset import FINDINGS
from dmfast.data.formats import open_dataset
from dmfast.data.images import to_model_input
from dmfast.phantom import draw_image, sample_findings
from dmfast.inference import load_classifier
from dmfast.metrics import box_overlap
from dmfast.models import CAMClassifier

from .common import best_median_ms, environment, parse, parser, report

VARIANTS = {"fp32": (None, False), "fp32 + channels_last": (None, True), "bf16": (torch.bfloat16, False),
            "bf16 + channels_last": (torch.bfloat16, True)}


def phantom_batch(count: int, size: int) -> torch.Tensor:
    import numpy as np

    rng = np.random.default_rng(0)
    images = [draw_image(size, sample_findings(rng, 0.4), rng)[0] for _ in range(count)]
    pixels = (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)[:, None]
    return to_model_input(pixels)


def random_labels(count: int, seed: int) -> torch.Tensor:
    """Seeded multi-label targets ``[count, classes]``, each finding present with probability 0.3."""
    return (torch.rand(count, len(FINDINGS), generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def _prepared(model: torch.nn.Module, images: torch.Tensor, last: bool) -> tuple:
    layout = torch.channels_last if last else torch.contiguous_format
    return model.to(memory_format=layout), images.contiguous(memory_format=layout)


def inference(args) -> tuple:
    torch.manual_seed(0)
    model = CAMClassifier(args.arch, cam_stride=16).eval()
    images = phantom_batch(args.batch, args.size)
    calls, probabilities = {}, {}
    for name, (dtype, last) in VARIANTS.items():
        def run(dtype=dtype, last=last):
            net, x = _prepared(model, images, last)
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits, cams = net(x, cams=True)
            return torch.sigmoid(logits.float())
        probabilities[name] = run()
        calls[name] = run
    times = best_median_ms(calls, args.threads, args.min_run_time, args.rounds)
    deviation = {name: float((p - probabilities["fp32"]).abs().max()) for name, p in probabilities.items()}
    return times, deviation


def training_step(args) -> dict:
    torch.manual_seed(0)
    model = CAMClassifier(args.train_arch, cam_stride=16).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    images = phantom_batch(args.train_batch, args.train_size)
    targets = random_labels(args.train_batch, seed=0)
    calls = {}
    for name, (dtype, last) in VARIANTS.items():
        def step(dtype=dtype, last=last):
            net, x = _prepared(model, images, last)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = training.weighted_bce(net(x).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        calls[name] = step
    return best_median_ms(calls, args.threads, args.min_run_time, args.rounds)


def _stage_gradients(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, dtype) -> dict:
    """One training step's gradients of a copy of ``model`` (float32, or dmfast's bf16: autocast in channels_last),
    concatenated per top-level stage (stem, layer1..4, fc)."""
    net, x = _prepared(copy.deepcopy(model), images, dtype is not None)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        training.weighted_bce(net(x).float(), targets).backward()
    stages = {}
    for name, parameter in net.named_parameters():
        stages.setdefault(name.split(".")[0], []).append(parameter.grad.flatten())
    return {stage: torch.cat(grads) for stage, grads in stages.items()}


def gradient_error(args, trained: str | None) -> dict:
    """Relative error ``|g_bf16 - g_fp32| / |g_fp32|`` per stage of one training step's gradients (the training
    classifier on phantom images, seeded random labels) at random weights and, given a trained classifier's
    checkpoint, at its weights: where bf16 training departs from float32's."""
    cases = {"random weights": (CAMClassifier(args.train_arch, cam_stride=16), args.train_size)}
    if trained:
        model, config, _ = load_classifier(trained)
        cases["trained weights"] = (model, config.size)
    targets = random_labels(args.train_batch, seed=1)
    errors = {}
    for case, (model, size) in cases.items():
        images = phantom_batch(args.train_batch, size)
        full, low = (_stage_gradients(model.train(), images, targets, dtype) for dtype in (None, torch.bfloat16))
        errors[case] = {stage: float((low[stage] - g).norm() / g.norm()) for stage, g in full.items()}
    return errors


PASS_PRECISIONS = ("fp32", "bf16")


def _eval_outputs(folder: Path) -> tuple:
    """{(image, method): probabilities} and {(image, class, method): box} of an eval output folder."""
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = [name for name in rows[0][2:] if not name.endswith(" label")]
    probabilities = {(r[0], r[1]): np.array(r[2:2 + len(classes)], float) for r in rows[1:]}
    with open(folder / "boxes.csv", newline="") as f:
        boxes = {(r["image"], r["class"], r["method"]): [float(r[k]) for k in ("x0", "y0", "x1", "y1")]
                 for r in csv.DictReader(f) if r["class"]}  # an image without boxes has one empty row
    return probabilities, boxes


def _agreement(reference: tuple, other: tuple, methods: list) -> dict:
    """Per method: the largest probability difference and the share of boxes at IoU >= 0.9 (a box only one of
    the two drew counts as a miss)."""
    agreement = {}
    for method in methods:
        pairs = [(p, other[0][key]) for key, p in reference[0].items() if key[1] == method]
        keys = {k for k in (*reference[1], *other[1]) if k[2] == method}
        close = sum(k in reference[1] and k in other[1] and box_overlap([reference[1][k]], [other[1][k]])[0, 0] >= 0.9
                    for k in keys)
        agreement[method] = {"max_probability_difference": max(float(np.abs(a - b).max()) for a, b in pairs),
                             "boxes": len(keys), "boxes_iou_0.9": close / max(len(keys), 1)}
    return agreement


def _demo_eval_config(args) -> dict:
    """The settings of the demo's eval (its data, cache and four checkpoints), from ``--models``' demo.json."""
    return json.loads((Path(args.models) / "demo.json").read_text())["config"]


def _demo_base(demo: dict) -> str:
    """The checkpoint of the demo's base classifier: the first of its eval's."""
    return demo["checkpoints"][0][1]


def _demo_alignment(demo: dict) -> str:
    """The demo's alignment checkpoint: the one its "+align" classifier (the second of its eval's) trained on."""
    return checkpoints.load(demo["checkpoints"][1][1], checkpoints.CLASSIFIER)["config"]["aligned"]


def trained_passes(args, folder: Path) -> dict:
    """Whole eval and predict passes of the demo's trained models in each of :data:`PASS_PRECISIONS`."""
    demo = _demo_eval_config(args)
    models = [tuple(pair) for pair in demo["checkpoints"]]
    data, cache = demo["data"], demo["cache"]
    dataset = open_dataset(data)
    test = checkpoints.load(models[0][1], checkpoints.CLASSIFIER)["splits"]["test"]
    pngs = [str(dataset.paths[n]) for n in test]
    quiet = Console(quiet=True)

    def run_eval(precision: str) -> dict:
        report = eval_stage.run(EvalConfig(data=data, out=str(folder / f"eval-{precision}"), cache=cache,
                                           checkpoints=models, batch=args.pass_batch, overlays=0, bootstrap=0,
                                           precision=precision, overwrite=True), console=quiet)
        return {name: report["methods"][name]["images_per_second"] for name, _ in models}

    def run_predict(precision: str) -> dict:
        rates = {}
        for name, checkpoint in models:
            rates[name] = predict.run(PredictConfig(
                model=checkpoint, inputs=pngs, out=str(folder / f"predict-{precision}-{name}"), batch=args.pass_batch,
                min_probability=0.0, precision=precision, overwrite=True), console=quiet)["images_per_second"]
        return rates

    rounds = {(stage, p): [] for stage in ("eval", "predict") for p in PASS_PRECISIONS}
    for k in range(args.pass_rounds):  # alternating which precision goes first
        for p in PASS_PRECISIONS[k % 2:] + PASS_PRECISIONS[:k % 2]:
            rounds["eval", p].append(run_eval(p))
            rounds["predict", p].append(run_predict(p))
    rates = {f"{stage} {p}": {name: max(r[name] for r in values) for name, _ in models}
             for (stage, p), values in rounds.items()}
    agreement = _agreement(_eval_outputs(folder / "eval-fp32"), _eval_outputs(folder / "eval-bf16"),
                           [name for name, _ in models])
    for name, _ in models:
        predicted = []
        for p in PASS_PRECISIONS:  # path, width, height, then the classes
            with open(folder / f"predict-{p}-{name}" / "predictions.csv", newline="") as f:
                predicted.append(np.array([row[3:3 + len(FINDINGS)] for row in list(csv.reader(f))[1:]], float))
        agreement[name]["predict_max_probability_difference"] = float(np.abs(predicted[0] - predicted[1]).max())
    return {"models": models, "test_images": len(test), "batch": args.pass_batch, "images_per_second": rates,
            "rounds": {f"{stage} {p}": values for (stage, p), values in rounds.items()}, "agreement": agreement}


def _paired(first: list, second: list) -> dict:
    """Mean of ``second - first`` over seeds with its 95% t-interval, and each side's mean and spread."""
    from scipy import stats

    difference = np.subtract(second, first)
    half = stats.t.ppf(0.975, len(difference) - 1) * difference.std(ddof=1) / np.sqrt(len(difference)) \
        if len(difference) > 1 else float("nan")
    return {"first": list(first), "second": list(second), "first_mean": float(np.mean(first)),
            "first_sd": float(np.std(first, ddof=1)) if len(first) > 1 else float("nan"),
            "second_mean": float(np.mean(second)), "difference": float(difference.mean()),
            "interval": [float(difference.mean() - half), float(difference.mean() + half)]}


def _seeds(args, count: int) -> range:
    """The seeds of ``count`` re-trainings: from ``--train-first-seed`` on."""
    return range(args.train_first_seed, args.train_first_seed + count)


def _rerun_settings(base: dict, out: Path, precision: str, seed: int, args) -> dict:
    """A demo stage's recorded settings ``base`` for one re-training: into ``out``, in ``precision``, with ``seed``
    and ``--train-steps``' cap."""
    settings = {**base, "out": str(out), "precision": precision, "seed": seed, "overwrite": True}
    if args.train_steps:
        settings["max_steps"] = args.train_steps
    return settings


def training_runs(args, folder: Path) -> dict:
    """The demo's base classifier trained again with seeds S..S+K-1 in float32 and in bf16 (from random weights, or
    from ``--train-init``'s): validation AUROC of the last epoch, test AUROC (one float32 eval of every run) and
    training images/s (epochs after the first)."""
    demo = _demo_eval_config(args)
    base = checkpoints.load(_demo_base(demo), checkpoints.CLASSIFIER)["config"]
    runs, validation, speed = [], {p: [] for p in PASS_PRECISIONS}, {p: [] for p in PASS_PRECISIONS}
    seeds = _seeds(args, args.train_seeds)
    for seed in seeds:
        for p in PASS_PRECISIONS:
            out = folder / f"train-{p}-{seed}"
            settings = _rerun_settings(base, out, p, seed, args)
            if args.train_init:
                settings["init"] = str(Path(args.train_init).resolve())
            if p != "fp32":
                settings["fp32_steps"] = args.train_fp32_steps
            checkpoint = train.run(from_dict(TrainConfig, settings), console=Console(quiet=True))
            epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            validation[p].append(epochs[-1]["mean_auroc"])
            speed[p] += [e["images_per_second"] for e in epochs[1:]]
            runs.append((f"{p} seed {seed}", str(checkpoint)))
    report = eval_stage.run(EvalConfig(data=demo["data"], out=str(folder / "eval-training"), cache=demo["cache"],
                                       checkpoints=runs, batch=args.pass_batch, overlays=0, bootstrap=0,
                                       precision="fp32", overwrite=True), console=Console(quiet=True))
    test = {p: [report["methods"][f"{p} seed {s}"]["mean_auroc"] for s in seeds] for p in PASS_PRECISIONS}
    return {"config": {**{k: base[k] for k in ("arch", "size", "batch", "epochs", "lr", "cam_stride")},
                       "max_steps": args.train_steps or base["max_steps"], "init": args.train_init,
                       "fp32_steps": args.train_fp32_steps, "seeds": list(seeds)},
            "validation_auroc": _paired(*validation.values()), "test_auroc": _paired(*test.values()),
            "images_per_second": {p: float(np.mean(v)) if v else None for p, v in speed.items()}}  # epochs 2+


def alignment_runs(args, folder: Path) -> dict:
    """The demo's alignment module trained again with seeds S..S+K-1 in float32 and in bf16 (no float32 start: align
    has none), with the demo's settings: each run's validation loss (in its own precision, as align computes it) and,
    on a phantom, the known misalignment left on its held-out images (measured in float32); the seconds per whole run
    (the two precisions' order alternates with the seed) and which warp each run kept."""
    base = checkpoints.load(_demo_alignment(_demo_eval_config(args)), checkpoints.ALIGNMENT)["config"]
    loss, error, seconds = ({p: [] for p in PASS_PRECISIONS} for _ in range(3))
    runs = []
    seeds = _seeds(args, args.align_seeds)
    for seed in seeds:
        for p in PASS_PRECISIONS[::(-1) ** seed]:  # neither precision always pays the first run's warm-up
            out = folder / f"align-{p}-{seed}"
            started = time.perf_counter()
            checkpoint = align.run(from_dict(AlignConfig, _rerun_settings(base, out, p, seed, args)),
                                   console=Console(quiet=True))
            seconds[p].append(time.perf_counter() - started)
            stats = json.loads((out / "alignment_stats.json").read_text())
            loss[p].append(stats["validation"]["learned"])
            if "misalignment_error" in stats:  # a phantom's known transforms
                error[p].append(stats["misalignment_error"]["after"])
            ran = checkpoints.load(checkpoint, checkpoints.ALIGNMENT)["config"]
            runs.append({"precision": ran["precision"], "seed": ran["seed"], "kept": stats["validation"]["kept"]})
    return {"config": {**{k: base[k] for k in ("arch", "input_size", "batch", "epochs", "lr", "optimizer", "pool")},
                       "max_steps": args.train_steps or base["max_steps"], "seeds": list(seeds)},
            "validation_loss": _paired(*loss.values()),
            "misalignment_after": _paired(*error.values()) if error["fp32"] else None,
            "seconds_per_run": {p: float(np.mean(v)) for p, v in seconds.items()}, "runs": runs}


def _print_paired(name: str, r: dict, digits: int) -> None:
    """One line of a :func:`_paired` comparison of float32 (first) and bf16 (second) runs."""
    print(f"  {name.replace('_', ' ')}: fp32 {r['first_mean']:.{digits}f} (seed sd {r['first_sd']:.{digits}f}), bf16 "
          f"{r['second_mean']:.{digits}f}; bf16 - fp32 {r['difference']:+.{digits}f} [{r['interval'][0]:+.{digits}f}, "
          f"{r['interval'][1]:+.{digits}f}]")


def run(args) -> dict:
    infer, deviation = inference(args)
    steps = training_step(args)
    cases = {f"inference {args.arch} {args.size}px batch {args.batch}": infer,
             f"training step {args.train_arch} {args.train_size}px batch {args.train_batch}": steps}
    passes, demo = None, args.models and (Path(args.models) / "demo.json").is_file()
    if demo and args.pass_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            passes = trained_passes(args, Path(tmp))
        for name, _ in passes["models"]:
            rate = {k: v[name] for k, v in passes["images_per_second"].items()}
            agree = passes["agreement"][name]
            worst = max(agree["max_probability_difference"], agree["predict_max_probability_difference"])
            print(f"{name}: eval {rate['eval fp32']:.1f} -> {rate['eval bf16']:.1f} images/s "
                  f"({rate['eval bf16'] / rate['eval fp32']:.2f}x), predict {rate['predict fp32']:.1f} -> "
                  f"{rate['predict bf16']:.1f} ({rate['predict bf16'] / rate['predict fp32']:.2f}x); bf16 against "
                  f"fp32: probabilities within {worst:.4f}, {agree['boxes_iou_0.9']:.1%} of {agree['boxes']} boxes "
                  f"at IoU >= 0.9")
            for stage in ("eval", "predict"):  # dmfast's bf16 is bf16 autocast in channels_last
                cases[f"{stage} of the demo's {name}, ms per image"] = {
                    "fp32": 1e3 / rate[f"{stage} fp32"], "bf16 + channels_last": 1e3 / rate[f"{stage} bf16"]}
    torch.manual_seed(0)
    gradients = gradient_error(args, _demo_base(_demo_eval_config(args)) if demo else None)
    for case, errors in gradients.items():
        print(f"bf16's training gradients at {case}, relative error per stage: "
              + ", ".join(f"{stage} {error:.3f}" for stage, error in errors.items()))
    runs = None
    if demo and args.train_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs = training_runs(args, Path(tmp))
        rate = runs["images_per_second"]
        if None not in rate.values():  # a one-epoch training has no epoch after the first to time
            print(f"training the demo's base classifier, {args.train_seeds} seeds: {rate['fp32']:.1f} -> "
                  f"{rate['bf16']:.1f} images/s ({rate['bf16'] / rate['fp32']:.2f}x)")
        for name in ("validation_auroc", "test_auroc"):
            _print_paired(name, runs[name], 3)
    aligns = None
    if demo and args.align_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            aligns = alignment_runs(args, Path(tmp))
        took = aligns["seconds_per_run"]
        kept = sum(r["kept"] == "learned" for r in aligns["runs"])
        print(f"training the demo's alignment module, {args.align_seeds} seeds: {took['fp32']:.1f} -> "
              f"{took['bf16']:.1f} s per whole run ({took['fp32'] / took['bf16']:.2f}x); {kept} of "
              f"{len(aligns['runs'])} runs kept their learned warp")
        for name in ("validation_loss", "misalignment_after"):
            if aligns[name] is not None:  # no known misalignment outside a phantom
                _print_paired(name, aligns[name], 4)
    if args.models and not demo:
        print(f"no trained models at {args.models} (run `make demo` first): whole passes not measured")
    for name in VARIANTS:
        print(f"{name}: inference {args.batch / infer[name] * 1e3:.1f} images/s (max |p - p_fp32| "
              f"{deviation[name]:.4f}), training {args.train_batch / steps[name] * 1e3:.1f} images/s")
    config = {k: getattr(args, k) for k in ("arch", "size", "batch", "train_arch", "train_size", "train_batch")}
    config["max_probability_difference"] = deviation
    config["trained_passes"] = passes
    config["training_runs"] = runs
    config["alignment_runs"] = aligns
    config["gradient_error"] = gradients
    config["images_per_second"] = {"inference": {k: args.batch / v * 1e3 for k, v in infer.items()},
                                   "training": {k: args.train_batch / v * 1e3 for k, v in steps.items()}}
    return report("classifier precision and layout (ms per batch; whole passes: ms per image)", cases,
                  "bf16 + channels_last", environment("cpu", args.threads), config, args.out)


def parse_args(argv=None):
    p = parser(__doc__, rounds=2)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-arch", default="resnet18")
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--models", default="out/demo", help="a `dmfast demo` output folder ('' to skip its passes)")
    p.add_argument("--pass-batch", type=int, default=16, help="batch of the whole eval and predict passes")
    p.add_argument("--pass-rounds", type=int, default=2, help="rounds of the whole passes (0: none)")
    p.add_argument("--train-seeds", type=int, default=4, help="trainings of the demo's base model per precision")
    p.add_argument("--train-first-seed", type=int, default=0,
                   help="the first seed of those trainings (and the alignment's)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="steps per epoch of those and the alignment's (default: all)")
    p.add_argument("--align-seeds", type=int, default=2,
                   help="trainings of the demo's alignment module per precision (from --train-first-seed)")
    p.add_argument("--train-init", default=None,
                   help="a trained classifier (checkpoint or model file) those start from (default: random weights)")
    p.add_argument("--train-fp32-steps", type=int, default=TrainConfig.fp32_steps,
                   help="the bf16 trainings' first steps in float32 (train --fp32-steps; default: train's)")
    return parse(p, "precision", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
