"""Class activation maps by other methods than the classifier's own, on the same last feature map, so that
``eval`` scores them against the same boxes with the same metrics and intervals: the baselines a localization
method is compared with. Written here rather than taken from pytorch-grad-cam: dmfast's head is one fused op with
the disease-mask attention inside, its maps must stay on the device in batches for ``cam_boxes``, and the three
formulas are a few lines each (each checked against a hand-computed case in the tests).

- ``cam``: the head's own map (Zhou et al. 2016; Wang et al.'s ChestX-ray8 boxes): ``sum_k w_ck f_k``, attended
  by the disease masks when the model has them.
- ``gradcam`` (Selvaraju et al. 2017): ``relu(sum_k a_ck f_k)``, ``a_ck`` the spatial mean of ``d y_c / d f_k``.
  For a plain GAP + linear head this is ``relu(cam) / (h w)``; with disease masks the gradient carries them.
- ``gradcam++`` (Chattopadhay et al. 2018): the channel weights ``sum_ij alpha_ij relu(g_ij)`` with
  ``alpha = g^2 / (2 g^2 + (sum_ij f) g^3)`` (the closed form for an exponential of the score, as commonly used).
- ``eigencam`` (Muhammad & Yeasin 2020): gradient-free and class-agnostic: the feature map's projection on its
  first principal component (channels centred over the positions), its sign chosen to agree with the summed
  activations; every class gets the same map.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CAM_METHODS
from .errors import SettingsError


def class_maps(head, features: Tensor, method: str) -> tuple:
    """``(logits [B, C], maps [B, C, h, w])`` of ``method`` (one of :data:`~dmfast.config.CAM_METHODS`) on the last
    feature map ``features [B, K, h, w]`` through ``head`` (``features -> (logits, cams)``: the classifier's
    :meth:`~dmfast.models.CAMClassifier.head`), in float32 at least (a bf16/fp16 feature map is cast up)."""
    if method not in CAM_METHODS:
        raise SettingsError(f"CAM method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    features = features.detach().to(torch.promote_types(features.dtype, torch.float32))
    if method == "cam":
        return head(features)
    if method == "eigencam":
        logits, cams = head(features)
        return logits, eigen_map(features)[:, None].expand_as(cams).contiguous()
    with torch.enable_grad():
        leaf = features.clone().requires_grad_(True)
        logits, _ = head(leaf)
        maps = []
        for c in range(logits.shape[1]):
            (gradient,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=c + 1 < logits.shape[1])
            maps.append(_gradcam_pp(features, gradient) if method == "gradcam++" else _gradcam(features, gradient))
    return logits.detach(), torch.stack(maps, 1)


def _gradcam(features: Tensor, gradient: Tensor) -> Tensor:
    weights = gradient.mean((2, 3), keepdim=True)
    return F.relu((weights * features).sum(1))


def _gradcam_pp(features: Tensor, gradient: Tensor) -> Tensor:
    squared, cubed = gradient.square(), gradient.pow(3)
    denominator = 2 * squared + features.sum((2, 3), keepdim=True) * cubed
    alpha = torch.where(gradient != 0, squared / torch.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * F.relu(gradient)).sum((2, 3), keepdim=True)
    return F.relu((weights * features).sum(1))


def eigen_map(features: Tensor) -> Tensor:
    """``[B, h, w]``: each image's feature map projected on its first principal component over the positions."""
    batch, channels, height, width = features.shape
    rows = features.reshape(batch, channels, height * width).transpose(1, 2).double()  # [B, hw, K]
    rows = rows - rows.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    projection = rows @ vh[:, 0, :, None]  # [B, hw, 1]
    summed = features.sum(1).reshape(batch, height * width, 1).double()
    sign = torch.where(((projection - projection.mean(1, keepdim=True)) * summed).sum(1, keepdim=True) < 0, -1.0, 1.0)
    return (projection * sign).reshape(batch, height, width).to(features.dtype)
