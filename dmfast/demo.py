"""``dmfast demo``: the whole method end to end, on the embedded chest phantom (default) or a ChestX-ray14-format
directory (``--data``), with the ablation table of the paper (base, +alignment, +DM, +PDM).

Stages: generate the phantom -> train the base classifier -> train the alignment module (perceptual loss from the
base classifier) -> train a classifier on aligned images -> disease masks from its confident CAMs -> retrain it with
mask attention -> pseudo disease masks from the anchor's anatomy -> retrain with those -> evaluate all four ->
``dmfast predict`` with the +DM model file on test images with boxes (overlays), as a user would.

The defaults fit about 15 minutes on 2 CPU cores: 1,600 phantom images at 128 px, ResNet-18 with CAM stride 16
(8 x 8 CAMs), 3 epochs per classifier, 2 of attention retraining, Adam 1e-3 for the classifiers and the alignment
(Adam converges faster than the paper's SGD on the phantom; see docs/demo.md). The paper's setting (ResNet-50 at
512 px, 5 + 5 epochs) is what ``dmfast train`` defaults to on a GPU.
"""

import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from . import align, checkpoints, eval, masks, predict, train
from .config import MIN_POOLED_CELLS, AlignConfig, DemoConfig, EvalConfig, MasksConfig, PredictConfig, TrainConfig
from .data.cache import prepare
from .data.formats import open_dataset
from .phantom import synthesize
from .io import atomic_write_json, check_outputs, clear_outputs, print_table, writing
from .metrics import REPORTED_THRESHOLDS


def _stage(console: Console, times: dict, name: str, job):
    console.rule(f"[bold]{name}")
    started = time.perf_counter()
    result = job()
    times[name] = time.perf_counter() - started
    console.print(f"[green]{name}: {times[name]:.1f} s")
    return result


# The demo's outputs, and its image cache cache-SIZE.
OUTPUTS = ("phantom", "base", "align", "aligned", "masks-dm", "dm", "masks-pdm", "pdm", "eval", "predict", "demo.json")


def run(config: DemoConfig, console: Console | None = None) -> dict:
    """Run every stage; returns the evaluation report with the stage times under ``"stage_seconds"`` (also written
    to ``OUT/demo.json``)."""
    with writing(config.out, "dmfast demo"):
        return _run(config, console)


def _run(config: DemoConfig, console: Console | None) -> dict:
    console = console or Console()
    out = Path(config.out)
    cache = out / f"cache-{config.size}"
    clear_outputs(out, check_outputs(out, (*OUTPUTS, cache.name), "dmfast demo", config.overwrite))
    times = {}
    if config.data:
        data, split = Path(config.data), "patients"
    else:
        data, split = _stage(console, times, "phantom", lambda: synthesize(
            out / "phantom", count=config.count, size=max(config.size, 128), seed=config.seed, console=console)), \
            "official"
    _stage(console, times, "prepare", lambda: prepare(data, cache, size=config.size, console=console))
    common = dict(data=str(data), cache=str(cache), size=config.size, seed=config.seed, split=split,
                  val_fraction=config.val_fraction, max_steps=config.max_steps)
    classifier = dict(common, arch=config.arch, cam_stride=config.cam_stride, batch=config.batch, lr=config.lr)

    def fit(name, epochs, **extra):
        return train.run(TrainConfig(out=str(out / name), epochs=epochs, **classifier, **extra), console=console)

    base = _stage(console, times, "train base", lambda: fit("base", config.epochs))
    alignment = _stage(console, times, "align", lambda: align.run(AlignConfig(
        out=str(out / "align"), epochs=config.align_epochs, batch=16, optimizer="adam", lr=1e-3,
        pool=_pool(config.size),
        perceptual=str(base), perceptual_weight=0.1, input_size=min(config.size, 128), **common), console=console))
    aligned = _stage(console, times, "train aligned", lambda: fit("aligned", config.epochs, aligned=str(alignment)))
    masks_common = dict(data=str(data), cache=str(cache), checkpoint=str(aligned))
    dm = _stage(console, times, "masks (DM)", lambda: masks.run(MasksConfig(out=str(out / "masks-dm"), **masks_common),
                                                            console=console))
    with_dm = _stage(console, times, "train +DM", lambda: fit("dm", config.attention_epochs, aligned=str(alignment),
                                                              init=str(aligned), masks=str(dm)))
    pdm = _stage(console, times, "masks (PDM)", lambda: masks.run(MasksConfig(out=str(out / "masks-pdm"), pseudo=True,
                                                                          **masks_common), console=console))
    with_pdm = _stage(console, times, "train +PDM", lambda: fit("pdm", config.attention_epochs,
                                                                aligned=str(alignment), init=str(aligned),
                                                                masks=str(pdm)))
    compared = [("base", str(base)), ("+align", str(aligned)), ("+DM", str(with_dm)), ("+PDM", str(with_pdm))]
    report = _stage(console, times, "eval", lambda: eval.run(EvalConfig(
        data=str(data), out=str(out / "eval"), checkpoints=compared, cache=str(cache), batch=config.batch,
        overlays=config.overlays), console=console))
    test = set(checkpoints.load(with_dm, checkpoints.CLASSIFIER)["splits"]["test"])
    dataset = open_dataset(data, skip_problems=True)
    boxed = sorted({box.image for box in dataset.boxes} & test)[:config.predict_images]
    if boxed:
        _stage(console, times, "predict", lambda: predict.run(PredictConfig(
            model=str(Path(with_dm).parent / "model.pt"), inputs=[str(dataset.paths[n]) for n in boxed],
            out=str(out / "predict"), overlays=True, batch=config.batch), console=console))
    report["stage_seconds"] = times
    report["demo_config"] = asdict(config)
    atomic_write_json(out / "demo.json", report)
    _print_ablation(console, report, out)
    return report


