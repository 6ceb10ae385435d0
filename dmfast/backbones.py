"""The backbone registry: the networks a CAM classifier stands on, each in one entry that knows how to build it
(torchvision's or timm's), its four feature stages (conv2_x..conv5_x and their like: the alignment's perceptual
loss reads them, the last is the CAM's feature map), the channels of that last map, how to reach CAM stride 16 or
32 without changing a weight, and how the weight files people have name its tensors. A backbone is added here and
nowhere else.

Names: ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121`` (torchvision) and ``timm:<model>``, any timm model
that offers ``features_only`` and ``output_stride`` (``pip install 'dmfast[timm]'``), e.g. ``timm:convnext_tiny``,
``timm:efficientnet_b0``.
"""

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .config import ARCHS, TIMM
from .data.dataset import FINDINGS
from .errors import ModelFileError, SettingsError

# torchxrayvision's 18 outputs (its ``default_pathologies``), in the order of its DenseNet-121 classifier's rows
XRV_PATHOLOGIES = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
                   "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
                   "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")


@dataclass(frozen=True)
class Backbone:
    """How one architecture is built and read: ``build(pretrained, cam_stride) -> (modules, channels)`` gives the
    named modules the classifier holds (their names are its state dict's prefixes) and the channels of the last
    feature map; ``stages(owner, images)`` runs them on 3-channel images and returns the four stages' maps;
    ``rename(key, own)`` turns a key of a weight file of this architecture (prefixes already stripped) into one of
    ``own`` (the classifier's state dict) where it can;
    ``head`` names the file's classifier layer, whose rows may be reused."""

    build: Callable
    stages: Callable
    rename: Callable
    head: tuple = ()


def _pretrained_error(arch: str, error: Exception) -> SettingsError:
    return SettingsError(f"--pretrained: the ImageNet weights of {arch} could not be fetched ({type(error).__name__}: "
                         f"{error}); download them where there is a network and pass them with --weights FILE")


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


def _torchvision(arch: str, pretrained: bool) -> nn.Module:
    try:
        return getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
    except (OSError, RuntimeError) as error:  # no network (urllib's errors are OSErrors), or a broken download
        raise _pretrained_error(arch, error) from None


def _resnet(arch: str) -> Backbone:
    """A torchvision ResNet as ``stem`` (conv1, bn1, relu, maxpool) and ``layer1..4``; stride 16 as torchvision's
    ``replace_stride_with_dilation`` does it for conv5_x."""
    def build(pretrained: bool, cam_stride: int) -> tuple:
        net = _torchvision(arch, pretrained)
        if cam_stride == 16:
            _dilate_last_stage(net.layer4)
        modules = {"stem": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), "layer1": net.layer1,
                   "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4}
        return modules, net.fc.in_features

    def stages(owner: nn.Module, x: torch.Tensor) -> list:
        x = owner.stem(x)
        out = []
        for layer in (owner.layer1, owner.layer2, owner.layer3, owner.layer4):
            x = layer(x)
            out.append(x)
        return out

    def rename(key: str, own: dict) -> str:
        for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return Backbone(build, stages, rename, ("fc",))


# the keys of DenseNets saved before torchvision renamed "norm.1" to "norm1" (CheXNet's checkpoints among them)
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                            r"running_var|num_batches_tracked))$")


def _densenet(arch: str) -> Backbone:
    """A torchvision DenseNet as its ``features``; stride 16 without the last transition's 2 x 2 pooling (the
    weights are the same: that pooling has none)."""
    def build(pretrained: bool, cam_stride: int) -> tuple:
        net = _torchvision(arch, pretrained)
        if cam_stride == 16:
            net.features.transition3.pool = nn.Identity()
        return {"features": net.features}, net.classifier.in_features

    def stages(owner: nn.Module, x: torch.Tensor) -> list:
        out = []
        for name, module in owner.features.named_children():
            x = module(x)
            if name in ("denseblock1", "denseblock2", "denseblock3"):
                out.append(x)
        return out + [F.relu(x)]  # after norm5, as torchvision's forward

    def rename(key: str, own: dict) -> str:
        key = key.removeprefix(f"{arch}.")  # CheXNet: module.densenet121.features...
        match = _OLD_DENSE_KEY.match(key)
        return match.group(1) + match.group(2) if match else key

    return Backbone(build, stages, rename, ("classifier",))


def _timm(name: str) -> Backbone:
    """A timm model's ``features_only`` network as ``body`` (its own module names below it), its last four
    feature levels as the stages."""
    def build(pretrained: bool, cam_stride: int) -> tuple:
        timm = _timm_module(name)
        try:
            body = timm.create_model(name, pretrained=pretrained, features_only=True, output_stride=cam_stride)
        except (OSError, RuntimeError) as error:
            if pretrained:
                raise _pretrained_error(f"{TIMM}{name}", error) from None
            raise SettingsError(f"arch {TIMM}{name}: timm cannot build it ({type(error).__name__}: {error})") from None
        except (TypeError, ValueError, AssertionError, NotImplementedError) as error:  # e.g. no output_stride 16
            raise SettingsError(f"arch {TIMM}{name}: timm cannot build it with features_only and output_stride "
                                f"{cam_stride} ({type(error).__name__}: {error}); try --cam-stride 32 or another "
                                "model") from None
        if len(body.feature_info.channels()) < 4:
            levels = len(body.feature_info.channels())
            raise SettingsError(f"arch {TIMM}{name}: {levels} feature levels; dmfast needs 4")
        return {"body": body}, body.feature_info.channels()[-1]

    def stages(owner: nn.Module, x: torch.Tensor) -> list:
        return list(owner.body(x))[-4:]

    def rename(key: str, own: dict) -> str:
        key = key.removeprefix("body.")
        flat = key.replace(".", "_", 1)  # features_only flattens a top-level Sequential: stages.0 -> stages_0
        return f"body.{flat}" if f"body.{key}" not in own and f"body.{flat}" in own else f"body.{key}"

    return Backbone(build, stages, rename, ("head.fc", "head", "classifier", "fc"))


