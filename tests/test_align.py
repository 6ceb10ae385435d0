import json

import pytest
import torch
from click.testing import CliRunner

from dmfast import align, checkpoints, train
from dmfast.align import misalignment_error
from dmfast.cli.main import main
from dmfast.config import AlignConfig, TrainConfig
from dmfast.models import AlignmentNet
from dmfast.ops import affine_matrix
from dmfast.testing import assert_model_file_matches, phantom_with_cache


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_with_cache(tmp_path_factory.mktemp("align"), count=320, size=96, seed=11)


def test_alignment_net_starts_at_the_identity(gen):
    net = AlignmentNet(input_size=32)
    images = torch.rand(3, 1, 64, 64, generator=gen) * 2 - 1
    torch.testing.assert_close(net.theta(images), torch.eye(2, 3).expand(3, 2, 3))
    torch.testing.assert_close(net.align(images), images, atol=1e-6, rtol=0)


def test_misalignment_error_of_inverse_transforms_is_zero():
    theta = affine_matrix(torch.tensor([1.1]), torch.tensor([0.9]), torch.tensor([0.05]), torch.tensor([-0.1]),
                          torch.tensor([0.2]))
    full = torch.cat([theta[0].double(), torch.tensor([[0, 0, 1.0]], dtype=torch.float64)])
    inverse = torch.linalg.inv(full)[:2][None]
    assert misalignment_error(theta).item() > 0.05
    assert misalignment_error(theta, inverse).item() < 1e-12


def test_end_to_end_train_align_resume(phantom, tmp_path, gen):
    data, cache = phantom
    common = dict(data=str(data), cache=str(cache), size=96, batch=16, split="patients", val_fraction=0.15)
    checkpoint = train.run(TrainConfig(out=str(tmp_path / "base"), arch="resnet18", epochs=1, **common))
    checkpoint = train.run(TrainConfig(out=str(tmp_path / "base"), arch="resnet18", epochs=2, **common), resume=True)
    assert checkpoints.load(checkpoint, checkpoints.CLASSIFIER)["epoch"] == 1
    # Euclidean alignment: the known misalignment of held-out images must shrink substantially.
    aligned = align.run(AlignConfig(out=str(tmp_path / "align"), epochs=6, pool=12, input_size=64,
                                    anchor_images=500, optimizer="adam", **common))
    stats = json.loads((tmp_path / "align" / "alignment_stats.json").read_text())
    error = stats["misalignment_error"]
    assert error["images"] > 20 and error["after"] < 0.8 * error["before"], error
    # The perceptual loss over that classifier's conv2_x..conv5_x runs and contributes.
    align.run(AlignConfig(out=str(tmp_path / "perceptual"), epochs=1, pool=12, max_steps=3, input_size=64,
                          anchor_images=500, perceptual=str(checkpoint), perceptual_weight=0.1, **common))
    history = json.loads((tmp_path / "perceptual" / "alignment_stats.json").read_text())["history"]
    assert history[0]["perceptual"] > 0 and all(map(lambda v: v == v, history[0].values()))
    assert (tmp_path / "align" / "alignment_grid.png").is_file() and (tmp_path / "align" / "anchor.png").is_file()
    # Training on aligned images applies the alignment on the fly.
    on_aligned = train.run(TrainConfig(out=str(tmp_path / "aligned"), arch="resnet18", epochs=1, max_steps=2,
                                   aligned=str(aligned), **common))
    assert checkpoints.load(on_aligned, checkpoints.CLASSIFIER)["config"]["aligned"] == str(aligned)
    # Its model file embeds the alignment network: it works with the alignment run moved away.
    assert (tmp_path / "aligned" / "model.pt").is_file()
    assert_model_file_matches(on_aligned, tmp_path / "model", gen, moved=[aligned.parent])
    # bf16 inference runs the alignment network under autocast too: its transforms and the probabilities stay close
    from dmfast.data.cache import ImageCache
    from dmfast.inference import Classifier

    pixels = ImageCache(cache).batch(sorted(checkpoints.load(on_aligned, checkpoints.CLASSIFIER)["splits"]["test"])[:8])
    exact, low = (Classifier(on_aligned, "cpu", precision)(pixels) for precision in ("fp32", "bf16"))
    assert (low.theta - exact.theta).abs().max() < 0.01 and low.theta.dtype == torch.float32
    assert (low.probabilities - exact.probabilities).abs().max() < 0.03


def test_align_command_reports_bad_options(phantom, tmp_path):
    data, cache = phantom
    result = CliRunner().invoke(main, ["align", str(data), "--out", str(tmp_path), "--cache", str(cache), "--size",
                                       "96", "--pool", "12", "--batch", "4096"])
    assert result.exit_code == 1 and "fewer than one batch" in result.output
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_align_in_bf16_follows_float32(phantom, tmp_path):
    """--precision bf16: the alignment network and the perceptual classifier under autocast (channels_last), the
    warp and the losses in float32: the first steps' losses within 5% of float32's, the warp a float32 theta."""
    data, cache = phantom
    common = dict(data=str(data), cache=str(cache), size=96, batch=16, split="patients", val_fraction=0.15)
    base = train.run(TrainConfig(out=str(tmp_path / "base"), arch="resnet18", epochs=1, max_steps=2, **common))
    history = {}
    for precision in ("fp32", "bf16"):
        align.run(AlignConfig(out=str(tmp_path / precision), epochs=1, pool=12, max_steps=3, input_size=64,
                              anchor_images=500, optimizer="adam", perceptual=str(base), perceptual_weight=0.1,
                              precision=precision, **common))
        history[precision] = json.loads((tmp_path / precision / "alignment_stats.json").read_text())["history"][0]
    for key in ("loss", "euclidean", "perceptual"):
        assert history["bf16"][key] == pytest.approx(history["fp32"][key], rel=0.05), key
