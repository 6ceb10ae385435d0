"""The backbone registry (dmfast.backbones): every entry builds at CAM stride 16 and 32 with the same weights and
four feature stages, and the weight files people have (torchvision, timm, torchxrayvision's and CheXNet's
DenseNet-121) load with the expected count and the right tensors, checked by value. No download is possible here:
the files are randomly initialised state dicts in each layout."""

import pytest
import torch
import torchvision

from dmfast.backbones import XRV_PATHOLOGIES
from dmfast.data.dataset import FINDINGS
from dmfast.models import CAMClassifier

TIMM_MODELS = ("timm:convnext_atto", "timm:mobilenetv3_small_050")  # two families: ConvNeXt, MobileNetV3
ENTRIES = ("resnet18", "resnet34", "resnet50", "densenet121", *TIMM_MODELS)


def needs(arch: str):
    if arch.startswith("timm:"):
        pytest.importorskip("timm", reason="the timm extra is not installed (pip install 'dmfast[timm]')")


@pytest.mark.parametrize("arch", ENTRIES)
def test_every_entry_has_four_stages_and_both_cam_strides_with_the_same_weights(arch, gen):
    needs(arch)
    torch.manual_seed(0)
    coarse = CAMClassifier(arch, cam_stride=32).eval()
    fine = CAMClassifier(arch, cam_stride=16).eval()
    fine.load_state_dict(coarse.state_dict())  # the same tensors: the stride changes no weight
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    stages = coarse.stages(images)
    assert len(stages) == 4 and stages[-1].shape[1] == coarse.fc.in_features
    assert [s.shape[-1] for s in stages][-1] == 2 and fine.stages(images)[-1].shape[-1] == 4
    logits, cams = fine(images, cams=True)
    assert logits.shape == (2, 14) and cams.shape == (2, 14, 4, 4) and torch.isfinite(cams).all()


def counted(state: dict) -> int:
    """The tensors a load counts: weights and statistics, not BatchNorm's step counters."""
    return sum(not k.endswith("num_batches_tracked") for k in state)


def _densenet_state() -> dict:
    torch.manual_seed(1)
    return torchvision.models.densenet121(weights=None).state_dict()


def test_torchvision_densenet_weights_load_by_value(tmp_path):
    state = _densenet_state()
    torch.save(state, tmp_path / "densenet121.pth")
    model = CAMClassifier("densenet121")
    loaded, total, notes = model.load_weights(tmp_path / "densenet121.pth")
    assert loaded == total == counted(state) - 2 and "1000 outputs" in notes[0]
    key = "features.denseblock3.denselayer7.conv2.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_chexnet_checkpoint_with_old_densenet_keys_and_its_14_rows(tmp_path):
    """CheXNet (arnoweng/CheXNet): ``module.densenet121.features...`` with the ``norm.1`` keys of older torchvision,
    a ``classifier.0`` Linear of the 14 ChestX-ray14 classes in dmfast's order, inside ``state_dict``."""
    state = _densenet_state()
    old = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        for part in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.") if ".denselayer" in key else key
        old[f"module.densenet121.{key}"] = value
    head = torch.randn(14, 1024), torch.randn(14)
    old["module.densenet121.classifier.0.weight"], old["module.densenet121.classifier.0.bias"] = head
    torch.save({"epoch": 3, "state_dict": old}, tmp_path / "m-25012018-123527.pth.tar")
    model = CAMClassifier("densenet121")
    loaded, total, notes = model.load_weights(tmp_path / "m-25012018-123527.pth.tar")
    assert loaded == total and notes == ["classifier rows of 14 classes loaded"]
    key = "features.denseblock1.denselayer2.norm2.running_var"
    assert torch.equal(model.state_dict()[key], state[key])
    assert torch.equal(model.fc.weight, head[0]) and torch.equal(model.fc.bias, head[1])