def _timm_module(name: str):
    try:
        import timm
    except ImportError:
        raise SettingsError(f"arch {TIMM}{name} needs timm: pip install 'dmfast[timm]'") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        raise SettingsError(f"arch {TIMM}{name}: timm has no such model" +
                            (f" (did you mean {', '.join(close)}?)" if close else ""))
    return timm


def backbone(arch: str) -> Backbone:
    """The registry's entry for ``arch`` (see the module); an unknown name is an error listing the known ones."""
    if arch in ("resnet18", "resnet34", "resnet50"):
        return _resnet(arch)
    if arch == "densenet121":
        return _densenet(arch)
    if isinstance(arch, str) and arch.startswith(TIMM) and len(arch) > len(TIMM):
        return _timm(arch[len(TIMM):])
    raise SettingsError(f"arch must be one of {', '.join(ARCHS)} or {TIMM}<model>, got {arch!r}")


def read_weights(path) -> dict:
    """The state dict of a weight file (read weights only), unwrapped from ``state_dict``/``model`` entries."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():
            raise ModelFileError(f"{path}: not a readable weights file (not a file torch.load reads: damaged, "
                                 "truncated or another format)") from None
        raise ModelFileError(f"{path}: not a plain state dict of tensors (it holds other Python objects, so it is not "
                             "read; a dmfast checkpoint is given with --init instead)") from None
    except Exception as error:  # not a file torch can read safely: say which and why
        raise ModelFileError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and str(state.get("format", "")).startswith("dmfast."):
        raise ModelFileError(f"{path}: a dmfast file ({state['format']}), not a backbone's weights (a trained dmfast "
                             "classifier is given with --init)")
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in ("state_dict", "model")):
        state = next(state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelFileError(f"{path}: not a state dict of tensors")
    return state


def foreign_weights(state: dict, entry: Backbone, own: dict) -> tuple:
    """A weight file's ``state`` in the classifier's names (``own``: its state dict): ``(renamed, head, notes)``.
    Wrappers' prefixes (``module.``, ``model.``) go, the entry renames the rest, and the file's classifier layer
    becomes ``head`` (``{"weight", "bias"}``, for :func:`load_head`). A 1-channel first convolution (the
    torchxrayvision models read one grey channel) is spread over dmfast's three identical grey channels: the same
    response to a grey image."""
    renamed, head, notes = {}, {}, []
    heads = tuple(f"{name}." for name in entry.head)
    for key, value in state.items():
        while key.startswith(("module.", "model.")):
            key = key.partition(".")[2]
        bare, key = key, entry.rename(key, own).replace("classifier.0.", "classifier.")  # CheXNet: (Linear, Sigmoid)
        layer, _, field = next((k for k in (bare, key) if k.startswith(heads)), key).rpartition(".")
        if layer in entry.head and field in ("weight", "bias"):
            head[field] = value
            continue
        if key in own and value.dim() == 4 and own[key].dim() == 4 and value.shape[1] == 1 and \
                own[key].shape[1] == 3 and value.shape[:1] + value.shape[2:] == own[key].shape[:1] + own[key].shape[2:]:
            value = value.expand(-1, 3, -1, -1) / 3
            notes.append(f"{key}: a 1-channel convolution, spread over the 3 grey channels")
        renamed[key] = value
    return renamed, head, notes


def load_head(head: dict, fc: nn.Linear) -> list:
    """Copy a weight file's classifier rows into ``fc`` where they are dmfast's classes: all of them when it has
    as many rows, by name when it has torchxrayvision's 18; returns notes naming what was and was not loaded."""
    weight, bias = head.get("weight"), head.get("bias")
    if weight is None or weight.dim() != 2 or weight.shape[1] != fc.in_features:
        return ["its classifier does not fit (not loaded: the head starts fresh)"] if weight is not None else []
    if weight.shape[0] == fc.out_features:
        rows = list(range(fc.out_features))
        sources = rows
    elif weight.shape[0] == len(XRV_PATHOLOGIES):
        rows = [i for i, name in enumerate(FINDINGS) if name in XRV_PATHOLOGIES]
        sources = [XRV_PATHOLOGIES.index(FINDINGS[i]) for i in rows]
    else:
        return [f"its classifier has {weight.shape[0]} outputs, not dmfast's {fc.out_features} classes or "
                f"torchxrayvision's {len(XRV_PATHOLOGIES)} (not loaded: the head starts fresh)"]
    with torch.no_grad():
        fc.weight[rows] = weight[sources].to(fc.weight)
        if bias is not None and bias.shape == (weight.shape[0],):
            fc.bias[rows] = bias[sources].to(fc.bias)
    fresh = [name for i, name in enumerate(FINDINGS) if i not in rows]
    return [f"classifier rows of {len(rows)} classes loaded" + (f"; fresh: {', '.join(fresh)}" if fresh else "")]
