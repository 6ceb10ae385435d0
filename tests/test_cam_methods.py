"""The CAM methods eval and predict can score (dmfast.cam_methods), each on a case computed by hand, and as rows of
one evaluation."""

import json

import pytest
import torch
from click.testing import CliRunner

from dmfast import ops
from dmfast.cam_methods import class_maps

# two channels on a 2 x 2 grid, two classes: the case worked out in the comments below
FEATURES = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
WEIGHT = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
BIAS = torch.zeros(2, dtype=torch.float64)


def head(masks=None):
    return lambda features: ops.attention_cam(features, WEIGHT.to(features.dtype), BIAS.to(features.dtype), masks)


def test_cam_is_the_heads_own_map():
    logits, maps = class_maps(head(), FEATURES, "cam")
    torch.testing.assert_close(maps[0].double(), torch.tensor([[[1.0, 0.0], [0.0, -2.0]], [[0.5, 0.0], [0.0, 1.0]]],
                                                              dtype=torch.float64))
    torch.testing.assert_close(logits[0].double(), torch.tensor([-0.25, 0.375], dtype=torch.float64))


def test_gradcam_by_hand():
    # d y_c / d f_k = w_ck / 4 everywhere: a_0 = (1/4, -1/4), a_1 = (1/8, 1/8)
    # class 0: relu(f_0 / 4 - f_1 / 4) = [[1/4, 0], [0, 0]]; class 1: f_0 / 8 + f_1 / 8 = [[1/8, 0], [0, 1/4]]
    _, maps = class_maps(head(), FEATURES, "gradcam")
    torch.testing.assert_close(maps[0].double(), torch.tensor([[[0.25, 0.0], [0.0, 0.0]], [[0.125, 0.0], [0.0, 0.25]]],
                                                              dtype=torch.float64))


def test_gradcam_plus_plus_by_hand():
    # alpha_k = g^2 / (2 g^2 + S_k g^3), S = (1, 2) the channels' sums, weight_k = 4 alpha_k relu(g_k)
    # class 0: g = (1/4, -1/4): alpha_0 = (1/16) / (1/8 + 1/64) = 4/9, weight = (4/9, 0) -> [[4/9, 0], [0, 0]]
    # class 1: g = (1/8, 1/8): alpha = (8/17, 4/9), weight = (4/17, 2/9) -> [[4/17, 0], [0, 4/9]]
    _, maps = class_maps(head(), FEATURES, "gradcam++")
    want = torch.tensor([[[4 / 9, 0.0], [0.0, 0.0]], [[4 / 17, 0.0], [0.0, 4 / 9]]], dtype=torch.float64)
    torch.testing.assert_close(maps[0].double(), want, rtol=1e-6, atol=1e-7)


def test_eigencam_by_hand():
    # f_k = u_k p + c_k with u = (3, 4), p = [[1, 0], [0, -1]]: centred over the positions the channels are u p,
    # rank one, whose projection on the first component is |u| p = 5 p; the summed activations 7 p + 3 agree in sign
    p = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    features = torch.stack([3 * p + 1, 4 * p + 2])[None]
    _, maps = class_maps(head(), features, "eigencam")
    for c in range(2):  # every class gets the same, class-agnostic map
        torch.testing.assert_close(maps[0, c], 5 * p, rtol=1e-5, atol=1e-5)
    _, flipped = class_maps(head(), torch.stack([-3 * p + 1, -4 * p + 2])[None], "eigencam")
    torch.testing.assert_close(flipped[0, 0], -5 * p, rtol=1e-5, atol=1e-5)  # the sign follows the activations


def test_gradcam_carries_the_disease_masks(gen):
    """With masks the logit is mean((1 + psi_c) cam_c) + b_c: Grad-CAM's weights are mean(1 + psi_c) w_ck / hw."""
    features = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    masks = torch.rand(2, 4, 4, generator=gen, dtype=torch.float64)
    _, maps = class_maps(head(masks), features, "gradcam")
    plain = torch.einsum("ck,bkhw->bchw", WEIGHT, features)
    want = torch.relu(plain * (1 + masks).mean((1, 2))[None, :, None, None] / 16)
    torch.testing.assert_close(maps.double(), want, rtol=1e-5, atol=1e-6)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="CAM method must be one of cam, gradcam, gradcam\\+\\+, eigencam"):
        class_maps(head(), FEATURES, "scorecam")


def test_eval_scores_every_method_as_a_row_with_the_same_probabilities(tmp_path):
    from cli.main import main
    from dmfast.testing import phantom_with_cache

    data, cache = phantom_with_cache(tmp_path / "phantom", count=48, size=64, seed=6)
    runner = CliRunner()
    trained = runner.invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--cache", str(cache),
                                   "--arch", "resnet18", "--size", "64", "--cam-stride", "16", "--epochs", "1",
                                   "--max-steps", "1", "--batch", "8", "--split", "patients", "--val-fraction", "0.2"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(main, ["eval", str(data), "--cache", str(cache), "--checkpoint", f"m={tmp_path / 'run'}",
                                  "--out", str(tmp_path / "e"), "--bootstrap", "20", "--overlays", "0",
                                  *[a for m in ("cam", "gradcam", "gradcam++", "eigencam") for a in ("--cam", m)]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    rows = report["methods"]
    assert list(rows) == ["m", "m gradcam", "m gradcam++", "m eigencam"]
    assert len({json.dumps(row["auroc"]) for row in rows.values()}) == 1  # one model: the same probabilities
    assert len({json.dumps(row["iou"]) for row in rows.values()}) > 1  # other maps, other boxes
    import dmfast
    from dmfast.data.cache import ImageCache

    model = dmfast.load_model(tmp_path / "run", "cpu")
    pixels = ImageCache(cache).batch(ImageCache(cache).names[:3])
    own = model(pixels)
    for method in ("gradcam", "gradcam++", "eigencam"):
        other = model(pixels, method)
        assert torch.equal(other.probabilities, own.probabilities) and other.cams.shape == own.cams.shape
    predicted = runner.invoke(main, ["predict", str(tmp_path / "run"), str(data / "images"), "--out",
                                     str(tmp_path / "p"), "--cam", "gradcam++", "--min-probability", "0"])
    assert predicted.exit_code == 0, predicted.output
