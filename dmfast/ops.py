"""Public entry points of dmfast's fused ops, with their fake (meta) kernels and autograd formulas.

The kernels are C++/CUDA ops registered as ``torch.ops.dmfast.*``; registering fake kernels and autograd here
makes them work with ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.
"""

import torch
from torch import Tensor

from . import _C  # loading the extension registers the ops and their CUDA kernels
from . import cpu_variants
from .errors import SettingsError
from .limits import MAX_THRESHOLDS, OP_MAX_SIDE, THETA_LIMIT  # noqa: F401 (THETA_LIMIT: part of the ops API)

cpu_variants.load()  # the CPU kernels built for the widest instruction set this CPU runs


__all__ = ["affine_smooth", "affine_matrix", "affine_inverse", "mask_attention", "attention_cam", "cam_boxes",
           "cuda_ready", "default_device"]


def cuda_ready() -> bool:
    """Whether the ops can run on CUDA here: a GPU, and an extension built with its CUDA kernels."""
    return torch.cuda.is_available() and _C.built_with_cuda()


def default_device(local_rank: int = 0) -> torch.device:
    """CUDA (device ``local_rank``) when :func:`cuda_ready`, else the CPU: a CPU-only build on a GPU machine runs on
    the CPU instead of failing in the first op."""
    return torch.device("cuda", local_rank) if cuda_ready() else torch.device("cpu")


def chosen_device(name=None) -> torch.device:
    """The device ``name`` ("cpu", "cuda", "cuda:N" or a ``torch.device``), checked that it can run here, or
    :func:`default_device` for None. A device that cannot is an error naming it."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SettingsError(f"device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"device {name!r}: dmfast runs on cpu or cuda")
    if device.type == "cuda" and not cuda_ready():
        raise SettingsError(f"device {name!r}: no CUDA GPU here, or dmfast was built without its CUDA kernels")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingsError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


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
            same dtype as ``images`` (float32 is also accepted with reduced-precision images). An image whose theta
            has a NaN or infinite entry, or one beyond ``THETA_LIMIT`` (1e6) in magnitude, gets an all-NaN output
            and NaN gradients (no error: checking the values would make every CUDA call wait for the GPU). No
            affine map of an X-ray comes near the limit, and beyond it float32 cannot place a sample within a
            pixel.
        pool: pooling window; ``1`` gives the plain bilinear warp.

    Returns:
        ``[B, C, H, W]`` tensor. Differentiable with respect to ``images`` and ``theta`` (first order only).
        Deterministic on CPU; on CUDA the image gradient uses atomic adds.
    """
    _tensors("affine_smooth", images=images, theta=theta)
    pool = _index(pool, "affine_smooth", "pool")
    if not 1 <= pool <= OP_MAX_SIDE:
        raise SettingsError(f"affine_smooth: pool must be in [1, {OP_MAX_SIDE}], got {pool}")
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


def affine_inverse(theta: Tensor) -> Tensor:
    """The inverse of affine matrices ``theta [..., 2, 3]`` (as 3 x 3 homogeneous transforms), in float64: maps the
    other way between the two frames, e.g. from an image back to its aligned version."""
    _tensors("affine_inverse", theta=theta)
    if theta.dim() < 2 or tuple(theta.shape[-2:]) != (2, 3):
        raise SettingsError(f"affine_inverse: theta must be [..., 2, 3], got {tuple(theta.shape)}")
    theta = theta.double()
    last = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=theta.device).expand(*theta.shape[:-2], 1, 3)
    inverse, info = torch.linalg.inv_ex(torch.cat([theta, last], -2))
    if (info != 0).any():
        raise SettingsError("affine_inverse: theta is singular (it maps the image onto a line or a point)")
    return inverse[..., :2, :]


def mask_attention(features: Tensor, masks: Tensor) -> Tensor:
    """Spatial attention of the paper's Eq. 4, fused: ``f' = psi * f + f = (1 + masks) * features``.

    Args:
        features: ``[B, K, h, w]`` feature map.
        masks: ``[B or 1, K or 1, h, w]``, broadcast over the batch and/or channels; same dtype and device.

    Returns:
        ``[B, K, h, w]``, differentiable in both inputs (the mask gradient is summed over the broadcast
        dimensions in a fixed order, so it is deterministic).
    """
    return torch.ops.dmfast.mask_attention.default(features, masks)


