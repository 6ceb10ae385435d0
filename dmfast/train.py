"""``dmfast train``: the weighted-BCE CAM classifier (optionally on aligned images, optionally with disease-mask
attention), with per-epoch validation AUROC, atomic resumable checkpoints and DistributedDataParallel scale-out.

Every epoch rewrites ``RUN/metrics.jsonl`` (strict JSON, one line per epoch) and ``RUN/training.png`` (loss and
validation AUROC curves) from the history kept in the checkpoint, keeps ``RUN/best.pt`` (the epoch of the best
validation mean AUROC), and with ``--tensorboard`` logs the same scalars to ``RUN/tensorboard``.

Under ``torchrun --nproc_per_node=N`` the same command trains with DDP (NCCL on GPUs, gloo on CPU): every rank
takes its share of each global batch of ``--batch`` images, and only rank 0 logs and writes checkpoints.
"""

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from . import checkpoints, ops, training
from .config import MIN_CAM_CELLS, TrainConfig, defaults, from_dict
from .data.cache import CacheSet, ImageCache, open_cache, open_or_prepare, report_left_out
from .data.dataset import FINDINGS
from .data.formats import label_policy, open_data, open_dataset
from .data.loader import BatchLoader
from .data.splits import Splits, make_splits, summary
from .errors import DataError, SettingsError
from .figures import training_figure
from .inference import export_model, load_aligner, load_classifier, model_input, trained_file, weights_of
from .io import (LOSS_AND_RATE, PROGRESS_SECONDS, atomic_write_bytes, check_outputs, clear_outputs, json_text, progress,
                 save_png, writing)
from .metrics import roc_auc
from .models import CAMClassifier, autocast_dtype, compiled


