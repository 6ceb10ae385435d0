"""``dmfast align``: the alignment module. A ResNet-18 predicts scale, shift and rotation (sx, sy, tx, ty, angle) per
X-ray; the image warped by them and smoothed (the paper's phi(I) = B(G(affine(I))), 16x16 pooling and bilinear
restore, one fused op) is pulled towards the anchor, the mean of ``No Finding`` training images, by a Euclidean loss
(Eq. 8) plus a perceptual loss (Eq. 7) over conv2_x..conv5_x of a frozen classifier.

Stability: the network's last layer starts at zero, so training starts from the identity transform, and the five
parameters pass through tanh into bounded ranges (scale 1 +- 0.3, shift +- 0.3, rotation +- 25 degrees), so no step
can collapse or flip the image; the perceptual term is normalised per stage by the anchor's feature energy, so its
scale does not depend on the classifier.
"""

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import checkpoints, ops, training
from .anatomy import anchor_images, make_anchor
from .config import AlignConfig
from .data.cache import open_cache, report_left_out
from .data.formats import open_data
from .data.images import to_model_input
from .data.loader import BatchLoader
from .phantom import read_transforms
from .data.splits import make_splits, summary
from .errors import DataError
from .inference import load_classifier, trained_file
from .io import (LOSS_AND_RATE, PROGRESS_SECONDS, atomic_write_json, check_outputs, clear_outputs, progress, save_png,
                 to_uint8, writing)