def _pool(size: int) -> int:
    """The alignment loss's pooling for ``size`` px: the paper's 16 where it leaves 8 x 8 cells, else the largest
    window that divides the size and does."""
    return max(p for p in range(1, 17) if size % p == 0 and size // p >= MIN_POOLED_CELLS)


def ablation_rows(report: dict) -> list:
    """(method, mean AUROC, accuracy (AFP) at T(IoU) 0.3 / 0.5 / 0.7) rows of an evaluation report."""
    rows = []
    for name, method in report["methods"].items():
        iou = method["iou"]
        cells = []
        for t in REPORTED_THRESHOLDS:
            k = iou["thresholds"].index(t)
            cells.append(f"{iou['mean_accuracy'][k]:.3f} ({iou['mean_afp'][k]:.2f})")
        auroc = method.get("mean_auroc")
        rows.append([name, "-" if auroc is None else f"{auroc:.3f}", *cells])
    return rows


def mean_accuracy(report: dict, method: str, threshold: float = 0.3) -> float:
    iou = report["methods"][method]["iou"]
    return iou["mean_accuracy"][iou["thresholds"].index(threshold)]


def _print_ablation(console: Console, report: dict, out: Path) -> None:
    print_table(console, f"Ablation ({report['test_images']} test images, {report['gt_boxes']} boxes on "
                         f"{report['box_images']} of them; accuracy (AFP) at T(IoU))",
                ["method", "mean AUROC", "0.3", "0.5", "0.7"], ablation_rows(report))
    times = report["stage_seconds"]
    print_table(console, "Stage wall times", ["stage", "seconds"],
                [[name, f"{seconds:.1f}"] for name, seconds in times.items()] + [["total", f"{sum(times.values()):.1f}"]])
    console.print(verdict(report))
    console.print(f"figures: masks {out / 'masks-dm' / 'masks.png'}, {out / 'masks-pdm' / 'masks.png'}; alignment "
                  f"{out / 'align' / 'alignment_grid.png'}; overlays {out / 'eval' / 'overlays'}; tables "
                  f"{out / 'eval' / 'eval.md'}; stage times {out / 'demo.json'}; dmfast predict of the +DM model "
                  f"{out / 'predict'}")


def verdict(report: dict) -> str:
    """Attention (the better of +DM and +PDM) against the base model at T(IoU) 0.3, with the paired bootstrap
    interval of the difference when eval computed one: "better" only when that interval excludes 0."""
    winner = max(("+DM", "+PDM"), key=lambda m: mean_accuracy(report, m))
    base, best = mean_accuracy(report, "base"), mean_accuracy(report, winner)
    paired = (report["methods"][winner].get("uncertainty") or {}).get("difference", {}).get("iou_accuracy@0.3")
    low, high = paired["interval"] if paired else (None, None)
    if low is None or high is None:
        words, spread = ("higher than" if best > base else "NOT higher than"), ""
    else:
        words = "better than" if low > 0 else "worse than" if high < 0 else "not shown to differ from"
        spread = f" (difference {best - base:+.3f}, paired 95% interval [{low:+.3f}, {high:+.3f}])"
    return (f"mean localization accuracy at T(IoU) = 0.3: attention ({winner}) {best:.3f} is {words} the base "
            f"model's {base:.3f}{spread}")
