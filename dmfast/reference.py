"""Eager PyTorch references of the fused ops: the test oracles and the benchmark baselines."""

import torch
import torch.nn.functional as F
from torch import Tensor


def affine_smooth(images: Tensor, theta: Tensor, pool: int = 16) -> Tensor:
    """phi(I) = B(G(affine(I))): bilinear affine warp, pool x pool average pooling, bilinear restore."""
    height, width = images.shape[-2:]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if pool == 1:
        return warped
    pooled = F.avg_pool2d(warped, pool)
    return F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)


def mask_attention(features: Tensor, masks: Tensor) -> Tensor:
    """Eq. 4: f' = psi * f + f, with masks broadcast over batch and/or channels."""
    return masks * features + features


def attention_cam_literal(features: Tensor, weight: Tensor, bias: Tensor, masks: Tensor | None = None):
    """Eq. 4 then Eq. 5 as written: one attended copy of the features per class ([B, C, K, h, w]), then
    S_c = sum_k w_kc f'_k and the logit is its spatial mean plus bias. Memory grows with C * K."""
    if masks is None:
        attended = features[:, None].expand(-1, weight.shape[0], -1, -1, -1)
    else:
        psi = masks if masks.dim() == 4 else masks.unsqueeze(0)
        attended = psi[:, :, None] * features[:, None] + features[:, None]  # [B, C, K, h, w]
    cams = (weight[None, :, :, None, None] * attended).sum(2)
    return cams.mean((2, 3)) + bias, cams


def attention_cam(features: Tensor, weight: Tensor, bias: Tensor, masks: Tensor | None = None):
    """The best eager form of the attention CAM head: contraction over channels first (einsum on BLAS), then
    the per-class mask scaling S_c = (1 + psi_c) (W f)_c, then the spatial mean plus bias."""
    cams = torch.einsum("ck,bkhw->bchw", weight, features)
    if masks is not None:
        cams = cams * (1 + masks)
    return cams.mean((2, 3)) + bias, cams


def attention_cam_batched_matmul(features: Tensor, weight: Tensor, bias: Tensor, masks: Tensor | None = None):
    """The same head with the contraction as one batched matmul (the weight broadcast over the batch), the
    fastest eager formulation we found on CPU: a stronger baseline than the einsum form."""
    batch, channels, height, width = features.shape
    cams = torch.bmm(weight.expand(batch, -1, -1), features.reshape(batch, channels, -1))
    cams = cams.view(batch, -1, height, width)
    if masks is not None:
        cams = torch.addcmul(cams, cams, masks)
    return cams.mean((2, 3)) + bias, cams


def cam_boxes(cams: Tensor, size, thresholds, max_boxes: int, score: str = "max"):
    """CAM -> boxes the ChestX-ray8 way, step by step: min-max normalise each map, ``F.interpolate`` it to ``size``
    (bilinear, align_corners=False), threshold (``>=``), label 8-connected components with ``scipy.ndimage.label``
    and box them with ``find_objects``. Same outputs and ranking as :func:`dmfast.ops.cam_boxes`."""
    import numpy as np
    from scipy import ndimage

    thresholds = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    lead, (h, w) = cams.shape[:-2], cams.shape[-2:]
    maps = cams.detach().reshape(-1, h, w).to("cpu", torch.float64)
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    normalised = (maps - low) / (high - low).clamp_min(torch.finfo(torch.float64).tiny)
    upsampled = F.interpolate(normalised[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    n = maps.shape[0]
    boxes = torch.zeros(n, max_boxes, 4, dtype=torch.long)
    scores = torch.zeros(n, max_boxes, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        if not high[i] > low[i]:
            continue
        image = upsampled[i].numpy()
        found = []
        for level, threshold in enumerate(thresholds):
            labels, count = ndimage.label(image >= threshold, structure=np.ones((3, 3), dtype=int))
            if count == 0:
                continue
            index = np.arange(1, count + 1)
            values = (ndimage.maximum if score == "max" else ndimage.mean)(image, labels, index)
            for label, (rows, cols) in enumerate(ndimage.find_objects(labels)):
                found.append((-float(values[label]), level, label, (cols.start, rows.start, cols.stop, rows.stop)))
        found.sort()
        counts[i] = len(found)
        for k, (neg_score, _, _, box) in enumerate(found[:max_boxes]):
            boxes[i, k] = torch.tensor(box)
            scores[i, k] = -neg_score
    return (boxes.view(*lead, max_boxes, 4), scores.view(*lead, max_boxes), counts.view(lead))
