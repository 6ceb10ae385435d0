"""The whole pipeline as the release grows: per-stage images/s, peak memory and the wall time projected to
ChestX-ray14 (112,120 images) and MIMIC-CXR-JPG (377,110) on this machine.

    python -m benchmarks.pipeline [--sizes 64 192 512] [--arch resnet50] [--train-steps 4] [--precision auto]

For each size N it writes a ChestX-ray14-format release of N PNGs at the released 1024 px (a pool of phantom images
under new names and patients, with their labels and boxes: decoding and scoring cost what they cost on real files;
without the phantom's transforms file the reader treats it as a real release), then runs the stages as a user does,
each as its own ``dmfast`` process:

    prepare (--workers, at --size) -> train (--train-steps steps of --batch, then its validation pass) -> masks (CAMs
    of the training split) -> eval (the test split: AUROC, boxes, detection metrics, bootstrap) -> predict (every
    1024-px PNG)

and records each stage's wall time, the images it handled, and the peak resident memory of its process tree (all of
it, and the anonymous part alone: the memory-mapped cache's pages count in the first, are the page cache's, and grow
with what is read); eval and predict also report the rate of their own loops (start-up and output files left out). The
per-image cost of a stage is the slope of its wall time between two sizes (what one more image costs; start-up and
fixed work drop out): it must not grow with N. The projection is the wall time at the largest size plus that slope
times the images a release adds. Training is projected per epoch from its step rate and its validation rate (both in
the run's metrics.jsonl).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from dmfast.phantom import synthesize
from dmfast.io import atomic_write_json
from dmfast.models import resolve_precision

from .common import environment, parse, parser

RELEASES = {"ChestX-ray14": 112_120, "MIMIC-CXR-JPG": 377_110}
RELEASE_SIZE = 1024
TEST_FRACTION = 0.2  # of the patients, as the phantom splits
# "prepare again": the same command on the finished cache (what a resumed or repeated prepare checks before it skips)
STAGES = ("prepare", "prepare again", "train", "masks", "eval", "predict")


def write_release(pool: Path, out: Path, count: int, seed: int = 0) -> Path:
    """A ChestX-ray14-format release of ``count`` images: the pool's PNGs in turn, two images per patient, with the
    pool image's labels and boxes, and official lists splitting the patients 80/20."""
    with open(pool / "Data_Entry_2017.csv") as f:
        reader = csv.reader(f)
        header, entries = next(reader), list(reader)
    with open(pool / "BBox_List_2017.csv") as f:
        reader = csv.reader(f)
        box_header, box_rows = next(reader), list(reader)
    boxes_of = {}
    for row in box_rows:
        boxes_of.setdefault(row[0], []).append(row[1:])
    (out / "images").mkdir(parents=True)
    rows, boxes, patients = [], [], {}
    for i in range(count):
        source = entries[i % len(entries)]
        patient, follow = i // 2 + 1, i % 2
        name = f"{patient:08d}_{follow:03d}.png"
        shutil.copyfile(pool / "images" / source[0], out / "images" / name)
        rows.append([name, source[1], follow, patient, *source[4:]])
        boxes += [[name, *box] for box in boxes_of.get(source[0], [])]
        patients.setdefault(patient, []).append(name)
    order = np.random.default_rng(seed).permutation(sorted(patients))
    test_patients = set(order[:max(1, round(TEST_FRACTION * len(order)))].tolist())
    lists = {"test_list.txt": [], "train_val_list.txt": []}
    for patient, names in patients.items():
        lists["test_list.txt" if patient in test_patients else "train_val_list.txt"] += names
    for name, table in (("Data_Entry_2017.csv", [header, *rows]), ("BBox_List_2017.csv", [box_header, *boxes])):
        with open(out / name, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(table)
    for name, names in lists.items():
        (out / name).write_text("\n".join(names) + "\n")
    return out


def _tree(pid: int) -> list:
    """``pid`` and its descendants (prepare's decoding workers)."""
    found, queue = [], [pid]
    while queue:
        p = queue.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    queue += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def _memory_kib(pids: list) -> tuple:
    """(resident, anonymous resident) KiB summed over ``pids``."""
    total = anon = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0])
        anon += int(fields.get("RssAnon", "0 kB").split()[0])
    return total, anon


