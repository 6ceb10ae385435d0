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
