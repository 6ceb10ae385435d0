import pytest
import torch

from dmfast import ops, reference
from dmfast.testing import FLOAT_DTYPES, REDUCED_DTYPES, needs_cuda, rand, tolerance

MASK_SHAPES = {"shared": (1, 1), "per_image": ("B", 1), "per_channel": (1, "K"), "full": ("B", "K")}


def mask_shape(kind, B, K, h, w):
    mb, mk = MASK_SHAPES[kind]
    return (B if mb == "B" else 1, K if mk == "K" else 1, h, w)



@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASK_SHAPES)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (1, 1, 7, 7), (2, 64, 16, 16)], ids=str)
def test_forward_and_gradients_match_reference(device, dtype, kind, shape, gen):
    features = rand(shape, gen, dtype, device)
    masks = rand(mask_shape(kind, *shape), gen, dtype, device).sigmoid()
    torch.testing.assert_close(ops.mask_attention(features, masks), reference.mask_attention(features, masks),
                               **tolerance(dtype))
    grad = rand(shape, gen, dtype, device)
    inputs = [features.clone().requires_grad_(), masks.clone().requires_grad_()]
    got = torch.autograd.grad(ops.mask_attention(*inputs), inputs, grad)
    want = torch.autograd.grad(reference.mask_attention(*inputs), inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tolerance(dtype)["rtol"] * 10, atol=tolerance(dtype)["atol"] * 10)


@pytest.mark.parametrize("kind", MASK_SHAPES)
def test_gradcheck(device, kind, gen):
    features = rand((2, 3, 4, 5), gen, device=device).requires_grad_()
    masks = rand(mask_shape(kind, 2, 3, 4, 5), gen, device=device).requires_grad_()
    assert torch.autograd.gradcheck(ops.mask_attention, (features, masks))
    for need in ((True, False), (False, True)):
        f, m = features.detach().requires_grad_(need[0]), masks.detach().requires_grad_(need[1])
        assert torch.autograd.gradcheck(ops.mask_attention, (f, m))


def test_large_broadcast_reduction_is_accurate_and_deterministic(device, gen):
    features = rand((8, 512, 4, 4), gen, torch.float32, device)
    masks = rand((1, 1, 4, 4), gen, torch.float32, device).requires_grad_()
    grad = rand(features.shape, gen, torch.float32, device)
    (g1,) = torch.autograd.grad(ops.mask_attention(features, masks), masks, grad)
    (g2,) = torch.autograd.grad(ops.mask_attention(features, masks), masks, grad)
    exact = (grad.double() * features.double()).sum((0, 1), keepdim=True)
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g1.double(), exact, rtol=1e-6, atol=1e-4)


def test_non_contiguous(device, gen):
    features = rand((2, 6, 5, 3), gen, device=device).transpose(2, 3)
    masks = rand((1, 6, 5, 3), gen, device=device).transpose(2, 3)
    torch.testing.assert_close(ops.mask_attention(features, masks), reference.mask_attention(features, masks))


def test_opcheck_and_compile(device, gen):
    features = rand((2, 3, 4, 4), gen, device=device)
    masks = rand((1, 3, 4, 4), gen, device=device)
    torch.library.opcheck(torch.ops.dmfast.mask_attention.default, (features, masks))
    torch.library.opcheck(torch.ops.dmfast.mask_attention.default,
                          (features.clone().requires_grad_(), masks.clone().requires_grad_()))
    grad = rand((2, 3, 4, 4), gen, device=device)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.dmfast.mask_attention_backward.default, (grad, features, masks, mask))

    def fn(f, m):
        return ops.mask_attention(f.relu(), m.sigmoid()).sum()

    f, m = features.clone().requires_grad_(), masks.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(f, m), fn(f, m))
    torch.testing.assert_close(torch.autograd.grad(compiled(f, m), (f, m)), torch.autograd.grad(fn(f, m), (f, m)))


@needs_cuda()
@pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=str)
def test_reduced_precision_cuda(dtype, gen):
    features = rand((2, 8, 4, 4), gen, torch.float32, "cuda")
    masks = rand((1, 8, 4, 4), gen, torch.float32, "cuda")
    out = ops.mask_attention(features.to(dtype), masks.to(dtype))
    torch.testing.assert_close(out.float(), reference.mask_attention(features, masks), **tolerance(dtype))


BAD = [
    ("features rank", lambda f, m: (f[0], m), "features must be \\[B, K, h, w\\]"),
    ("masks rank", lambda f, m: (f, m[0]), "masks must be \\[B or 1, K or 1, h, w\\]"),
    ("broadcast", lambda f, m: (f, m[:, :, :2]), "do not broadcast"),
    ("dtype", lambda f, m: (f, m.float()), "dtype"),
    ("integer", lambda f, m: (f.long(), m.long()), "must be float32 or float64"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(device, name, args, message, gen):
    features = rand((2, 3, 4, 4), gen, device=device)
    masks = rand((1, 3, 4, 4), gen, device=device)
    with pytest.raises(RuntimeError, match=message):
        ops.mask_attention(*args(features, masks))


@needs_cuda()
def test_device_mismatch(gen):
    with pytest.raises(RuntimeError, match="is on"):
        ops.mask_attention(rand((1, 1, 2, 2), gen), rand((1, 1, 2, 2), gen, device="cuda"))