def attention_cam(features: Tensor, weight: Tensor, bias: Tensor, masks: Tensor | None = None):
    """Class activation maps and logits of the mask-attention classifier head (the paper's Eqs. 4-5), fused.

    With one mask per class, ``f'_c = (1 + psi_c) f`` depends on the class; since ``psi_c`` does not depend on the
    channel, ``S_c = sum_k w_ck f'_k = (1 + psi_c) (W f)_c``: the attended CAM is the plain CAM scaled per class,
    so no ``[B, C, K, h, w]`` tensor is ever built. Without masks this is a ResNet head's global average pooling
    and fully connected layer in one call, with the CAMs as a by-product.

    Args:
        features: ``[B, K, h, w]`` last feature map.
        weight: ``[C, K]`` classifier weight (``nn.Linear(K, C).weight``); bias: ``[C]``.
        masks: ``[C, h, w]`` (shared by the batch), ``[B, C, h, w]`` (per image), or ``None`` (plain CAM).

    Returns:
        ``(logits [B, C], cams [B, C, h, w])`` with ``cams_c = (1 + psi_c) * sum_k weight[c, k] features[:, k]``
        and ``logits_c = mean over (h, w) of cams_c + bias_c``. Differentiable in every tensor argument.
    """
    logits, cams, _ = torch.ops.dmfast.attention_cam.default(features, weight, bias, masks)
    return logits, cams


def cam_boxes(cams: Tensor, size, threshold, max_boxes: int = 16, score: str = "max"):
    """Turn class activation maps into boxes, the ChestX-ray8 way (Wang et al., CVPR 2017), for a whole batch.

    Each map is min-max normalised to [0, 1], bilinearly upsampled to ``size`` (``align_corners=False``; computed
    row by row, never materialised), thresholded (a pixel is foreground when its value is ``>= threshold``), and
    every 8-connected foreground region gives a box. Wang et al. normalise to [0, 255] and threshold at 60 and 180:
    pass ``threshold=(60/255, 180/255)`` for their two-level scheme, whose boxes are pooled per map.

    Args:
        cams: ``[N, h, w]`` or ``[B, C, h, w]`` float maps, or one ``[h, w]`` map; a tensor or an array (numpy, as
            pytorch-grad-cam returns them); float16/bfloat16 maps on the CPU are converted to float32 first. A
            map with NaN or inf gets no boxes and count -1 (no error, so the CUDA kernel never waits for the
            device; the caller checks ``counts < 0``).
        size: ``(H, W)`` of the image the boxes are reported in (pixels of the upsampled map), or one int for a
            square.
        threshold: a fraction in [0, 1] or a sequence of them.
        max_boxes: boxes kept per map (the best by score), 1 to 65536.
        score: ``"max"`` (default; the peak normalised activation inside the region, robust to region size) or
            ``"mean"`` (the mean normalised activation inside it).

    Returns:
        ``boxes [..., max_boxes, 4]`` int64 ``(x0, y0, x1, y1)``, inclusive-exclusive pixels; ``scores
        [..., max_boxes]`` float64; ``counts [...]`` int64, the number of regions found (may exceed ``max_boxes``;
        -1 for a non-finite map); ``...`` is empty for one ``[h, w]`` map.
        Boxes are sorted by score (highest first; ties by threshold level, then raster order of the region's first
        pixel). Entries past ``min(count, max_boxes)`` are zero. A constant map has no region: count 0.
        Not differentiable.
    """
    cams, single = _maps(cams)
    _tensors("cam_boxes", cams=cams)
    size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        levels = [float(threshold)] if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    except (TypeError, ValueError):
        raise SettingsError(f"cam_boxes: threshold must be a fraction or a sequence of them, "
                            f"got {threshold!r}") from None
    if len(levels) > MAX_THRESHOLDS:
        raise SettingsError(f"cam_boxes: at most {MAX_THRESHOLDS} thresholds, got {len(levels)}")
    try:
        height, width = (_index(v, "cam_boxes", "size") for v in size)
    except (TypeError, ValueError):
        raise SettingsError(f"cam_boxes: size must be (H, W), two ints, got {size!r}") from None
    if not (1 <= height <= OP_MAX_SIDE and 1 <= width <= OP_MAX_SIDE):
        raise SettingsError(f"cam_boxes: size must be (H, W) with H, W in [1, {OP_MAX_SIDE}], got {size!r}")
    boxes, scores, counts = torch.ops.dmfast.cam_boxes.default(cams.detach(), [height, width], levels,
                                                               _index(max_boxes, "cam_boxes", "max_boxes"), score)
    return (boxes[0], scores[0], counts[0]) if single else (boxes, scores, counts)


def _maps(cams) -> tuple:
    """``(maps, single)``: what other CAM tools give (numpy arrays, one ``[h, w]`` map, half precision maps on the
    CPU) as the float tensor the op takes; ``single`` when one map was given."""
    if not torch.is_tensor(cams):
        import numpy as np

        try:
            cams = torch.from_numpy(np.ascontiguousarray(cams))
        except (TypeError, ValueError, RuntimeError):
            raise SettingsError(f"cam_boxes: cams must be a tensor or a numpy array of maps, got {type(cams).__name__}"
                                ) from None
    if cams.device.type == "cpu" and cams.dtype in (torch.float16, torch.bfloat16):
        cams = cams.float()
    return (cams[None], True) if cams.dim() == 2 else (cams, False)