def run_stage(command: list, log: Path) -> dict:
    """Run ``dmfast COMMAND`` to its end, sampling the memory of its process tree every 50 ms."""
    dmfast = Path(sys.executable).with_name("dmfast")
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([str(dmfast), *map(str, command)], stdout=output, stderr=subprocess.STDOUT)
        peak = peak_anon = 0
        while True:
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            total, anon = _memory_kib(_tree(process.pid))
            peak, peak_anon = max(peak, total), max(peak_anon, anon)
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    code = process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if code:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"dmfast {command[0]} failed (exit {code}): " + " | ".join(tail))
    return {"seconds": seconds, "peak_rss_mib": peak / 1024, "peak_anon_mib": peak_anon / 1024}


def measure(count: int, pool: Path, folder: Path, args) -> dict:
    data = write_release(pool, folder / "release", count)
    cache, run, common = folder / "cache", folder / "run", ["--cache", folder / "cache"]
    tests = len((data / "test_list.txt").read_text().split())
    stages = {}
    stages["prepare"] = run_stage(["prepare", data, "--size", args.size, "--workers", args.workers, "--cache", cache],
                                  folder / "prepare.log")
    stages["prepare again"] = run_stage(["prepare", data, "--size", args.size, "--workers", args.workers, "--cache",
                                         cache], folder / "prepare-again.log")
    stages["train"] = run_stage(["train", data, "--out", run, *common, "--arch", args.arch, "--size", args.size,
                                 "--batch", args.batch, "--epochs", 1, "--max-steps", args.train_steps,
                                 "--split", "official", "--precision", args.train_precision,
                                 "--fp32-steps", 0], folder / "train.log")  # a long run's rate: no float32 start
    inference = ["--precision", args.precision]
    stages["masks"] = run_stage(["masks", data, "--checkpoint", run / "checkpoint.pt", "--out", folder / "masks",
                                 *common, "--batch", args.batch, *inference], folder / "masks.log")
    stages["eval"] = run_stage(["eval", data, "--checkpoint", f"m={run / 'checkpoint.pt'}", "--out", folder / "eval",
                                *common, "--batch", args.batch, *inference], folder / "eval.log")
    stages["predict"] = run_stage(["predict", run / "model.pt", data / "images", "--out", folder / "predict",
                                   "--batch", args.batch, "--device", "cpu", *inference], folder / "predict.log")
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    splits = json.loads((run / "splits.json").read_text())
    images = {"prepare": count, "prepare again": count, "train": len(splits["val"]), "masks": len(splits["train"]),
              "eval": tests, "predict": count}
    for name, stage in stages.items():
        stage["images"] = images[name]
        stage["images_per_second"] = images[name] / stage["seconds"]
    # the rates the stages measure over their own loops (no start-up, no output files)
    stages["eval"]["loop_images_per_second"] = \
        json.loads((folder / "eval" / "eval.json").read_text())["methods"]["m"]["images_per_second"]
    stages["predict"]["loop_images_per_second"] = \
        json.loads((folder / "predict" / "predictions.json").read_text())["images_per_second"]
    stages["train"]["step_images_per_second"] = epoch["images_per_second"]
    stages["train"]["data_wait_seconds"] = epoch["data_wait_seconds"]
    stages["train"]["step_seconds"] = epoch["step_seconds"]
    stages["train"]["validation_images_per_second"] = len(splits["val"]) / epoch["validation_seconds"] \
        if splits["val"] else None
    return {"images": count, "train_images": len(splits["train"]), "stages": stages}


def slopes(measured: list) -> dict:
    """Per stage, the seconds one more image costs between consecutive sizes (training runs a fixed number of steps:
    its cost per image is its step rate)."""
    out = {}
    for stage in STAGES:
        if stage == "train":
            continue
        points = [(m["stages"][stage]["images"], m["stages"][stage]["seconds"]) for m in measured]
        out[stage] = [(b[1] - a[1]) / (b[0] - a[0]) if b[0] != a[0] else None for a, b in zip(points, points[1:])]
    return out


