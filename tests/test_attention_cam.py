import pytest
import torch

from dmfast import ops, reference
from dmfast.testing import FLOAT_DTYPES, REDUCED_DTYPES, needs_cuda, rand, tolerance

MASKS = ["none", "shared", "per_image"]
USES = ["logits", "cams", "both"]



def make_inputs(B, K, h, w, C, masks, gen, dtype=torch.float64, device="cpu"):
    features = rand((B, K, h, w), gen, dtype, device)
    weight = rand((C, K), gen, dtype, device) / K**0.5
    bias = rand((C,), gen, dtype, device)
    psi = {"none": None, "shared": rand((C, h, w), gen, dtype, device).sigmoid(),
           "per_image": rand((B, C, h, w), gen, dtype, device).sigmoid()}[masks]
    return features, weight, bias, psi


def loss_of(use, logits, cams):
    return {"logits": logits, "cams": cams, "both": (logits, cams)}[use]


SHAPES = [(3, 5, 4, 6, 2), (2, 1, 3, 3, 4), (2, 7, 5, 5, 1), (4, 64, 8, 8, 14)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_literal_form(device, dtype, masks, shape, gen):
    inputs = make_inputs(*shape, masks, gen, dtype, device)
    logits, cams = ops.attention_cam(*inputs)
    want_logits, want_cams = reference.attention_cam_literal(*inputs)
    torch.testing.assert_close(logits, want_logits, **tolerance(dtype))
    torch.testing.assert_close(cams, want_cams, **tolerance(dtype))


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("use", USES)
def test_gradients_match_literal_form(device, masks, use, gen):
    inputs = make_inputs(3, 6, 4, 5, 3, masks, gen, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs if t is not None]
    args = leaves + [None] * (4 - len(leaves))
    outputs = [loss_of(use, *ops.attention_cam(*args)), loss_of(use, *reference.attention_cam_literal(*args))]
    outputs = [out if isinstance(out, tuple) else (out,) for out in outputs]
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in outputs[0]]
    grads = [torch.autograd.grad(sum((o * wt).sum() for o, wt in zip(out, weights)), leaves, materialize_grads=True)
             for out in outputs]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("use", USES)
def test_gradcheck(device, masks, use, gen):
    inputs = make_inputs(2, 4, 3, 4, 3, masks, gen, device=device)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    fn = lambda *a: loss_of(use, *ops.attention_cam(*a))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_partial_requires_grad(device, gen):
    features, weight, bias, psi = make_inputs(2, 4, 3, 3, 2, "shared", gen, device=device)
    for which in range(4):
        leaves = [t.clone().requires_grad_(i == which) for i, t in enumerate((features, weight, bias, psi))]
        assert torch.autograd.gradcheck(lambda *a: ops.attention_cam(*a), leaves)


def test_plain_head_equals_gap_and_fc(device, gen):
    features, weight, bias, _ = make_inputs(4, 32, 7, 7, 14, "none", gen, device=device)
    fc = torch.nn.Linear(32, 14).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        fc.weight.copy_(weight), fc.bias.copy_(bias)
    logits, _ = ops.attention_cam(features, fc.weight, fc.bias)
    torch.testing.assert_close(logits, fc(features.mean((2, 3))))


def test_non_contiguous(device, gen):
    features, weight, bias, psi = make_inputs(2, 6, 5, 5, 3, "shared", gen, device=device)
    args = (features.transpose(2, 3), weight.t().contiguous().t(), bias, psi.transpose(1, 2))
    for got, want in zip(ops.attention_cam(*args), reference.attention_cam_literal(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masks", MASKS)
def test_opcheck(device, masks, gen):
    inputs = make_inputs(2, 4, 3, 3, 2, masks, gen, device=device)
    op = torch.ops.dmfast.attention_cam.default
    torch.library.opcheck(op, inputs)
    torch.library.opcheck(op, tuple(t.clone().requires_grad_() if t is not None else None for t in inputs))
    features, weight, _, psi = inputs
    plain = op(*inputs)[2]
    g_logits, g_maps = rand((2, 2), gen, device=device), rand((2, 2, 3, 3), gen, device=device)
    backward = torch.ops.dmfast.attention_cam_backward.default
    for grads in ((g_logits, None, None), (None, g_maps, None), (g_logits, g_maps, g_maps)):
        torch.library.opcheck(backward, (*grads, features, weight, plain, psi, [True, True, True, True]))


@pytest.mark.parametrize("masks", ["none", "shared"])
def test_torch_compile_fullgraph(device, masks, gen):
    inputs = make_inputs(2, 8, 4, 4, 3, masks, gen, torch.float32, device)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]

    def fn(features, weight, bias, psi):
        logits, cams = ops.attention_cam(features.relu(), weight, bias, psi)
        return logits.square().sum() + cams.mean()

    compiled = torch.compile(fn, fullgraph=True)
    params = [t for t in leaves if t is not None]
    torch.testing.assert_close(compiled(*leaves), fn(*leaves))
    for got, want in zip(torch.autograd.grad(compiled(*leaves), params), torch.autograd.grad(fn(*leaves), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_cuda()
@pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=str)
def test_reduced_precision_cuda(dtype, gen):
    inputs = make_inputs(2, 16, 4, 4, 3, "shared", gen, torch.float32, "cuda")
    got = ops.attention_cam(*(t.to(dtype) for t in inputs))
    for g, w in zip(got, reference.attention_cam_literal(*inputs)):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)


BAD = [
    ("features rank", lambda f, w, b, m: (f[0], w, b, m), "features must be \\[B, K, h, w\\]"),
    ("weight K", lambda f, w, b, m: (f, w[:, :2], b, m), "weight must be \\[C, K\\]"),
    ("bias C", lambda f, w, b, m: (f, w, b[:1], m), "bias must be \\[C\\]"),
    ("masks shape", lambda f, w, b, m: (f, w, b, m[:1]), "masks must be \\[C, h, w\\] or \\[B, C, h, w\\]"),
    ("masks size", lambda f, w, b, m: (f, w, b, m[:, :2]), "masks must be"),
    ("dtype", lambda f, w, b, m: (f, w.float(), b, m), "dtype"),
    ("integer", lambda f, w, b, m: (f.long(), w.long(), b.long(), None), "must be float32 or float64"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(device, name, args, message, gen):
    inputs = make_inputs(2, 4, 3, 3, 2, "shared", gen, device=device)
    with pytest.raises(RuntimeError, match=message):
        ops.attention_cam(*args(*inputs))