from .models import AlignmentNet, autocast_dtype


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit variance: the distance then measures structure, not exposure or contrast."""
    mean = images.mean((1, 2, 3), keepdim=True)
    return (images - mean) / images.std((1, 2, 3), keepdim=True).clamp_min(1e-6)


class AlignmentLoss:
    """Euclidean + perceptual distance between phi(image) and phi(anchor), both standardised per image."""

    def __init__(self, anchor: torch.Tensor, pool: int, classifier=None, weight: float = 1.0, low=None):
        identity = torch.eye(2, 3, dtype=anchor.dtype, device=anchor.device)[None]
        self.pool = pool
        self.target = standardize(ops.affine_smooth(anchor + 1, identity, pool))
        self.classifier = classifier
        self.weight = weight
        self.low = low  # the classifier's autocast dtype (None: float32)
        if classifier is not None:
            with torch.no_grad():
                self.target_features = classifier.stages(self.target)
            self.feature_scale = [f.square().mean().clamp_min(1e-12) for f in self.target_features]

    def __call__(self, images: torch.Tensor, theta: torch.Tensor) -> tuple:
        # +1: the warp's zero padding is then the black background
        smoothed = standardize(ops.affine_smooth(images + 1, theta, self.pool))
        euclidean = (smoothed - self.target).square().mean()
        perceptual = torch.zeros((), device=images.device)
        if self.classifier is not None:
            with torch.autocast(images.device.type, dtype=self.low, enabled=self.low is not None):
                features = self.classifier.stages(smoothed)
            for f, t, s in zip(features, self.target_features, self.feature_scale):
                perceptual = perceptual + (f.float() - t).square().mean() / s
        return euclidean + self.weight * perceptual, euclidean.detach(), perceptual.detach()


def misalignment_error(theta_true: torch.Tensor, theta_pred: torch.Tensor | None = None) -> torch.Tensor:
    """Mean displacement (in half-widths, the normalised unit) of a 9x9 grid of points between the canonical chest
    and the image (``theta_pred`` None) or the aligned image (composite of the misalignment and the alignment)."""
    lin = torch.linspace(-0.8, 0.8, 9, dtype=torch.float64)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    points = torch.stack([x.reshape(-1), y.reshape(-1), torch.ones(81, dtype=torch.float64)])  # [3, 81]
    full = lambda t: torch.cat([t.double(), torch.tensor([[0, 0, 1.0]], dtype=torch.float64).expand(len(t), 1, 3)], 1)  # noqa: E731
    composite = full(theta_true)
    if theta_pred is not None:
        composite = composite @ full(theta_pred)
    moved = composite @ points
    return (moved[:, :2] - points[:2]).norm(dim=1).mean(1)


def validation_check(net: AlignmentNet, loss_fn: AlignmentLoss, cache, names: list, batch: int,
                     device="cpu") -> dict:
    """The loss on the validation images ``names`` with the learned warp and with the identity, and which to keep
    ("learned" only when it is lower)."""
    totals = np.zeros(2)
    with torch.no_grad():
        for start in range(0, len(names), batch):
            images = to_model_input(cache.batch(names[start:start + batch]).to(device))
            identity = torch.eye(2, 3, dtype=images.dtype).expand(len(images), 2, 3)
            share = len(images) / len(names)
            totals += [loss_fn(images, theta)[0].item() * share for theta in (net.theta(images), identity)]
    learned, identity = totals.tolist()
    return {"images": len(names), "learned": learned, "identity": identity,
            "kept": "learned" if learned < identity else "identity"}


def _grid(originals, aligned, anchor) -> torch.Tensor:
    top = torch.cat(list(originals[:, 0]) + [anchor[0, 0]], 1)
    bottom = torch.cat(list(aligned[:, 0]) + [anchor[0, 0]], 1)
    return to_uint8(torch.cat([top, bottom], 0), -1, 1)


OUTPUTS = ("alignment.pt", "anchor.pt", "anchor.png", "alignment_grid.png", "alignment_stats.json")


def _recorded(config: AlignConfig) -> dict:
    """The settings as the checkpoint keeps them: its data, cache and perceptual classifier (the file read) as
    absolute paths, so that they mean the same from any working directory."""
    paths = {"data": config.data, "cache": config.cache,
             "perceptual": config.perceptual and trained_file(config.perceptual)}
    return {**asdict(config), **{k: str(Path(v).resolve()) for k, v in paths.items() if v}}


def run(config: AlignConfig, console: Console | None = None) -> Path:
    """Train the alignment module; returns the checkpoint path. Writes the anchor, a grid of original (top) vs
    aligned (bottom) images with the anchor on the right, and alignment statistics."""
    with writing(config.out, "dmfast align"):
        return _run(config, console)


def _run(config: AlignConfig, console: Console | None) -> Path:
    console = console or Console(stderr=True)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    earlier = check_outputs(out, OUTPUTS, "dmfast align", config.overwrite)
    device = ops.default_device()
    low = autocast_dtype(config.precision, device, training=True)
    # any trained classifier: a model file, run folder, checkpoint.pt or best.pt
    classifier = load_classifier(config.perceptual, device)[0].requires_grad_(False) if config.perceptual else None
    dataset = open_data(config, lists=config.split == "official")
    report_left_out(dataset, console)
    cache = open_cache(config, console=console)
    splits = make_splits(dataset, config.val_fraction, config.seed, split=config.split)
    console.print(summary(dataset, splits, config.split))
    train_names = [n for n in splits.train if n in cache]
    val_names = [n for n in splits.val + splits.test if n in cache]
    if not train_names or not val_names:
        raise DataError(f"{config.data}: the alignment needs training and validation images, got {len(train_names)} "
                        f"and {len(val_names)} (a larger --val-fraction, or more images)")
    training.epoch_batches(len(train_names), config.batch, config.max_steps, config.seed, 0)  # enough images?
    anchor = make_anchor(cache, dataset, train_names, config.anchor_images)
    used = len(anchor_images(dataset, train_names, config.anchor_images))
    every = f" (--anchor-images {config.anchor_images}: all there are)" if used < config.anchor_images else ""
    console.print(f"anchor: mean of {used} No Finding training images{every}")
    clear_outputs(out, earlier)
    save_png(out / "anchor.png", to_uint8(anchor[0, 0], -1, 1))
    checkpoints.save_anchor(out / "anchor.pt", anchor)

    if classifier is not None:
        console.print(f"perceptual loss on conv2_x..conv5_x of {config.perceptual}")
    else:
        console.print("no --perceptual classifier given: Euclidean loss only")
    loss_fn = AlignmentLoss(anchor.to(device), config.pool, classifier, config.perceptual_weight, low)
    net = AlignmentNet(config.input_size, config.arch).to(device)
    if low is not None:  # the layout the low-precision convolution kernels are fastest in
        net.to(memory_format=torch.channels_last)
        if classifier is not None:
            classifier.to(memory_format=torch.channels_last)
    optimizer = training.optimizer(config.optimizer, net.parameters(), config.lr, config.momentum)
    history = []
    for epoch in range(config.epochs):
        batches = training.epoch_batches(len(train_names), config.batch, config.max_steps, config.seed, epoch)
        steps = len(batches)
        net.train()
        # the losses stay on the device, read at the progress bar's pace (as train's)
        totals, shown_at = torch.zeros(3, dtype=torch.float64, device=device), 0.0
        with progress("align epoch {task.fields[epoch]}", console, LOSS_AND_RATE) as bar:
            task = bar.add_task("align", total=steps, epoch=f"{epoch + 1}/{config.epochs}", loss=0.0, rate=0.0)
            started = time.perf_counter()
            loader = BatchLoader(cache, [[train_names[i] for i in chosen] for chosen in batches], None, device)
            for step, (pixels, _) in enumerate(loader):
                images = to_model_input(pixels)
                with torch.autocast(device.type, dtype=low, enabled=low is not None):
                    theta = net.theta(images)  # float32: parameters_of leaves autocast at its output
                loss, euclidean, perceptual = loss_fn(images, theta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip)
                optimizer.step()
                totals += torch.stack([loss.detach(), euclidean, perceptual])
                now = time.perf_counter()
                if step + 1 == steps or now - shown_at >= PROGRESS_SECONDS:
                    shown_at = now
                    bar.update(task, completed=step + 1, loss=totals[0].item() / (step + 1),
                               rate=(step + 1) * config.batch / (now - started))
        totals = totals.cpu().numpy()
        history.append(dict(zip(("loss", "euclidean", "perceptual"), (totals / steps).tolist()), epoch=epoch + 1))
        console.print(f"epoch {epoch + 1}: loss {history[-1]['loss']:.5f} (euclidean {history[-1]['euclidean']:.5f}, "
                      f"perceptual {history[-1]['perceptual']:.5f})")
    net.eval()
    check = validation_check(net, loss_fn, cache, [n for n in splits.val if n in cache] or val_names, config.batch,
                             device)
    console.print(f"validation loss on {check['images']} images: {check['learned']:.5f} with the learned warp, "
                  f"{check['identity']:.5f} without (identity)")
    if check["kept"] == "identity":
        net.reset_to_identity()
        console.print("[yellow]warning: the learned warp does not lower the loss on the validation images; the "
                      "identity transform is kept (more images or epochs, or another --lr, may help)")
    checkpoint = checkpoints.save(out / "alignment.pt", checkpoints.ALIGNMENT, {
        "model": {k: v.cpu() for k, v in net.state_dict().items()},
        "net_config": {"input_size": config.input_size, "arch": config.arch},
        "config": _recorded(config),
        "history": history})
    stats = {"history": history, "validation": check}
    with torch.no_grad():
        shown = val_names[: config.grid_images]
        originals = to_model_input(cache.batch(shown).to(device))
        save_png(out / "alignment_grid.png", _grid(originals.cpu(), net.align(originals).cpu(), anchor))
        params = torch.cat([net.parameters_of(to_model_input(cache.batch(val_names[i:i + 64]).to(device))).cpu()
                            for i in range(0, len(val_names), 64)])
        stats["parameters_mean"] = dict(zip(("sx", "sy", "tx", "ty", "angle"), params.mean(0).tolist()))
        stats["parameters_std"] = dict(zip(("sx", "sy", "tx", "ty", "angle"), params.std(0).tolist()))
        truth = read_transforms(config.data)
        known = [n for n in val_names if n in truth]
        if known:
            true = torch.stack([truth[n] for n in known])
            predicted = torch.cat([net.theta(to_model_input(cache.batch(known[i:i + 64]).to(device))).cpu()
                                   for i in range(0, len(known), 64)])
            before, after = misalignment_error(true), misalignment_error(true, predicted)
            stats["misalignment_error"] = {"images": len(known), "before": before.mean().item(),
                                           "after": after.mean().item(), "unit": "half image widths"}
            console.print(f"known misalignment on {len(known)} held-out images: mean displacement "
                          f"{before.mean():.4f} before, {after.mean():.4f} after alignment")
    atomic_write_json(out / "alignment_stats.json", stats)
    console.print(f"alignment checkpoint {checkpoint}, grid {out / 'alignment_grid.png'}")
    return checkpoint
