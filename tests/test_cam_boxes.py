import itertools

import pytest
import torch
import torch.nn.functional as F

from dmfast import ops, reference


def smooth_maps(n, h, w, gen):
    """CAM-like maps: white noise blurred twice, so regions are blob-shaped."""
    x = torch.randn(n, 1, h, w, generator=gen, dtype=torch.float64)
    for _ in range(2):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return x[:, 0]


def noise_maps(n, h, w, gen):
    return torch.rand(n, h, w, generator=gen, dtype=torch.float64)


def assert_same(got, want):
    boxes, scores, counts = got
    want_boxes, want_scores, want_counts = want
    assert torch.equal(counts, want_counts)
    assert torch.equal(boxes, want_boxes)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


SIZES = [(16, 16, 512, 512), (16, 16, 64, 48), (7, 9, 70, 90), (32, 32, 32, 32), (1, 5, 8, 20), (13, 3, 13, 3)]


@pytest.mark.parametrize("maps", [smooth_maps, noise_maps], ids=["smooth", "noise"])
@pytest.mark.parametrize("h,w,H,W", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("score", ["max", "mean"])
def test_matches_scipy_reference(device, maps, h, w, H, W, score, gen):
    cams = maps(6, h, w, gen).to(device)
    for thresholds in ([0.5], [60 / 255, 180 / 255], [0.0, 0.999]):
        got = ops.cam_boxes(cams, (H, W), thresholds, max_boxes=5, score=score)
        want = reference.cam_boxes(cams, (H, W), thresholds, max_boxes=5, score=score)
        assert_same(tuple(t.cpu() for t in got), want)


def test_all_4x4_binary_patterns_pass_through(device):
    # Every 4x4 binary image, thresholded as is (the map already has the output size).
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=16)), dtype=torch.float64)
    cams = bits.view(-1, 4, 4).to(device)
    boxes, scores, counts = ops.cam_boxes(cams, (4, 4), 0.5, max_boxes=8)
    want_boxes, want_scores, want_counts = reference.cam_boxes(cams, (4, 4), 0.5, max_boxes=8)
    assert torch.equal(counts.cpu(), want_counts) and torch.equal(boxes.cpu(), want_boxes)
    constant = (bits.sum(1) == 0) | (bits.sum(1) == 16)
    assert (counts.cpu()[constant] == 0).all() and (counts.cpu()[~constant] > 0).all()
    assert counts.max() == 4  # 8-connectivity: at most 4 separate regions fit in 4x4 (e.g. pixels two apart)


def test_batched_shape_float32_and_order(device, gen):
    cams = smooth_maps(2 * 3, 16, 16, gen).view(2, 3, 16, 16).float().to(device)
    boxes, scores, counts = ops.cam_boxes(cams, (128, 128), [0.3, 0.7], max_boxes=4)
    assert boxes.shape == (2, 3, 4, 4) and scores.shape == (2, 3, 4) and counts.shape == (2, 3)
    assert boxes.dtype == torch.long and scores.dtype == torch.float64
    want = reference.cam_boxes(cams, (128, 128), [0.3, 0.7], max_boxes=4)
    assert_same((boxes.cpu(), scores.cpu(), counts.cpu()), want)
    valid = torch.arange(4, device=device) < counts.clamp(max=4)[..., None]
    assert (scores[..., :-1] >= scores[..., 1:]).logical_or(~valid[..., 1:]).all()
    assert (boxes[~valid] == 0).all() and (scores[~valid] == 0).all()


def test_peak_is_found_where_planted(device):
    cam = torch.zeros(1, 16, 16, dtype=torch.float64)
    cam[0, 4:7, 10:13] = 1.0
    boxes, scores, counts = ops.cam_boxes(cam.to(device), (512, 512), 0.5, max_boxes=2)
    assert counts.item() == 1 and scores[0, 0].item() == 1.0
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    # cells 10..12 of 16 cover pixels 320..415; bilinear ramps add up to half a cell each side
    assert 304 <= x0 <= 320 and 416 <= x1 <= 432 and 112 <= y0 <= 128 and 224 <= y1 <= 240


def test_constant_map_has_no_box(device):
    boxes, scores, counts = ops.cam_boxes(torch.full((2, 8, 8), 3.0, device=device), (32, 32), 0.5)
    assert (counts == 0).all() and (boxes == 0).all()