def _distributed() -> tuple:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if ops.cuda_ready() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _device() -> torch.device:
    device = ops.default_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _rng_state() -> dict:
    """The random states to resume from, as tensors and plain values (checkpoints are read weights only)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
                                                      has_gauss, gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(config: TrainConfig, console: Console) -> CAMClassifier:
    model = CAMClassifier(config.arch, len(FINDINGS), pretrained=config.pretrained, cam_stride=config.cam_stride)
    if config.weights:
        loaded, total, notes = model.load_weights(config.weights)
        console.print(f"{config.weights}: loaded {loaded} of {total} backbone tensors"
                      + "".join(f"; {note}" for note in notes))
    elif config.pretrained:
        console.print(f"{config.arch}: torchvision ImageNet weights")
    else:
        console.print(f"{config.arch}: random initialisation (no --weights or --pretrained given)")
    if config.init:  # any trained classifier: a model file holds the weights as a checkpoint does
        start, previous, _ = load_classifier(config.init)
        if (previous.arch, previous.cam_stride) != (config.arch, config.cam_stride):
            raise SettingsError(f"--init {config.init} is a {previous.arch} with CAM stride {previous.cam_stride}; "
                                f"this run asks for {config.arch} with {config.cam_stride}")
        with weights_of(f"--init {config.init}", config.arch):
            model.load_state_dict({k: v for k, v in start.state_dict().items() if k != "masks"}, strict=False)
        console.print(f"initialised from {trained_file(config.init)}")
    if config.masks:
        payload = checkpoints.load(config.masks, checkpoints.MASKS)
        side, cells = payload["masks"].shape[-1], config.size // config.cam_stride
        if side < cells:  # stretched onto the CAMs they would blur them
            raise SettingsError(f"--masks {config.masks}: masks of {side} x {side}, coarser than this run's {cells} x "
                                f"{cells} CAMs ({config.size} px, CAM stride {config.cam_stride}); make them from a "
                                "classifier of this grid or finer")
        model.set_masks(payload["masks"])
        named = [c for c, has in zip(FINDINGS, payload.get("has_mask", [True] * len(FINDINGS))) if has]
        console.print(f"attention with the {payload.get('kind', 'disease')} masks of {config.masks} "
                      f"({len(named)} of {len(FINDINGS)} classes have one)")
    return model


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def evaluate_auroc(model, cache: ImageCache, names, labels: np.ndarray, batch: int, device, aligner=None,
                   low=None) -> dict:
    """Validation AUROC and loss (the weighted BCE over the whole validation set, the training loss's measure) of
    ``model`` on ``names`` (read ahead by a :class:`BatchLoader`, under autocast to ``low`` when training runs in
    it), and the seconds the pass took."""
    model.eval()
    started, scores = time.perf_counter(), []
    with torch.no_grad():
        loader = BatchLoader(cache, [names[s:s + batch] for s in range(0, len(names), batch)], None, device)
        for pixels, _ in loader:
            images = model_input(pixels, aligner)
            if low is not None:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(images.device.type, dtype=low, enabled=low is not None):
                scores.append(model(images).float().cpu())
    if not scores:
        return {"validation_seconds": time.perf_counter() - started}
    logits = torch.cat(scores)
    result = roc_auc(labels, torch.sigmoid(logits).numpy())
    loss = float(training.weighted_bce(logits, torch.as_tensor(labels)))
    return {"auroc": dict(zip(FINDINGS, result.per_class.tolist())), "mean_auroc": result.mean, "val_loss": loss,
            "validation_seconds": time.perf_counter() - started}


def _earlier_history(out: Path, state: dict) -> list:
    """The per-epoch metrics up to the checkpoint's epoch (from the checkpoint, or metrics.jsonl of older runs)."""
    if "history" in state:
        return state["history"]
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    last = {}  # older dmfast appended: the last line of each epoch is this run's
    for metrics in map(json.loads, filter(None, lines)):
        if isinstance(metrics.get("epoch"), int) and metrics["epoch"] <= state["epoch"] + 1:
            last[metrics["epoch"]] = metrics
    return [last[e] for e in sorted(last)]


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SettingsError("--tensorboard needs the tensorboard package: pip install 'dmfast[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


def _improved(metrics: dict, best: dict | None) -> bool:
    score = metrics.get("mean_auroc")
    return score is not None and math.isfinite(score) and (best is None or score > best["mean_auroc"])


# Everything a run writes into its folder; a run folder holding any of them is never written without --resume or
# --overwrite.
OUTPUTS = ("checkpoint.pt", "best.pt", "model.pt", "metrics.jsonl", "splits.json", "training.png", "tensorboard")
# The settings a resumed run takes from the command line; every other one comes from its checkpoint.
RESUME_SETTINGS = ("data", "out", "cache", "skip_problems", "overwrite", "tensorboard")
# settings younger than runs that may be resumed: what those runs did before the setting existed
BEFORE_THEIR_TIME = {"fp32_steps": 0}


# The settings that name files or folders: stored resolved, so the run's files work from any working directory.
PATHS = ("data", "cache", "aligned", "init", "masks", "mix")


def _resolved(value):
    """A path (or list of paths, ``mix``) made absolute."""
    return [str(Path(v).resolve()) for v in value] if isinstance(value, (list, tuple)) else str(Path(value).resolve())


def _resume_state(out: Path) -> dict:
    """The checkpoint a resumed run continues: ``out/checkpoint.pt``, with its optimiser and random states. A model
    file (or a best.pt) there, or only a model file, is an error saying so: it holds the weights alone."""
    last = out / "checkpoint.pt"
    if not last.is_file() and (out / "model.pt").is_file():
        raise SettingsError(f"--resume: {out} holds model.pt but no checkpoint.pt: a model file holds the weights "
                            "only, not the optimiser, scheduler and random states a resumed run needs; start a new run "
                            f"from its weights with --init {out / 'model.pt'}")
    if not last.is_file():
        best = out / "best.pt"
        raise SettingsError(f"--resume: {out} holds no checkpoint.pt: " + (
            "its run stopped while writing its first checkpoint (best.pt is there, without the optimiser and random "
            f"states a resumed run needs); start it again with --overwrite, or from those weights with --init {best}"
            if best.is_file() else "the run finished no epoch (or this is not a run folder); start it with "
            "--overwrite"))
    state = checkpoints.load(last, (checkpoints.CLASSIFIER, checkpoints.MODEL))
    if state["format"] == checkpoints.MODEL or any(k not in state for k in ("optimizer", "scheduler", "rng")):
        what = "a model file" if state["format"] == checkpoints.MODEL else "a checkpoint without them (a best.pt?)"
        raise SettingsError(f"--resume: {last} is {what}: a resumed run needs the run's own checkpoint.pt, with "
                            f"its optimiser, scheduler and random states; start a new run from its weights with --init "
                            f"{last}")
    return state


def _resumed_config(config: TrainConfig, saved: dict, path: Path, done: int, given=None) -> TrainConfig:
    """The checkpoint's settings with the command line's :data:`RESUME_SETTINGS` and ``epochs`` when given. A
    setting given with a value that differs from the run's is an error (it would be ignored), as is fewer epochs
    than the ``done`` ones. ``given``: the names given on the command line (None, for a config built in Python:
    ``epochs`` and the settings that differ from the defaults)."""
    default = defaults(TrainConfig)
    if not isinstance(saved, dict):
        raise SettingsError(f"--resume: {path}: its settings are not a dict")
    saved = {**BEFORE_THEIR_TIME, **saved}
    from_python = given is None  # a config built in Python: its epochs count, other settings when not defaults
    given = {n for n in default if getattr(config, n) != default[n]} | {"epochs"} if from_python else set(given)
    for name in sorted(given - set(RESUME_SETTINGS) - {"epochs"}):
        value, kept = getattr(config, name), saved.get(name, default.get(name))
        if name in PATHS and value:  # stored resolved (older runs: as given)
            value, kept = _resolved(value), _resolved(kept) if kept else kept
        if value != kept:
            raise SettingsError(f"--resume: {path} was trained with {name} = {kept!r}; a resumed run keeps its "
                                f"settings (only --epochs and --tensorboard may change), so {name} = {value!r} cannot "
                                "apply: start a new run for it")
    epochs = config.epochs if "epochs" in given else saved.get("epochs", config.epochs)
    if epochs < done:
        raise SettingsError(f"--resume: {path} has trained {done} epochs already; --epochs {epochs} would train none "
                            "(give more epochs to continue it)")
    try:
        return from_dict(TrainConfig, {**asdict(config), **saved, "epochs": epochs,
                                       **{k: getattr(config, k) for k in RESUME_SETTINGS}})
    except (TypeError, ValueError) as error:
        raise SettingsError(f"--resume: {path}: its settings cannot be used ({error})") from None


def run(config: TrainConfig, resume: bool = False, console: Console | None = None, given=None) -> Path:
    """Train (or resume) and return the path of the last checkpoint; the run's portable model file is written
    beside it as ``model.pt``. ``given``: the settings named on the command line (for ``resume``, see
    :func:`_resumed_config`). The run folder has one writer (rank 0 of a distributed run)."""
    if _distributed()[0] != 0:
        return _run(config, resume, console, given)
    if resume and not Path(config.out).is_dir():  # before holding it (which would make it)
        raise SettingsError(f"--resume: {config.out}: no such run folder")
    with writing(config.out, "dmfast train"):
        return _run(config, resume, console, given)


def _run(config: TrainConfig, resume: bool, console: Console | None, given) -> Path:
    rank, world = _distributed()
    console = console or Console(stderr=True, quiet=rank != 0)
    device = _device()
    out = Path(config.out)
    last = out / "checkpoint.pt"
    earlier = check_outputs(out, OUTPUTS, "dmfast train run", config.overwrite, resume) if rank == 0 else []
    state = _resume_state(out) if resume else None
    config = _settled(config, state, last, given, world, console)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)

    data = _training_data(config, state, rank, world, console)
    low = autocast_dtype(config.precision, device, config.amp, training=True)
    model, optimizer, scheduler, start_epoch = _model_and_optimiser(config, state, last, device, low, console)
    if state is not None and rank == 0:  # the run folder stands for its model.pt first: an older one must not
        (out / "model.pt").unlink(missing_ok=True)  # outlive the resume
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = compiled(ddp) if config.compile else ddp  # the training steps' (validation runs the plain model)
    aligner = load_aligner(config.aligned, device) if config.aligned else None
    scaler = torch.amp.GradScaler("cuda", enabled=low == torch.float16)
    history = _earlier_history(out, state) if state else []
    best = state.get("best") if state else None
    if best is None and history:  # a checkpoint of an older dmfast: the best epoch from its history
        for metrics in history:
            best = {"epoch": metrics["epoch"], "mean_auroc": metrics["mean_auroc"]} if _improved(metrics, best) \
                else best
    if rank == 0:
        clear_outputs(out, earlier)  # --overwrite: never leave another run's best model or metrics
        data.splits.save(out / "splits.json")
    writer = _tensorboard(out) if config.tensorboard and rank == 0 else None

    step = partial(_step, forward, optimizer, scaler, world=world)  # step(images, targets, low) -> its loss
    for epoch in range(start_epoch, config.epochs):
        set_train_mode(model, config.freeze_bn)
        mean_loss, rate, seconds, waited = _train_epoch(config, data, epoch, step, aligner, low, device, rank, world,
                                                        console)
        scheduler.step()
        if rank == 0:
            val = data.val_names
            labels = np.stack([data.label_of[n] for n in val]) if val else np.zeros((0, len(FINDINGS)))
            metrics = {"epoch": epoch + 1, "loss": mean_loss, "images_per_second": rate,
                       "lr": optimizer.param_groups[0]["lr"], "step_seconds": seconds,
                       "data_wait_seconds": waited}  # waiting for batches: what loading did not hide
            metrics.update(evaluate_auroc(model, data.cache, val, labels, config.batch, device, aligner, low))
            history = [m for m in history if m["epoch"] < epoch + 1] + [metrics]
            improved = _improved(metrics, best)
            if improved:
                best = {"epoch": epoch + 1, "mean_auroc": metrics["mean_auroc"]}
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": _rng_state(),
                       "config": asdict(config), "splits": asdict(data.splits), "metrics": metrics,
                       "history": history, "best": best}
            _write_epoch(out, payload, improved, history, writer)
            chosen = f"best epoch {best['epoch']} ({best['mean_auroc']:.3f})" if best else "no best epoch yet"
            console.print(f"epoch {epoch + 1}: loss {metrics['loss']:.4f}, validation mean AUROC "
                          f"{metrics.get('mean_auroc', float('nan')):.3f}, {rate:.1f} images/s; {chosen}")
        if world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    if rank == 0 and last.is_file():  # the portable, weights-only copy to use the model elsewhere (export, inference)
        where = f"in {out / 'best.pt'}" if (out / "best.pt").is_file() else \
            "(its weights were not kept: the run began with an older dmfast)"
        console.print(f"model file {export_model(last, out / 'model.pt', overwrite=True, dataset=data.dataset)}" +
                      (f"; best validation epoch {best['epoch']} {where}" if best else ""))
    return last


