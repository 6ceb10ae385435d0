import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from rich.console import Console

from dmfast.cli.main import main
from dmfast.data.dataset import FINDINGS
from dmfast.anatomy import HEART, LUNGS, anatomy, pseudo_masks
from dmfast.checkpoints import MASK_SIZE
from dmfast.config import MasksConfig
from dmfast.phantom import draw_image
from dmfast.inference import Prediction
from dmfast.masks import disease_masks

C = len(FINDINGS)
CARDIOMEGALY = FINDINGS.index("Cardiomegaly")


class FakeCache:
    """Image 'pixels' are just the image indices, so the fake classifier can look its outputs up."""

    def batch(self, names):
        return torch.tensor([int(n) for n in names])


class FakeClassifier:
    def __init__(self, probabilities, cams):
        self.probabilities, self.cams = probabilities, cams

    def __call__(self, index):
        return Prediction(self.probabilities[index], self.cams[index], None)


def literal_masks(probabilities, cams, labels, confidence, threshold, min_images, asymmetric):
    """Per class, image by image, in float64: normalise each upsampled CAM, add its mirror image for symmetric
    classes (Eq. 3), average over the confident positives (or the most probable positives), normalise, threshold."""
    averages = torch.zeros(C, MASK_SIZE, MASK_SIZE, dtype=torch.float64)
    counts = []
    for c in range(C):
        chosen = [i for i in range(len(labels)) if labels[i, c] and probabilities[i, c] >= confidence]
        if len(chosen) < min_images:
            positives = [i for i in range(len(labels)) if labels[i, c]]
            chosen = sorted(positives, key=lambda i: -probabilities[i, c].item())[:min_images]
        counts.append(len(chosen))
        if not chosen:
            continue
        total = torch.zeros(MASK_SIZE, MASK_SIZE, dtype=torch.float64)
        for i in chosen:
            cam = F.interpolate(cams[i, c][None, None].double(), size=(MASK_SIZE, MASK_SIZE), mode="bilinear",
                                align_corners=False)[0, 0]
            cam = (cam - cam.min()) / (cam.max() - cam.min())
            total += cam if FINDINGS[c] in asymmetric else (cam + cam.flip(-1)) / 2
        average = total / len(chosen)
        averages[c] = (average - average.min()) / (average.max() - average.min())
    return averages, counts


def test_disease_masks_match_the_literal_definition(gen):
    images = 40
    probabilities = torch.rand(images, C, generator=gen)
    probabilities[:, 3] *= 0.6  # a class with too few confident images: falls back to the most probable ones
    cams = torch.randn(images, C, 8, 8, generator=gen, dtype=torch.float64)
    cams[:, :, 2, 1] += 6  # a common hot spot left of centre
    labels = (torch.rand(images, C, generator=gen) < 0.5).numpy().astype(np.uint8)
    labels[:, 5] = 0  # a class nobody has: no mask
    config = MasksConfig(data="", out="", confidence=0.7, threshold=0.5, min_images=4, batch=7)
    payload = disease_masks(FakeClassifier(probabilities, cams), FakeCache(), [str(i) for i in range(images)],
                            labels, config, Console(quiet=True))
    average, counts = literal_masks(probabilities, cams, labels, 0.7, 0.5, 4, config.asymmetric)
    torch.testing.assert_close(payload["average"].double(), average, rtol=0, atol=1e-6)
    clear = (average - 0.5).abs() > 1e-6  # away from the threshold the masks must agree exactly
    assert torch.equal(payload["masks"].double()[clear], (average >= 0.5).double()[clear])
    assert list(payload["counts"].values()) == counts
    assert payload["has_mask"][5] is False and payload["masks"][5].abs().sum() == 0
    assert "most probable" in payload["fallback"][FINDINGS[3]] and "no labelled" in payload["fallback"][FINDINGS[5]]
    # symmetric classes are mirror-symmetric, cardiomegaly keeps its side
    symmetric = [c for c in range(C) if c != CARDIOMEGALY]
    assert torch.equal(payload["masks"][symmetric], payload["masks"][symmetric].flip(-1))
    # the hot spot (cell row 2, column 1 of 8 -> pixels 16..23, 8..15 of 64) against its mirror image
    hot = payload["average"][CARDIOMEGALY]
    assert hot[16:24, 8:16].mean() > hot[16:24, MASK_SIZE - 16:MASK_SIZE - 8].mean() + 0.2


def test_disease_masks_reject_bad_settings():
    with pytest.raises(ValueError, match="confidence"):
        disease_masks(None, None, [], np.zeros((0, C)), MasksConfig(data="", out="", confidence=1.5),
                      Console(quiet=True))
    config = MasksConfig(data="", out="", asymmetric=["Cardiomegally"], min_images=1)
    classifier = FakeClassifier(torch.ones(2, C), torch.zeros(2, C, 4, 4))
    with pytest.raises(ValueError, match="unknown asymmetric"):
        disease_masks(classifier, FakeCache(), ["0", "1"], np.ones((2, C), np.uint8), config, Console(quiet=True))


def _canonical_ellipse(size, cx, cy, rx, ry):
    lin = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def test_anatomy_finds_the_phantom_lungs_and_heart():
    size = 128
    rng = np.random.default_rng(4)
    anchor = torch.stack([draw_image(size, [], rng)[0] for _ in range(12)]).mean(0) * 2 - 1
    regions, segmented = anatomy(anchor)
    assert segmented
    truth = _canonical_ellipse(size, *LUNGS[0]) | _canonical_ellipse(size, *LUNGS[1])
    found = regions["lungs"]
    assert (found & truth).sum() / (found | truth).sum() > 0.75
    heart = _canonical_ellipse(size, *HEART)
    assert (regions["heart"] & heart).sum() / regions["heart"].sum() > 0.6
    assert regions["costophrenic"][size // 2:].sum() > 0.9 * regions["costophrenic"].sum()  # the lower zones
    payload = pseudo_masks(anchor)
    assert payload["masks"].shape == (C, MASK_SIZE, MASK_SIZE) and all(payload["has_mask"])
    assert set(payload["masks"].unique().tolist()) == {0.0, 1.0}


def test_anatomy_falls_back_to_canonical_lungs_on_a_featureless_anchor():
    regions, segmented = anatomy(torch.zeros(64, 64))
    assert not segmented and regions["lungs"].sum() > 0


def test_masks_command_needs_a_checkpoint_or_pseudo(tmp_path):
    result = CliRunner().invoke(main, ["masks", str(tmp_path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "--checkpoint" in result.output


def test_masks_command_names_a_bad_anchor(tmp_path):
    from dmfast.phantom import synthesize

    data = synthesize(tmp_path / "data", count=12, size=64, seed=5, console=Console(quiet=True))
    (tmp_path / "anchor.pt").write_bytes(b"junk")
    result = CliRunner().invoke(main, ["masks", str(data), "--pseudo", "--size", "64", "--anchor",
                                       str(tmp_path / "anchor.pt"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "anchor.pt: not a readable anchor" in result.output
    torch.save(torch.zeros(64, 64), tmp_path / "flat.pt")
    result = CliRunner().invoke(main, ["masks", str(data), "--pseudo", "--size", "64", "--anchor",
                                       str(tmp_path / "flat.pt"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "expected a [1, 1, S, S] tensor" in result.output