def projection(measured: list, per_image: dict) -> dict:
    """Hours per stage for each release: the largest size's wall time plus the last slope for the images added;
    training as one epoch of its training split at the step rate plus its validation split at the validation rate."""
    largest = measured[-1]
    out = {}
    for release, count in RELEASES.items():
        scale = count / largest["images"]
        hours = {}
        for stage in STAGES:
            if stage == "prepare again":  # a check, not a stage of the pipeline
                continue
            if stage == "train":
                train = largest["stages"]["train"]
                seconds = largest["train_images"] * scale / train["step_images_per_second"]
                if train["validation_images_per_second"]:
                    seconds += train["images"] * scale / train["validation_images_per_second"]
            else:
                stage_images = largest["stages"][stage]["images"]
                seconds = largest["stages"][stage]["seconds"] + per_image[stage][-1] * stage_images * (scale - 1)
            hours[stage if stage != "train" else "train (one epoch)"] = seconds / 3600
        out[release] = hours
    return out


def run(args) -> dict:
    console = Console()
    env = environment("cpu", args.threads)
    measured = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        pool = synthesize(root / "pool", count=args.pool, size=RELEASE_SIZE, seed=0, console=Console(quiet=True))
        console.print(f"phantom pool: {args.pool} images of {RELEASE_SIZE} px in {time.perf_counter() - started:.0f} s")
        for count in args.sizes:
            measured.append(measure(count, pool, root / f"n{count}", args))
            stages = measured[-1]["stages"]
            console.print(f"N={count}: " + ", ".join(f"{s} {stages[s]['seconds']:.1f} s" for s in STAGES))
    per_image = slopes(measured)
    projected = projection(measured, per_image)

    where = f"{env['cpu']}, {env['cpu_variant']} kernels, {env['threads']} threads"
    precision = {"inference": resolve_precision(args.precision, "cpu"),
                 "training": resolve_precision(args.train_precision, "cpu", training=True)}
    table = Table(title=f"pipeline: {args.arch} at {args.size} px from {RELEASE_SIZE}-px PNGs, inference in "
                        f"{precision['inference']}, training in {precision['training']} ({where}); images/s, peak "
                        "RSS / anonymous MiB")
    table.add_column("stage")
    for m in measured:
        table.add_column(f"N={m['images']}", justify="right")
    table.add_column("ms per added image", justify="right")
    for stage in STAGES:
        cells = []
        for m in measured:
            done = m["stages"][stage]
            loop = f" (loop {done['loop_images_per_second']:.1f})" if "loop_images_per_second" in done else ""
            rate = f"{done['images_per_second']:.1f}/s{loop}" if stage != "train" else \
                f"{done['step_images_per_second']:.2f}/s steps, {done['validation_images_per_second'] or 0:.1f}/s val"
            cells.append(f"{rate}, {done['peak_rss_mib']:.0f} / {done['peak_anon_mib']:.0f}")
        slope = " -> ".join("-" if s is None else f"{1e3 * s:.0f}" for s in per_image.get(stage, ()))
        table.add_row(stage, *cells, slope if stage != "train" else "(fixed steps)")
    console.print(table)
    train = measured[-1]["stages"]["train"]
    console.print(f"training steps: {train['step_images_per_second']:.2f} images/s, waiting for data "
                  f"{train['data_wait_seconds']:.2f} of {train['step_seconds']:.1f} s; validation "
                  f"{train['validation_images_per_second'] or 0:.2f} images/s")
    for release, hours in projected.items():
        console.print(f"{release} ({RELEASES[release]:,} images): " +
                      ", ".join(f"{s} {h:.1f} h" for s, h in hours.items()) + f"; total {sum(hours.values()):.1f} h")
    payload = {"benchmark": "pipeline", "environment": env,
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
               "precision": precision, "measured": measured, "seconds_per_added_image": per_image,
               "projected_hours": projected}
    atomic_write_json(args.out, payload, indent=2)
    console.print(f"results written to {args.out}")
    return payload


def parse_args(argv=None):
    p = parser(__doc__, rounds=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 192, 512], help="release sizes (at least two)")
    p.add_argument("--pool", type=int, default=64, help="distinct phantom images the releases are made of")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=512, help="the working image size (prepare, train, inference)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare's decoding processes")
    p.add_argument("--precision", default="auto", help="of masks, eval and predict")
    p.add_argument("--train-precision", default="auto")
    p.add_argument("--work", default=None, help="folder for the temporary releases (default: the system's)")
    args = parse(p, "pipeline", argv)
    if len(args.sizes) < 2 or sorted(args.sizes) != args.sizes:
        p.error("--sizes: at least two, increasing")
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