def _settled(config: TrainConfig, state: dict | None, last: Path, given, world: int, console: Console) -> TrainConfig:
    """The run's settings: a resumed run's own (:func:`_resumed_config`), its paths absolute (the checkpoint records
    where its data, alignment, masks... came from, usable from any folder), checked against the processes."""
    if state is not None:
        config = _resumed_config(config, state["config"], last, state.get("epoch", -1) + 1, given)
    cells = config.size // config.cam_stride
    if cells < MIN_CAM_CELLS:
        console.print(f"[yellow]warning: at {config.size} px with CAM stride {config.cam_stride} the CAMs are "
                      f"{cells} x {cells}: too coarse for disease masks and boxes (a larger --size or --cam-stride 16)")
    config = from_dict(TrainConfig, {**asdict(config), **{k: _resolved(getattr(config, k)) for k in PATHS
                                                          if getattr(config, k)}})
    if config.batch % world:
        raise SettingsError(f"--batch {config.batch} must be divisible by the number of processes ({world})")
    return config


@dataclass
class TrainingData:
    """What a run trains and validates on: the dataset, the image cache (with ``--mix`` folders' images), the
    splits, every image's labels by cache key, and the training and validation names found in the cache."""

    dataset: object
    cache: CacheSet
    splits: Splits
    label_of: dict
    train_names: list
    val_names: list


