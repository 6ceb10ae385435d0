"""Public entry points of dmfast's fused ops, with their fake (meta) kernels and autograd formulas.

The kernels are C++/CUDA ops registered as ``torch.ops.dmfast.*``; registering fake kernels and autograd here
makes them work with ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.
"""

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers the ops)

__all__ = ["affine_smooth", "affine_matrix"]


def affine_smooth(images: Tensor, theta: Tensor, pool: int = 16) -> Tensor:
    """Warp ``images`` by ``theta`` and smooth the result, fused: ``B(G(affine(I)))`` of the paper's Eq. 6.

    Exactly the eager chain (see :func:`dmfast.reference.affine_smooth`)::

        F.interpolate(F.avg_pool2d(F.grid_sample(images, F.affine_grid(theta, images.shape)), pool),
                      size=(H, W), mode="bilinear")

    with ``align_corners=False`` and zero padding throughout, but without building the sampling grid or the
    full-resolution warp: each pooled cell is the mean of its ``pool x pool`` bilinear samples.

    Args:
        images: ``[B, C, H, W]`` float32 or float64 (float16/bfloat16 too on CUDA); H and W divisible by ``pool``.
        theta: ``[B, 2, 3]`` affine matrices in the normalised coordinates of ``F.affine_grid`` (output -> input),
            same dtype as ``images`` (float32 is also accepted with reduced-precision images). Must be finite.
        pool: pooling window; ``1`` gives the plain bilinear warp.

    Returns:
        ``[B, C, H, W]`` tensor. Differentiable with respect to ``images`` and ``theta`` (first order only).
        Deterministic on CPU; on CUDA the image gradient uses atomic adds.
    """
    if isinstance(pool, bool) or not isinstance(pool, int):
        raise TypeError(f"affine_smooth: pool must be an int, got {type(pool).__name__}")
    return torch.ops.dmfast.affine_smooth.default(images, theta, pool)


def affine_matrix(sx: Tensor, sy: Tensor, tx: Tensor, ty: Tensor, angle: Tensor) -> Tensor:
    """Build ``theta [..., 2, 3]`` from the alignment module's five parameters (the paper's Eq. 6).

    ``theta = [[sx cos a, -sy sin a, tx], [sx sin a, sy cos a, ty]]``: anisotropic scale, then rotation by
    ``angle`` (radians), then shift, in the normalised coordinates of ``F.affine_grid``. Inputs broadcast against
    each other; pure torch, so it is differentiable and works on any device.
    """
    sx, sy, tx, ty, angle = torch.broadcast_tensors(*(torch.as_tensor(v) for v in (sx, sy, tx, ty, angle)))
    cos, sin = torch.cos(angle), torch.sin(angle)
    row0 = torch.stack([sx * cos, -sy * sin, tx], dim=-1)
    row1 = torch.stack([sx * sin, sy * cos, ty], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _check_affine_smooth_shapes(images: Tensor, theta: Tensor, pool: int) -> None:
    torch._check(images.dim() == 4, lambda: f"affine_smooth: images must be [B, C, H, W], got {tuple(images.shape)}")
    torch._check(
        theta.dim() == 3 and theta.shape[1] == 2 and theta.shape[2] == 3,
        lambda: f"affine_smooth: theta must be [B, 2, 3], got {tuple(theta.shape)}",
    )
    torch._check(theta.shape[0] == images.shape[0], lambda: "affine_smooth: batch sizes of images and theta differ")
    torch._check(pool >= 1, lambda: f"affine_smooth: pool must be >= 1, got {pool}")
    torch._check(
        images.shape[2] % pool == 0 and images.shape[3] % pool == 0,
        lambda: f"affine_smooth: H and W must be divisible by pool={pool}",
    )


@torch.library.register_fake("dmfast::affine_smooth")
def _affine_smooth_fake(images, theta, pool):
    _check_affine_smooth_shapes(images, theta, pool)
    return images.new_empty(images.shape)


@torch.library.register_fake("dmfast::affine_smooth_backward")
def _affine_smooth_backward_fake(grad_output, images, theta, pool, output_mask):
    _check_affine_smooth_shapes(images, theta, pool)
    grad_images = images.new_empty(images.shape if output_mask[0] else (0,))
    grad_theta = theta.new_empty(theta.shape if output_mask[1] else (0,))
    return grad_images, grad_theta


def _affine_smooth_setup_context(ctx, inputs, output):
    images, theta, pool = inputs
    ctx.save_for_backward(images, theta)
    ctx.pool = pool


def _affine_smooth_backward(ctx, grad_output):
    images, theta = ctx.saved_tensors
    need_images, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_images, grad_theta = torch.ops.dmfast.affine_smooth_backward.default(
        grad_output, images, theta, ctx.pool, [need_images, need_theta]
    )
    return (grad_images if need_images else None, grad_theta if need_theta else None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("dmfast.affine_smooth: double backward (gradient of the gradient) is not supported")


torch.library.register_autograd(
    "dmfast::affine_smooth", _affine_smooth_backward, setup_context=_affine_smooth_setup_context
)
torch.library.register_autograd(
    "dmfast::affine_smooth_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
