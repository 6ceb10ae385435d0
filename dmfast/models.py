"""The two networks: the CAM classifier (a torchvision ResNet whose global-average-pooling + fc head is the fused
``attention_cam`` op, optionally with per-class disease masks: the paper's attention retraining) and the alignment
network (a ResNet-18 that predicts scale, shift and rotation, applied with the fused warp)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbones, cpu_variants, ops
from .config import CAM_STRIDES, PRECISIONS
from .errors import ModelFileError, SettingsError

# Bounds of the alignment parameters: scale 1 +- 0.3, shift +- 0.3 (half-widths), rotation +- 25 degrees.
LIMITS = {"scale": 0.3, "shift": 0.3, "angle": math.radians(25)}


def resolve_precision(precision: str, device, training: bool = False, amp: bool = False) -> str:
    """fp32, bf16 or fp16: what ``precision`` (:data:`~dmfast.config.PRECISIONS`) means on ``device``. "auto" is
    bf16 on CUDA GPUs that support it (fp16 on older ones), and on the CPU bf16 for inference where it computes in
    bf16 natively (:func:`~dmfast.cpu_variants.native_bf16`), else float32; CPU training stays in float32 (bf16 was
    2.4-2.5x as fast past its float32 start, TrainConfig.fp32_steps, and +0.001 AUROC [-0.009, +0.010] against
    float32 over 68 seeds of the demo's training from random weights; but measured on one CPU model, and a
    training's result would then depend on the CPU it ran on; docs/performance.md). ``amp`` (train's older switch)
    is fp16 on CUDA and float32 elsewhere; fp16 asked for by name needs CUDA."""
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if amp and precision not in ("auto", "fp32", "fp16"):
        raise SettingsError(f"--amp is --precision fp16; it cannot go with --precision {precision}")
    device = torch.device(device)
    if amp:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if device.type == "cpu" and not training and cpu_variants.native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SettingsError("--precision fp16 needs a CUDA device; on the CPU use bf16")
    return precision


def autocast_dtype(precision: str, device, amp: bool = False, training: bool = False):
    """The autocast dtype of ``precision`` on ``device`` (:func:`resolve_precision`), or None for float32; a model
    run in it is put in channels_last (:meth:`CAMClassifier.forward` keeps its head in float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device, training, amp))