def _training_data(config: TrainConfig, state: dict | None, rank: int, world: int, console: Console) -> TrainingData:
    dataset = open_data(config, lists=config.split == "official")
    report_left_out(dataset, console)
    mixed = [open_dataset(folder, skip_problems=config.skip_problems, lists=False, policy=label_policy(config))
             for folder in config.mix]
    for other in mixed:
        report_left_out(other, console)

    def opened():
        main = open_cache(config, console=console)
        return CacheSet(main, [open_or_prepare(m.root, None, config.size, config.skip_problems, console, m.format)
                               for m in mixed])
    cache = opened() if rank == 0 else None  # the other ranks open it once rank 0 has built it
    if world > 1:
        dist.barrier()
    if cache is None:
        cache = opened()
    label_of = {r.image: r.labels for r in dataset.records}
    splits = Splits(**state["splits"]) if state else make_splits(dataset, config.val_fraction, config.seed,
                                                                   split=config.split)
    added, kept_apart = _mixed_training_images(dataset, mixed, splits)
    if not state:
        splits.train += list(added)
    label_of.update(added)
    console.print(summary(dataset, splits, config.split) + "".join(
        f"; {sum(k.startswith(CacheSet.key(i, '')) for k in added):,} training images mixed in from {m.root} "
        f"({m.format})" for i, m in enumerate(mixed)) +
        (f"; {kept_apart} mixed images left out: their patients are in the validation or test split" if kept_apart
         else ""))
    for m in (m for m in mixed if m.renamed_from == dataset.format):
        console.print(f"[yellow]warning: {m.renamed_note}; until then some may be test images of {config.data}")
    train_names = [n for n in splits.train if n in cache]
    val_names = [n for n in splits.val if n in cache]
    if not train_names:
        raise DataError(f"{config.data}: no training images in the {config.split!r} split")
    training.epoch_batches(len(train_names), config.batch, config.max_steps, config.seed, 0)  # enough images?
    return TrainingData(dataset, cache, splits, label_of, train_names, val_names)


