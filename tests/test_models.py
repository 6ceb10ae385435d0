import pytest
import torch
import torchvision

from dmfast.models import CAMClassifier


def test_torchvision_weights_load_and_the_head_is_the_fused_cam(tmp_path, gen):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = CAMClassifier("resnet18", classes=14)
    loaded, total, notes = model.load_weights(path)
    assert loaded == total == sum(not k.endswith("num_batches_tracked") for k in reference.state_dict()) - 2
    assert notes == ["its classifier has 1000 outputs, not dmfast's 14 classes or torchxrayvision's 18 (not loaded: "
                     "the head starts fresh)"]
    assert torch.equal(model.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    model.eval()
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    logits, cams = model(images, cams=True)
    assert logits.shape == (2, 14) and cams.shape == (2, 14, 2, 2)
    features = model.stages(images)[-1]
    torch.testing.assert_close(logits, model.fc(features.mean((2, 3))), rtol=1e-5, atol=1e-5)
    model.set_masks(torch.rand(14, 8, 8, generator=gen))  # resized to the feature map on use
    attended, attended_cams = model(images, cams=True)
    assert attended.shape == (2, 14) and not torch.allclose(attended_cams, cams)


@pytest.mark.parametrize("layout", ["wrapped in state_dict", "wrapped in model", "module. prefix",
                                    "model. prefix", "checkpoint with module.model. prefix"])
def test_torchvision_weights_in_common_layouts_load(tmp_path, layout):
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    saved = {
        "wrapped in state_dict": {"state_dict": state, "epoch": torch.tensor(3)},
        "wrapped in model": {"model": state},
        "module. prefix": {f"module.{k}": v for k, v in state.items()},
        "model. prefix": {f"model.{k}": v for k, v in state.items()},
        "checkpoint with module.model. prefix": {"state_dict": {f"module.model.{k}": v for k, v in state.items()}},
    }[layout]
    torch.save(saved, tmp_path / "weights.pth")
    model = CAMClassifier("resnet18", classes=14)
    loaded, total, _ = model.load_weights(tmp_path / "weights.pth")
    assert loaded == total
    assert torch.equal(model.layer3[0].downsample[0].weight, reference.layer3[0].downsample[0].weight)


def test_weights_of_another_architecture_or_no_weights_fail_loudly(tmp_path, monkeypatch):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    model = CAMClassifier("resnet18", classes=14)
    before = model.layer1[0].conv1.weight.clone()
    with pytest.raises(ValueError, match=r"resnet50.pth: only \d+ of the \d+ backbone tensors of a resnet18 match"):
        model.load_weights(tmp_path / "resnet50.pth")
    assert torch.equal(model.layer1[0].conv1.weight, before)  # nothing half-loaded
    torch.save({"features.conv0.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "densenet.pth")
    with pytest.raises(ValueError, match="only 0 of the .* missing: \\['stem.0.weight'"):
        model.load_weights(tmp_path / "densenet.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a readable weights file"):
        model.load_weights(tmp_path / "junk.pth")
    torch.save({"lr": 0.1}, tmp_path / "config.pth")
    with pytest.raises(ValueError, match="config.pth: not a state dict of tensors"):
        model.load_weights(tmp_path / "config.pth")

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(ValueError, match="--pretrained: the ImageNet weights of resnet18 could not be fetched"):
        CAMClassifier("resnet18", pretrained=True)


def test_cam_stride_16_matches_torchvisions_dilated_resnet50(gen):
    model = CAMClassifier("resnet50", classes=14, cam_stride=16).eval()
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    reference.load_state_dict({k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v
                               for k, v in model.state_dict().items() if not k.startswith("fc.")}, strict=False)
    images = torch.rand(1, 1, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        features = model.stages(images)[-1]
        expected = torch.nn.Sequential(*list(reference.children())[:-2])(images.expand(-1, 3, -1, -1))
    assert features.shape == (1, 2048, 4, 4)
    torch.testing.assert_close(features, expected)


def test_cam_stride_16_doubles_the_resnet18_cam_resolution(gen):
    coarse, fine = CAMClassifier("resnet18", cam_stride=32), CAMClassifier("resnet18", cam_stride=16)
    fine.load_state_dict(coarse.state_dict())  # same weights, only strides and dilations differ
    images = torch.rand(2, 1, 96, 96, generator=gen)
    assert coarse(images, cams=True)[1].shape == (2, 14, 3, 3)
    assert fine(images, cams=True)[1].shape == (2, 14, 6, 6)
    with pytest.raises(ValueError, match="cam_stride"):
        CAMClassifier("resnet18", cam_stride=8)


def test_a_bf16_training_step_agrees_with_float32():
    """--precision bf16: the backbone under autocast in channels_last, the fused CAM head in float32. On the same
    weights and batch the weighted-BCE loss is within 2% of float32's and the gradient points the same way (cosine
    >= 0.9 over all weights, >= 0.8 for every layer: bf16 keeps 8 bits of mantissa), with the head's own outputs
    in float32."""
    from dmfast import training
    from dmfast.models import autocast_dtype

    torch.manual_seed(0)
    model = CAMClassifier("resnet18", 14, cam_stride=16)
    images = torch.rand(8, 1, 64, 64) * 2 - 1
    targets = (torch.rand(8, 14) < 0.3).float()
    results = {}
    for name in ("fp32", "bf16"):
        low = autocast_dtype(name, "cpu")
        model.zero_grad()
        net = model.to(memory_format=torch.channels_last) if low is not None else model
        with torch.autocast("cpu", dtype=low, enabled=low is not None):
            logits, cams = net(images.contiguous(memory_format=torch.channels_last) if low else images, cams=True)
            loss = training.weighted_bce(logits.float(), targets)
        assert logits.dtype == cams.dtype == torch.float32
        loss.backward()
        results[name] = loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model = model.to(memory_format=torch.contiguous_format)
    (exact, exact_grads), (low_loss, low_grads) = results["fp32"], results["bf16"]
    assert abs(low_loss - exact) <= 0.02 * abs(exact)
    def cosine(a, b) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    keys = [k for k, g in exact_grads.items() if g.norm() > 0]
    assert cosine(torch.cat([exact_grads[k].flatten() for k in keys]),
                  torch.cat([low_grads[k].flatten() for k in keys])) >= 0.9  # 0.94 here
    worst = min((cosine(exact_grads[k], low_grads[k]), k) for k in keys)  # the early BatchNorms, about 0.9
    assert worst[0] >= 0.8, worst
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="--amp is --precision fp16"):
        autocast_dtype("bf16", "cpu", amp=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("int8", "cpu")
    assert autocast_dtype("fp32", "cpu", amp=True) is None  # --amp on the CPU: as before


def test_precision_auto_follows_the_device(monkeypatch):
    """"auto": bf16 inference on CPUs with native bf16 (AVX512-BF16, AMX-BF16), float32 on the others and in CPU
    training; DMFAST_CPU_BF16 overrides the detection, and anything but 0 or 1 there is refused."""
    from dmfast import cpu_variants
    from dmfast.models import resolve_precision

    monkeypatch.delenv("DMFAST_CPU_BF16")
    for flags, native in (({"avx2", "avx512f", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True),
                          ({"avx2", "avx512f"}, False), (None, False)):
        monkeypatch.setattr(cpu_variants, "_cpu_flags", lambda flags=flags: flags)
        assert cpu_variants.native_bf16() is native
        assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert resolve_precision("auto", "cpu", training=True) == "fp32"
        assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for forced, expected in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv("DMFAST_CPU_BF16", forced)
        assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "cpu", amp=True) == "fp32"  # --amp alone: fp16 on CUDA, nothing on the CPU
    monkeypatch.setenv("DMFAST_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="DMFAST_CPU_BF16='yes': give 0 or 1"):
        resolve_precision("auto", "cpu")


def test_compiled_classifier_matches_eager(monkeypatch, gen):
    """--compile: the classifier (fused CAM head and mask attention included) is captured as one graph, and its
    outputs, loss and gradients are the eager model's. The capture is what this tests (backend aot_eager); inductor's
    code generation is torch's."""
    from dmfast import models, training

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = CAMClassifier("resnet18", 14, cam_stride=16)
    model.set_masks(torch.rand(14, 4, 4, generator=gen))
    images = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    targets = (torch.rand(4, 14, generator=gen) < 0.3).float()
    results = []
    for forward in (model, models.compiled(model)):
        model.zero_grad()
        logits, cams = forward(images, cams=True)
        loss = training.weighted_bce(logits, targets)
        loss.backward()
        results.append((logits.detach(), cams.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits, cams, grads), (c_logits, c_cams, c_grads) = results
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_cams, cams, rtol=1e-5, atol=1e-5)
    for g, c in zip(grads, c_grads):
        torch.testing.assert_close(c, g, rtol=1e-4, atol=1e-5)


def test_bf16_inference_stores_the_convolution_weights_once_with_the_same_results():
    """Model keeps the plain convolutions' weights in bf16 rather than letting autocast cast them at every call:
    the classifier's and the alignment network's outputs are bit-identical to autocast over float32 weights; the
    CAM head, BatchNorm and convolutions that transform their weights first (timm's StdConv) keep float32."""
    from dmfast.models import AlignmentNet, convolutions_stored_in

    class WeightStandardised(torch.nn.Conv2d):
        def forward(self, x):
            weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std() + 1e-5)
            return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    classifier, aligner = CAMClassifier("resnet18", 14, cam_stride=16).eval(), AlignmentNet(64).eval()
    torch.nn.init.normal_(aligner.head.weight, std=0.05)  # not the identity, so the angle depends on the weights
    classifier.stem[0] = WeightStandardised(3, 64, 7, 2, 3, bias=False)
    images = (torch.rand(4, 1, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def outputs(net):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return (*net[0](images, cams=True), net[1].parameters_of(images))

    before = outputs((classifier, aligner))
    after = outputs([convolutions_stored_in(n, torch.bfloat16) for n in (classifier, aligner)])
    for a, b in zip(before, after):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert classifier.layer1[0].conv1.weight.dtype == torch.bfloat16
    assert aligner.body.layer4[0].downsample[0].weight.dtype == torch.bfloat16
    assert classifier.fc.weight.dtype == classifier.stem[1].weight.dtype == aligner.head.weight.dtype == torch.float32
    assert classifier.stem[0].weight.dtype == torch.float32
