"""The two networks: the CAM classifier (a torchvision ResNet whose global-average-pooling + fc head is the fused
``attention_cam`` op, optionally with per-class disease masks: the paper's attention retraining) and the alignment
network (a ResNet-18 that predicts scale, shift and rotation, applied with the fused warp)."""

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from . import cpu_variants, ops
from .config import ARCHS, PRECISIONS

# Bounds of the alignment parameters: scale 1 +- 0.3, shift +- 0.3 (half-widths), rotation +- 25 degrees.
LIMITS = {"scale": 0.3, "shift": 0.3, "angle": math.radians(25)}


def _dilate_last_stage(layer: nn.Sequential) -> None:
    """Output stride 32 -> 16: no downsampling in ``layer``; its later 3 x 3 convolutions dilate by 2 instead."""
    for index, block in enumerate(layer):
        for module in block.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3) and index > 0:
                module.dilation, module.padding = (2, 2), (2, 2)


def resolve_precision(precision: str, device, training: bool = False, amp: bool = False) -> str:
    """fp32, bf16 or fp16: what ``precision`` (:data:`~dmfast.config.PRECISIONS`) means on ``device``. "auto" is
    bf16 on CUDA GPUs that support it (fp16 on older ones), and on the CPU bf16 for inference where it computes in
    bf16 natively (:func:`~dmfast.cpu_variants.native_bf16`), else float32; CPU training stays in float32 (bf16 was
    twice as fast but not shown to be as accurate; docs/performance.md). ``amp`` (train's older switch) is fp16 on
    CUDA and float32 elsewhere; fp16 asked for by name needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if amp and precision not in ("auto", "fp32", "fp16"):
        raise ValueError(f"--amp is --precision fp16; it cannot go with --precision {precision}")
    device = torch.device(device)
    if amp:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if device.type == "cpu" and not training and cpu_variants.native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; on the CPU use bf16")
    return precision


def autocast_dtype(precision: str, device, amp: bool = False, training: bool = False):
    """The autocast dtype of ``precision`` on ``device`` (:func:`resolve_precision`), or None for float32; a model
    run in it is put in channels_last (:meth:`CAMClassifier.forward` keeps its head in float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device, training, amp))


# torch.compile's backend for --compile; the tests use "aot_eager" (the same graph capture, no code generation).
COMPILE_BACKEND = "inductor"


def compiled(module: nn.Module):
    """``module`` under ``torch.compile`` (one graph: the fused ops have fakes and autograd in Python); the first
    call of each input shape compiles, later ones run the generated kernels. The module's parameters are shared."""
    return torch.compile(module, backend=COMPILE_BACKEND, fullgraph=True)