def _index(value, op: str, name: str) -> int:
    """``value`` as an int, when it is one (a Python or numpy int, or a one-element integer tensor)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise SettingsError(f"{op}: {name} must be an int, got {value!r}")
    return int(value.__index__())


def _tensors(op: str, **named) -> None:
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise SettingsError(f"{op}: {name} must be a tensor, got {type(value).__name__}")


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
    raise RuntimeError("dmfast: double backward (gradient of the gradient) of the fused ops is not supported")


@torch.library.register_fake("dmfast::cam_boxes")
def _cam_boxes_fake(cams, size, thresholds, max_boxes, score):
    torch._check(cams.dim() in (3, 4), lambda: "cam_boxes: cams must be [N, h, w] or [B, C, h, w]")
    lead = tuple(cams.shape[:-2])
    return (cams.new_empty((*lead, max_boxes, 4), dtype=torch.long),
            cams.new_empty((*lead, max_boxes), dtype=torch.float64),
            cams.new_empty(lead, dtype=torch.long))


@torch.library.register_fake("dmfast::mask_attention")
def _mask_attention_fake(features, masks):
    torch._check(features.dim() == 4 and masks.dim() == 4, lambda: "mask_attention: features and masks must be 4-d")
    return features.new_empty(features.shape)


@torch.library.register_fake("dmfast::mask_attention_backward")
def _mask_attention_backward_fake(grad_output, features, masks, output_mask):
    return (features.new_empty(features.shape if output_mask[0] else (0,)),
            masks.new_empty(masks.shape if output_mask[1] else (0,)))


def _mask_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mask_attention_backward(ctx, grad_output):
    features, masks = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grads = torch.ops.dmfast.mask_attention_backward.default(grad_output, features, masks, need)
    return tuple(g if n else None for g, n in zip(grads, need))


@torch.library.register_fake("dmfast::attention_cam")
def _attention_cam_fake(features, weight, bias, masks):
    torch._check(features.dim() == 4 and weight.dim() == 2, lambda: "attention_cam: features [B,K,h,w], weight [C,K]")
    batch, _, height, width = features.shape
    classes = weight.shape[0]
    cams = features.new_empty((batch, classes, height, width))
    return features.new_empty((batch, classes)), cams, features.new_empty((batch, classes, height, width))


@torch.library.register_fake("dmfast::attention_cam_backward")
def _attention_cam_backward_fake(grad_logits, grad_cams, grad_plain_cams, features, weight, plain_cams, masks,
                                 output_mask):
    empty = features.new_empty((0,))
    if masks is None and grad_cams is None and grad_plain_cams is None and output_mask[0]:
        # logits-only plain head: d features is constant over the pixels and comes back broadcast
        batch, channels, height, width = features.shape
        grad_features = features.new_empty((batch, channels, 1, 1)).expand(batch, channels, height, width)
    else:
        grad_features = features.new_empty(features.shape) if output_mask[0] else empty
    return (
        grad_features,
        weight.new_empty(weight.shape) if output_mask[1] else empty,
        weight.new_empty(weight.shape[:1]) if output_mask[2] else empty,
        masks.new_empty(masks.shape) if output_mask[3] and masks is not None else empty,
    )


def _attention_cam_setup_context(ctx, inputs, output):
    features, weight, bias, masks = inputs
    ctx.save_for_backward(features, weight, output[2], masks)
    ctx.set_materialize_grads(False)  # unused outputs give None: the kernel then skips their paths


def _attention_cam_backward(ctx, grad_logits, grad_cams, grad_plain_cams):
    features, weight, plain_cams, masks = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[i]) for i in range(4)]
    grads = torch.ops.dmfast.attention_cam_backward.default(
        grad_logits, grad_cams, grad_plain_cams, features, weight, plain_cams, masks, need
    )
    return tuple(g if n else None for g, n in zip(grads, need))


torch.library.register_autograd(
    "dmfast::mask_attention", _mask_attention_backward, setup_context=_mask_attention_setup_context
)
torch.library.register_autograd(
    "dmfast::mask_attention_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
torch.library.register_autograd(
    "dmfast::attention_cam", _attention_cam_backward, setup_context=_attention_cam_setup_context
)
torch.library.register_autograd(
    "dmfast::attention_cam_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
torch.library.register_autograd(
    "dmfast::affine_smooth", _affine_smooth_backward, setup_context=_affine_smooth_setup_context
)
torch.library.register_autograd(
    "dmfast::affine_smooth_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