def convolutions_stored_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` (for inference under autocast in ``dtype``) with its plain convolutions' weights and biases stored
    in ``dtype``: autocast would cast them from float32 at every call (a copy of every weight per batch, a tenth
    of a ResNet-18's bf16 pass at 128 px); the numbers are the same. Other layers keep theirs (the CAM head
    computes in float32; a convolution that transforms its weight first, as timm's StdConv, keeps float32)."""
    for layer in module.modules():
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            layer.to(dtype)
    return module


# torch.compile's backend for --compile; the tests use "aot_eager" (the same graph capture, no code generation).
COMPILE_BACKEND = "inductor"


def compiled(module: nn.Module):
    """``module`` under ``torch.compile`` (one graph: the fused ops have fakes and autograd in Python); the first
    call of each input shape compiles, later ones run the generated kernels. The module's parameters are shared."""
    return torch.compile(module, backend=COMPILE_BACKEND, fullgraph=True)


class CAMClassifier(nn.Module):
    """A backbone of the registry (:mod:`dmfast.backbones`: ResNet-18/34/50, DenseNet-121, timm models) on
    grayscale X-rays (replicated to 3 channels) with the fused CAM head.

    ``forward`` returns logits ``[B, C]``; ``forward(images, cams=True)`` also returns the class activation maps
    ``[B, C, h, w]`` (attended by the disease masks when the model has them).

    ``cam_stride`` is the output stride of the feature map: 32 (16 x 16 CAMs at 512 px) or 16, finer CAMs reached
    without changing a weight (for a ResNet, conv5_x keeps conv4_x's resolution and dilates its 3 x 3 convolutions
    by 2, as torchvision's ``replace_stride_with_dilation``: about 1.7x the compute of ResNet-18).
    """

    def __init__(self, arch: str = "resnet50", classes: int = 14, pretrained: bool = False, cam_stride: int = 32):
        super().__init__()
        if cam_stride not in CAM_STRIDES:
            raise SettingsError(f"cam_stride must be one of {', '.join(map(str, CAM_STRIDES))}, got {cam_stride!r}")
        self.backbone = backbones.backbone(arch)
        modules, channels = self.backbone.build(pretrained, cam_stride)
        for name, module in modules.items():  # the backbone's own names: its state dict's prefixes
            self.add_module(name, module)
        self.arch = arch
        self.cam_stride = cam_stride
        self.fc = nn.Linear(channels, classes)
        self.register_buffer("masks", None)

    def load_weights(self, path) -> tuple:
        """Load a backbone's weights in the layouts people have (:func:`dmfast.backbones.foreign_weights`:
        torchvision, timm, torchxrayvision's and CheXNet's DenseNet-121, wrapped in ``state_dict``/``model`` entries or
        behind ``module.``/``model.`` prefixes). The file's classifier rows are kept where they fit: all of them
        when it has dmfast's classes, and by name for torchxrayvision's 18 pathologies. Returns (backbone tensors
        loaded, backbone tensors, notes on what was not loaded). Fewer than 90% of the backbone is an error naming
        the mismatch (e.g. another architecture), never a silent random start."""
        own = self.state_dict()
        renamed, head, notes = backbones.foreign_weights(backbones.read_weights(path), self.backbone, own)
        usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
        # the weights and statistics; BatchNorm's step counters are not (files of older torch lack them)
        body = [k for k in own if not k.startswith("fc.") and k != "masks" and not k.endswith("num_batches_tracked")]
        loaded = sum(k in usable for k in body)
        if loaded < 0.9 * len(body):
            wrong = [f"{k} {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}" for k in body
                     if k in renamed and k not in usable][:2]
            absent = [k for k in body if k not in renamed][:2]
            raise ModelFileError(f"{path}: only {loaded} of the {len(body)} backbone tensors of a {self.arch} match "
                                 f"(shape mismatches: {wrong or 'none'}; missing: {absent or 'none'}); weights of "
                                 "another architecture?")
        self.load_state_dict(usable, strict=False)
        return loaded, len(body), notes + backbones.load_head(head, self.fc)

    def set_masks(self, masks: Tensor | None) -> None:
        """Disease masks ``[C, h, w]`` (resized to the feature map on use); classes without a mask should hold 0."""
        self.masks = None if masks is None else masks.detach().to(self.fc.weight)

    def stages(self, images: Tensor) -> list:
        """The backbone's four feature maps (a ResNet's conv2_x .. conv5_x), the last one the CAMs'."""
        return self.backbone.stages(self, images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)

    def forward(self, images: Tensor, cams: bool = False, pooled: bool = False):
        """Logits; with ``cams`` also the CAMs; with ``pooled`` also the last feature map averaged over its
        positions ``[B, K]`` (float32: what the out-of-distribution score compares)."""
        features = self.stages(images)[-1]
        logits, maps = self.head(features)
        if pooled:
            return logits, maps, features.float().mean((2, 3))
        return (logits, maps) if cams else logits

    def head(self, features: Tensor) -> tuple:
        """``(logits, cams)`` of the last feature map: the fused CAM head, with the disease masks when the model has
        them. It runs in full precision under autocast (bf16/fp16 backbones): one cast of the feature map."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(self.fc.weight.dtype)
            masks = self.masks
            if masks is not None and masks.shape[-2:] != features.shape[-2:]:
                masks = F.interpolate(masks[None], size=features.shape[-2:], mode="bilinear", align_corners=False,
                                      antialias=True)[0]
            return ops.attention_cam(features, self.fc.weight, self.fc.bias, masks)


class AlignmentNet(nn.Module):
    """A backbone of the registry (ResNet-18 by default, as the paper's) -> (sx, sy, tx, ty, angle), bounded,
    identity at initialisation.

    The last layer starts at zero, so training starts from the identity transform, and the five parameters pass
    through tanh into the :data:`LIMITS`, so no step can collapse or flip the image."""

    def __init__(self, input_size: int = 128, arch: str = "resnet18"):
        super().__init__()
        self.input_size, self.arch = input_size, arch
        self.backbone = backbones.backbone(arch)
        modules, channels = self.backbone.build(False, 32)
        self.body = nn.Module()
        for name, module in modules.items():
            self.body.add_module(name, module)
        self.head = nn.Linear(channels, 5)
        self.reset_to_identity()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also the layout of dmfast before the registry: a torchvision ResNet-18 as ``net`` (``net.conv1``,
        ``net.layer1`` .., ``net.fc``), the same network."""
        if any(k.startswith("net.") for k in state_dict):
            renamed = {}
            for key, value in state_dict.items():
                key = key.removeprefix("net.")
                key = "head." + key[3:] if key.startswith("fc.") else "body." + self.backbone.rename(key, {})
                renamed[key] = value
            state_dict = renamed
        return super().load_state_dict(state_dict, strict, assign)

    def reset_to_identity(self) -> None:
        """Zero the last layer: every image then gets the identity transform."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def parameters_of(self, images: Tensor) -> Tensor:
        """``[B, 5]``: sx, sy, tx, ty, angle (radians)."""
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True) if images.shape[-1] != self.input_size else images
        features = self.backbone.stages(self.body, x.expand(-1, 3, -1, -1))[-1]
        raw = torch.tanh(self.head(features.mean((2, 3))).float())  # float32 under autocast too
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