def test_count_beyond_max_boxes(device, gen):
    cams = noise_maps(1, 32, 32, gen).to(device)
    _, _, counts = ops.cam_boxes(cams, (32, 32), 0.6, max_boxes=1)
    _, _, want = reference.cam_boxes(cams, (32, 32), 0.6, max_boxes=1)
    assert counts.item() == want.item() > 1


def test_opcheck(device, gen):
    cams = smooth_maps(3, 8, 8, gen).to(device)
    torch.library.opcheck(torch.ops.dmfast.cam_boxes.default, (cams, [32, 32], [0.3, 0.6], 4, "max"),
                          test_utils=("test_schema", "test_faketensor"))


BAD = [
    ("rank", lambda c: (c[0, 0], (8, 8), 0.5), "cams must be \\[N, h, w\\] or \\[B, C, h, w\\]"),
    ("size", lambda c: (c, (0, 8), 0.5), "size must be \\(H, W\\)"),
    ("threshold", lambda c: (c, (8, 8), 1.5), "thresholds are fractions"),
    ("no threshold", lambda c: (c, (8, 8), []), "at least one threshold"),
    ("integer", lambda c: (c.long(), (8, 8), 0.5), "must be float32 or float64"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(device, name, args, message, gen):
    cams = smooth_maps(3, 4, 4, gen).to(device)
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.cam_boxes(*args(cams))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_map_is_counted_minus_one(device, bad, gen):
    cams = smooth_maps(3, 4, 4, gen).to(device)
    cams[1, 2, 3] = bad
    boxes, scores, counts = ops.cam_boxes(cams, (16, 16), 0.5, max_boxes=2)
    _, _, want = reference.cam_boxes(cams[[0, 2]].cpu(), (16, 16), 0.5, max_boxes=2)
    assert counts[1].item() == -1 and not boxes[1].any() and not scores[1].any()
    assert counts[[0, 2]].cpu().tolist() == want.tolist()


def test_bad_score_and_max_boxes(gen):
    cams = smooth_maps(1, 4, 4, gen)
    with pytest.raises(RuntimeError, match='score must be "max" or "mean"'):
        ops.cam_boxes(cams, (8, 8), 0.5, score="median")
    with pytest.raises(RuntimeError, match=r"max_boxes must be in \[1, 65536\], got 0"):
        ops.cam_boxes(cams, (8, 8), 0.5, max_boxes=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("view", ["transpose", "permute", "slice"])
def test_strided_maps_give_the_boxes_of_their_contiguous_copy(device, dtype, view, gen):
    # Found by a careless user: a transposed float64 map was once read as if it were contiguous.
    maps = torch.rand((3, 8, 16), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    strided = {"transpose": maps.transpose(1, 2), "permute": maps.permute(2, 0, 1)[:, :, :8],
               "slice": maps[:, ::2, 1::3]}[view]
    assert not strided.is_contiguous()
    size = (64, 32)
    for got, want in zip(ops.cam_boxes(strided, size, (0.3, 0.6), 4), ops.cam_boxes(strided.contiguous(), size,
                                                                                   (0.3, 0.6), 4)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_maps_of_other_tools_numpy_single_2d_half_and_an_int_size_give_the_float32_result(gen):
    """What pytorch-grad-cam and others return: numpy ``[B, H, W]`` float32 maps, one ``[H, W]`` map, half
    precision; converted at the boundary, the same boxes as the float32 tensor."""
    import numpy as np

    maps = torch.rand(3, 9, 7, generator=gen)
    want = ops.cam_boxes(maps, (64, 48), (0.4, 0.7), 4)
    for given in (maps.numpy(), maps.numpy().astype(np.float64)):
        for got, expected in zip(ops.cam_boxes(given, (64, 48), (0.4, 0.7), 4), want):
            assert torch.equal(got, expected)
    single = ops.cam_boxes(maps[1].numpy(), (64, 48), (0.4, 0.7), 4)
    assert single[0].shape == (4, 4) and single[2].dim() == 0
    for got, expected in zip(single, want):
        assert torch.equal(got, expected[1])
    square = ops.cam_boxes(maps, 64, 0.5, 4)
    for got, expected in zip(square, ops.cam_boxes(maps, (64, 64), 0.5, 4)):
        assert torch.equal(got, expected)
    for low in (torch.float16, torch.bfloat16):
        for got, expected in zip(ops.cam_boxes(maps.to(low), 64, 0.5, 4), ops.cam_boxes(maps.to(low).float(), 64,
                                                                                         0.5, 4)):
            assert torch.equal(got, expected)
