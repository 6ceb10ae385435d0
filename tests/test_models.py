import torch
import torchvision

from dmfast.models import CAMClassifier


def test_torchvision_weights_load_and_the_head_is_the_fused_cam(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = CAMClassifier("resnet18", classes=14)
    skipped = model.load_torchvision_weights(path)
    assert skipped == ["fc.bias", "fc.weight"]  # 1000 ImageNet classes do not fit 14
    assert torch.equal(model.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    model.eval()
    images = torch.rand(2, 1, 64, 64) * 2 - 1
    logits, cams = model(images, cams=True)
    assert logits.shape == (2, 14) and cams.shape == (2, 14, 2, 2)
    features = model.stages(images)[-1]
    torch.testing.assert_close(logits, model.fc(features.mean((2, 3))), rtol=1e-5, atol=1e-5)
    model.set_masks(torch.rand(14, 8, 8))  # resized to the feature map on use
    attended, attended_cams = model(images, cams=True)
    assert attended.shape == (2, 14) and not torch.allclose(attended_cams, cams)