class CAMClassifier(nn.Module):
    """ResNet-18/34/50 on grayscale X-rays (replicated to 3 channels) with the fused CAM head.

    ``forward`` returns logits ``[B, C]``; ``forward(images, cams=True)`` also returns the class activation maps
    ``[B, C, h, w]`` (attended by the disease masks when the model has them).

    ``cam_stride`` is the output stride of the feature map: 32 (the ResNet's own; 16 x 16 CAMs at 512 px) or 16,
    where conv5_x keeps conv4_x's resolution (its first block does not downsample and its 3 x 3 convolutions are
    dilated by 2 instead, as torchvision's ``replace_stride_with_dilation``), for finer CAMs on small images at
    about 1.7x the compute of ResNet-18. The weights are the same either way.
    """

    def __init__(self, arch: str = "resnet50", classes: int = 14, pretrained: bool = False, cam_stride: int = 32):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if cam_stride not in (16, 32):
            raise ValueError(f"cam_stride must be 16 or 32, got {cam_stride!r}")
        try:
            net = getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
        except (OSError, RuntimeError) as error:  # no network (urllib's errors are OSErrors), or a broken download
            raise ValueError(f"--pretrained: torchvision could not get the ImageNet weights of {arch} "
                             f"({type(error).__name__}: {error}); download them where there is a network and pass "
                             "them with --weights FILE") from None
        if cam_stride == 16:
            _dilate_last_stage(net.layer4)
        self.arch = arch
        self.cam_stride = cam_stride
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.fc = nn.Linear(net.fc.in_features, classes)
        self.register_buffer("masks", None)

    def load_torchvision_weights(self, path) -> tuple:
        """Load ResNet weights in torchvision's layout (e.g. ImageNet weights a user downloaded), also wrapped in a
        ``state_dict`` or ``model`` entry or with ``module.``/``model.`` key prefixes (DataParallel, training
        frameworks); the fc layer is kept when its shape fits. Returns (backbone tensors loaded, backbone tensors,
        keys not loaded). Fewer than 90% of the backbone is an error naming the mismatch (e.g. another
        architecture), never a silent random start."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "unsupported global" not in str(error).lower():
                raise ValueError(f"{path}: not a readable weights file (not a file torch.load reads: damaged, "
                                 "truncated or another format)") from None
            raise ValueError(f"{path}: not a plain state dict of tensors (it holds other Python objects, so it is not "
                             "read; a dmfast checkpoint is given with --init instead)") from None
        except Exception as error:  # not a file torch can read safely: say which and why
            raise ValueError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None
        if isinstance(state, dict) and str(state.get("format", "")).startswith("dmfast."):
            raise ValueError(f"{path}: a dmfast file ({state['format']}), not torchvision weights (a trained dmfast "
                             "classifier is given with --init)")
        while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in ("state_dict", "model")):
            state = next(state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict))
        if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path}: not a state dict of tensors")
        renamed = {}
        for key, value in state.items():
            while key.startswith(("module.", "model.")):
                key = key.partition(".")[2]
            for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
                key = new + key[len(old):] if key.startswith(old) else key
            renamed[key] = value
        own = self.state_dict()
        usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
        backbone = [k for k in own if not k.startswith("fc.") and k != "masks"]
        loaded = sum(k in usable for k in backbone)
        if loaded < 0.9 * len(backbone):
            wrong = [f"{k} {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}" for k in backbone
                     if k in renamed and k not in usable][:2]
            absent = [k for k in backbone if k not in renamed][:2]
            raise ValueError(f"{path}: only {loaded} of the {len(backbone)} backbone tensors of a {self.arch} match "
                             f"(shape mismatches: {wrong or 'none'}; missing: {absent or 'none'}); weights of "
                             "another architecture?")
        self.load_state_dict(usable, strict=False)
        return loaded, len(backbone), sorted(set(own) - set(usable) - {"masks"})

    def set_masks(self, masks: Tensor | None) -> None:
        """Disease masks ``[C, h, w]`` (resized to the feature map on use); classes without a mask should hold 0."""
        self.masks = None if masks is None else masks.detach().to(self.fc.weight)

    def stages(self, images: Tensor) -> list:
        """Feature maps of conv2_x .. conv5_x (layer1 .. layer4)."""
        x = self.stem(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward(self, images: Tensor, cams: bool = False):
        features = self.stages(images)[-1]
        # the head runs in full precision under autocast (bf16/fp16 backbones): one cast of the last feature map
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(self.fc.weight.dtype)
            masks = self.masks
            if masks is not None and masks.shape[-2:] != features.shape[-2:]:
                masks = F.interpolate(masks[None], size=features.shape[-2:], mode="bilinear", align_corners=False,
                                      antialias=True)[0]
            logits, maps = ops.attention_cam(features, self.fc.weight, self.fc.bias, masks)
        return (logits, maps) if cams else logits


class AlignmentNet(nn.Module):
    """ResNet-18 -> (sx, sy, tx, ty, angle), bounded, identity at initialisation.

    The last layer starts at zero, so training starts from the identity transform, and the five parameters pass
    through tanh into the :data:`LIMITS`, so no step can collapse or flip the image."""

    def __init__(self, input_size: int = 128):
        super().__init__()
        self.input_size = input_size
        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Linear(net.fc.in_features, 5)
        self.net = net
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the last layer: every image then gets the identity transform."""
        nn.init.zeros_(self.net.fc.weight)
        nn.init.zeros_(self.net.fc.bias)

    def parameters_of(self, images: Tensor) -> Tensor:
        """``[B, 5]``: sx, sy, tx, ty, angle (radians)."""
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True) if images.shape[-1] != self.input_size else images
        raw = torch.tanh(self.net(x.expand(-1, 3, -1, -1)).float())  # float32 under autocast too
        scale = 1 + LIMITS["scale"] * raw[:, :2]
        return torch.cat([scale, LIMITS["shift"] * raw[:, 2:4], LIMITS["angle"] * raw[:, 4:]], 1)

    def theta(self, images: Tensor) -> Tensor:
        p = self.parameters_of(images)
        return ops.affine_matrix(p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4])

    def align(self, images: Tensor) -> Tensor:
        """The aligned images (plain bilinear warp; float images in [-1, 1] map to the background -1 outside)."""
        return self.warp(images, self.theta(images))

    @staticmethod
    def warp(images: Tensor, theta: Tensor) -> Tensor:
        return ops.affine_smooth(images + 1, theta.to(images.dtype), 1) - 1
