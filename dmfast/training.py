"""What the training stages (``train``, ``align``) share: the weighted BCE loss, the optimisers, the epochs."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError, SettingsError


def weighted_bce(logits: Tensor, targets: Tensor, counts: tuple | None = None) -> Tensor:
    """The paper's Eq. 10: binary cross-entropy with per-batch, per-class weights against label imbalance,
    ``w_P = (|P| + |N|) / |P|`` on positives and ``w_N = (|P| + |N|) / |N|`` on negatives, averaged over the batch
    and the classes. A class without positives (or negatives) in the batch has only negative (positive) terms, with
    weight 1.

    A target of -1 (:data:`~dmfast.data.dataset.UNKNOWN`: the image's release does not say) has no term and is
    counted in neither ``|P|`` nor ``|N|``; the mean is over the known targets. With every target known this is
    exactly the mean over the batch and the classes.

    Args:
        logits: ``[B, C]``; targets: ``[B, C]`` in {0, 1, -1} (any float or integer dtype).
        counts: ``(positives [C], negatives [C], known)`` of the whole batch when this is one shard of it (data
            parallel; see :func:`label_counts`), ``known`` being the batch's known targets over the number of
            shards: every shard weighs and divides its terms as the global batch does, so the mean of the shards'
            losses (what data parallel's gradient averaging takes) is the global batch's loss.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise SettingsError(f"weighted_bce: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both "
                            "be [B, C]")
    y = targets.to(logits.dtype)
    positive, negative = (y == 1).to(logits.dtype), (y == 0).to(logits.dtype)
    positives, negatives, share = counts if counts is not None else (positive.sum(0), negative.sum(0), None)
    total = positives + negatives
    w_pos = torch.where(positives > 0, total / positives.clamp(min=1), torch.zeros_like(positives))
    w_neg = torch.where(negatives > 0, total / negatives.clamp(min=1), torch.zeros_like(negatives))
    weights = positive * w_pos + negative * w_neg  # 0 on unknown targets
    known = positive + negative
    if share is None and bool(known.all()):
        return F.binary_cross_entropy_with_logits(logits, y, weight=weights, reduction="mean")
    terms = F.binary_cross_entropy_with_logits(logits, positive, weight=weights, reduction="sum")
    return terms / (known.sum() if share is None else share).clamp(min=1)


def label_counts(targets: Tensor) -> Tensor:
    """``[2, C]``: the positives and negatives of each class among ``targets`` (unknown ones in neither), to sum
    over the shards of a data-parallel batch for :func:`weighted_bce`'s ``counts``."""
    return torch.stack([(targets == 1).sum(0), (targets == 0).sum(0)]).float()


def shard_counts(summed: Tensor, shards: int) -> tuple:
    """:func:`weighted_bce`'s ``counts`` from the :func:`label_counts` summed over ``shards`` shards."""
    return summed[0], summed[1], (summed[0] + summed[1]).sum() / shards


def optimizer(name: str, parameters, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adam"`` or ``"sgd"`` (with momentum)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    raise SettingsError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def epoch_batches(images: int, batch: int, max_steps: int | None, seed: int, epoch: int) -> list:
    """The image indices of each step of an epoch: full batches of a shuffle fixed by (seed, epoch), at most
    ``max_steps`` of them; an error when not even one batch fits."""
    steps = min(images // batch, max_steps or images)
    if steps == 0:
        raise DataError(f"{images} training images are fewer than one batch of {batch}")
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[step * batch:(step + 1) * batch] for step in range(steps)]