def _mixed_training_images(dataset, mixed: list, splits: Splits) -> tuple:
    """The ``--mix`` folders' training images (their official train split, else all) as ``{cache key: labels}``,
    never one of a patient of the data's validation or test images (RSNA's images are ChestX-ray14's: its mapping
    names the patients); and how many were left out for that."""
    patient_of = {r.image: r.patient for r in dataset.records}
    held_out = {patient_of[n] for n in splits.val + splits.test if n in patient_of}
    added, kept_apart = {}, 0
    for i, other in enumerate(mixed):
        for r in other.records:
            if other.train_val and r.image not in other.train_val:
                continue
            if r.patient in held_out:
                kept_apart += 1
            else:
                added[CacheSet.key(i, r.image)] = r.labels
    return added, kept_apart


def _model_and_optimiser(config: TrainConfig, state: dict | None, last: Path, device, low, console: Console) -> tuple:
    """The classifier (channels_last under low precision: the layout its kernels are fastest in), its optimiser and
    learning-rate schedule, resumed from ``state``; and the first epoch to train."""
    model = build_model(config, console).to(device)
    if low is not None:
        model = model.to(memory_format=torch.channels_last)
    optimizer = training.optimizer(config.optimizer, model.parameters(), config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    if state is None:
        return model, optimizer, scheduler, 0
    with weights_of(last, config.arch):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    console.print(f"resumed from {last} after epoch {state['epoch'] + 1}")
    return model, optimizer, scheduler, state["epoch"] + 1


def _step(forward, optimizer, scaler, images: torch.Tensor, targets: torch.Tensor, low, world: int) -> torch.Tensor:
    """One optimisation step; its loss, on the device."""
    counts = None
    if world > 1:  # Eq. 10's weights come from the global batch
        counts = training.label_counts(targets)
        dist.all_reduce(counts)
        counts = training.shard_counts(counts, world)
    with torch.autocast(images.device.type, dtype=low, enabled=low is not None):
        loss = training.weighted_bce(forward(images).float(), targets, counts)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _train_epoch(config: TrainConfig, data: TrainingData, epoch: int, step, aligner, low, device, rank: int,
                 world: int, console: Console) -> tuple:
    """One epoch of ``step(images, targets, low)`` over this rank's share of each batch (float32 for the run's first
    ``config.fp32_steps``), with a progress bar: returns the mean loss, images/s, the seconds of its steps and those
    spent waiting for batches."""
    batches = training.epoch_batches(len(data.train_names), config.batch, config.max_steps, config.seed, epoch)
    steps, per_rank = len(batches), config.batch // world
    with progress("epoch {task.fields[epoch]}", console, LOSS_AND_RATE, disable=rank != 0) as bar:
        task = bar.add_task("train", total=steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0, rate=0.0)
        loader = BatchLoader(data.cache, [[data.train_names[i] for i in chosen[rank * per_rank:(rank + 1) * per_rank]]
                                          for chosen in batches], data.label_of, device)
        # the loss stays on the device, read at the progress bar's pace: no host synchronisation per step
        total_loss, shown_at, rate = torch.zeros((), dtype=torch.float64, device=device), 0.0, 0.0
        done = epoch * steps  # steps of the earlier epochs (each has as many)
        started = time.perf_counter()
        for k, (pixels, targets) in enumerate(loader):
            images = model_input(pixels, aligner)
            if low is not None:
                images = images.contiguous(memory_format=torch.channels_last)
            total_loss += step(images, targets, low=low if done + k >= config.fp32_steps else None)
            now = time.perf_counter()
            if k + 1 == steps or now - shown_at >= PROGRESS_SECONDS:
                shown_at, rate = now, (k + 1) * config.batch / (now - started)
                bar.update(task, completed=k + 1, loss=total_loss.item() / (k + 1), rate=rate)
        seconds = time.perf_counter() - started
    return total_loss.item() / steps, rate, seconds, loader.wait_seconds


def _write_epoch(out: Path, payload: dict, improved: bool, history: list, writer) -> None:
    """An epoch's outputs: best.pt when it improved (written before checkpoint.pt: a resume never points at a
    best.pt not yet there), checkpoint.pt, metrics.jsonl, training.png and the TensorBoard scalars."""
    if improved:
        checkpoints.save(out / "best.pt", checkpoints.CLASSIFIER,
                         {k: v for k, v in payload.items() if k not in ("optimizer", "scheduler", "rng")})
    checkpoints.save(out / "checkpoint.pt", checkpoints.CLASSIFIER, payload)
    atomic_write_bytes(out / "metrics.jsonl", "".join(json_text(m) + "\n" for m in history).encode())
    save_png(out / "training.png", training_figure(history))
    if writer is not None:
        metrics, epoch = payload["metrics"], payload["epoch"] + 1
        for key in ("loss", "val_loss", "mean_auroc", "lr", "images_per_second"):
            if metrics.get(key) is not None:
                writer.add_scalar(key, metrics[key], epoch)
        for name, value in metrics.get("auroc", {}).items():
            writer.add_scalar(f"auroc/{name}", value, epoch)
        writer.flush()
