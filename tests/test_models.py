import pytest
import torch
import torchvision

from dmfast.models import CAMClassifier


def test_torchvision_weights_load_and_the_head_is_the_fused_cam(tmp_path, gen):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = CAMClassifier("resnet18", classes=14)
    skipped = model.load_torchvision_weights(path)
    assert skipped == ["fc.bias", "fc.weight"]  # 1000 ImageNet classes do not fit 14
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