def test_torchxrayvision_densenet_one_channel_stem_and_its_18_rows_by_name(tmp_path, gen):
    state = {k: v for k, v in _densenet_state().items() if not k.startswith("classifier.")}
    state["features.conv0.weight"] = torch.randn(64, 1, 7, 7)  # xrv reads one grey channel
    head = torch.randn(18, 1024), torch.randn(18)
    state["classifier.weight"], state["classifier.bias"] = head
    state["op_threshs"] = torch.rand(18)  # xrv keeps its calibration thresholds in the state dict
    torch.save(state, tmp_path / "xrv-densenet121-res224-all.pt")
    model = CAMClassifier("densenet121").eval()
    loaded, total, notes = model.load_weights(tmp_path / "xrv-densenet121-res224-all.pt")
    assert loaded == total
    assert notes == ["features.conv0.weight: a 1-channel convolution, spread over the 3 grey channels",
                     "classifier rows of 14 classes loaded"]
    for name in ("Effusion", "Hernia", "Pleural_Thickening"):
        row, source = FINDINGS.index(name), XRV_PATHOLOGIES.index(name)
        assert torch.equal(model.fc.weight[row], head[0][source]) and model.fc.bias[row] == head[1][source]
    grey = torch.rand(1, 1, 32, 32, generator=gen)
    first = model.features.conv0(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(first, torch.nn.functional.conv2d(grey, state["features.conv0.weight"], stride=2,
                                                                 padding=3))  # the same response to a grey image


@pytest.mark.parametrize("arch", TIMM_MODELS)
def test_timm_checkpoints_load_into_the_features_only_body(tmp_path, arch):
    needs(arch)
    import timm

    torch.manual_seed(2)
    state = timm.create_model(arch.removeprefix("timm:"), num_classes=14).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "timm.pth")
    model = CAMClassifier(arch)
    loaded, total, notes = model.load_weights(tmp_path / "timm.pth")
    assert loaded == total
    own = model.state_dict()
    matched = [k for k in state if f"body.{k}" in own or f"body.{k.replace('.', '_', 1)}" in own]
    assert counted(matched) == total
    for key in matched[:3] + matched[-3:]:
        mine = f"body.{key}" if f"body.{key}" in own else f"body.{key.replace('.', '_', 1)}"
        assert torch.equal(own[mine], state[key])


def test_unknown_backbones_are_named():
    with pytest.raises(ValueError, match="arch must be one of resnet18, resnet34, resnet50, densenet121 or timm:"):
        CAMClassifier("vgg16")
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="arch timm:convnext_atom: timm has no such model \\(did you mean"):
        CAMClassifier("timm:convnext_atom")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from dmfast.testing import phantom_with_cache

    return phantom_with_cache(tmp_path_factory.mktemp("phantom"), count=60, size=64, seed=4)


@pytest.mark.parametrize("arch", ["resnet34", "resnet50", "densenet121", *TIMM_MODELS])
def test_every_backbone_trains_resumes_bit_identically_exports_predicts_and_evaluates(phantom, tmp_path, arch):
    """ResNet-18 does all of this in the other suites; here every other entry, each through every stage."""
    needs(arch)
    from click.testing import CliRunner

    from cli.main import main
    from dmfast import checkpoints, train
    from dmfast.config import TrainConfig

    data, cache = phantom
    base = dict(data=str(data), cache=str(cache), arch=arch, size=64, cam_stride=16, batch=8, epochs=2, max_steps=1,
                lr=1e-3, split="patients", val_fraction=0.2)
    straight = checkpoints.load(train.run(TrainConfig(out=str(tmp_path / "a"), **base)), checkpoints.CLASSIFIER)
    train.run(TrainConfig(out=str(tmp_path / "b"), **{**base, "epochs": 1}))
    resumed = checkpoints.load(train.run(TrainConfig(out=str(tmp_path / "b"), **base), resume=True),
                               checkpoints.CLASSIFIER)
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    model = checkpoints.load(tmp_path / "b" / "model.pt", checkpoints.MODEL)
    assert model["classifier"]["arch"] == arch
    runner = CliRunner()
    predicted = runner.invoke(main, ["predict", str(tmp_path / "b" / "model.pt"), str(data / "images"), "--out",
                                     str(tmp_path / "p"), "--min-probability", "0"])
    assert predicted.exit_code == 0, predicted.output
    assert (tmp_path / "p" / "predictions.json").is_file()
    evaluated = runner.invoke(main, ["eval", str(data), "--cache", str(cache), "--checkpoint",
                                     f"m={tmp_path / 'b' / 'model.pt'}", "--out", str(tmp_path / "e"),
                                     "--bootstrap", "0", "--overlays", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "e" / "eval.json").is_file()


def test_the_alignment_network_reads_the_layout_before_the_registry(gen):
    """dmfast's alignment checkpoints before the registry held a torchvision ResNet-18 as ``net``: the same
    network, the same transforms."""
    from dmfast.models import AlignmentNet

    torch.manual_seed(5)
    old = torchvision.models.resnet18(weights=None)
    old.fc = torch.nn.Linear(512, 5)
    net = AlignmentNet(32).eval()
    net.load_state_dict({f"net.{k}": v for k, v in old.state_dict().items()})
    images = torch.rand(3, 1, 32, 32, generator=gen) * 2 - 1
    raw = torch.tanh(old.eval()(images.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(net.parameters_of(images)[:, 2:4], 0.3 * raw[:, 2:4])
    assert AlignmentNet(32, "densenet121").head.in_features == 1024  # any entry of the registry
