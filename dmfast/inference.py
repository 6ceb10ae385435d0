"""Trained models at inference: loading a classifier or an alignment module from its checkpoint, and running a
classifier on uint8 image batches (probabilities and class activation maps, on aligned images when it was trained
on them). Shared by ``dmfast train`` (validation), ``align`` (perceptual loss), ``masks`` and ``eval``."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoints, ops
from .config import TrainConfig, from_dict
from .data.chestxray14 import FINDINGS
from .data.images import to_model_input
from .data.splits import Splits
from .models import AlignmentNet, CAMClassifier


def load_classifier(path, device="cpu") -> tuple:
    """A trained classifier from a ``dmfast train`` checkpoint, in eval mode with its disease masks (if it was
    trained with some): ``(model, config, state)``."""
    state = checkpoints.load(path, checkpoints.CLASSIFIER)
    config = from_dict(TrainConfig, state["config"])
    model = CAMClassifier(config.arch, len(FINDINGS), cam_stride=config.cam_stride)
    model.set_masks(state["model"].get("masks"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state


def load_aligner(path, device="cpu") -> AlignmentNet:
    """A trained alignment module from a ``dmfast align`` checkpoint, in eval mode."""
    state = checkpoints.load(path, checkpoints.ALIGNMENT)
    net = AlignmentNet(**state["net_config"])
    net.load_state_dict(state["model"])
    return net.to(device).eval()


@dataclass
class Prediction:
    probabilities: torch.Tensor  # [B, C]
    cams: torch.Tensor  # [B, C, h, w], in the frame the model saw (aligned when it was trained aligned)
    theta: torch.Tensor | None  # [B, 2, 3] alignment transforms (aligned frame -> image frame), or None


class Classifier:
    """``Classifier(checkpoint)(pixels)`` -> :class:`Prediction` for a ``dmfast train`` checkpoint."""

    def __init__(self, checkpoint, device=None):
        self.path = Path(checkpoint)
        self.device = torch.device(device) if device else ops.default_device()
        self.model, self.config, state = load_classifier(checkpoint, self.device)
        self.splits = Splits(**state["splits"])
        self.aligner = None
        if self.config.aligned:
            if not Path(self.config.aligned).is_file():
                raise FileNotFoundError(f"{checkpoint} was trained on aligned images, but its alignment checkpoint "
                                        f"{self.config.aligned} is missing")
            self.aligner = load_aligner(self.config.aligned, self.device)

    @property
    def masks(self) -> torch.Tensor | None:
        return self.model.masks

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> Prediction:
        images = to_model_input(pixels).to(self.device)
        theta = None
        if self.aligner is not None:
            theta = self.aligner.theta(images)
            images = self.aligner.warp(images, theta)
        logits, cams = self.model(images, cams=True)
        return Prediction(torch.sigmoid(logits).float(), cams.float(), theta)


def to_image_frame(maps: torch.Tensor, theta: torch.Tensor | None, resolution: int) -> torch.Tensor:
    """Maps ``[N, h, w]`` upsampled to ``resolution`` and, for maps of aligned images (``theta [N, 2, 3]``, aligned
    -> image frame), warped back onto the original image, so boxes drawn from them land on the X-ray itself.
    Outside the aligned field of view the map takes its own minimum (it says nothing there)."""
    up = F.interpolate(maps[:, None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    if theta is None:
        return up[:, 0]
    low = up.amin((2, 3), keepdim=True)
    inverse = ops.affine_inverse(theta).to(up.dtype)
    return (ops.affine_smooth((up - low).contiguous(), inverse, 1) + low)[:, 0]
