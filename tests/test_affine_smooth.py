import math

import pytest
import torch
import torch.nn.functional as F

from dmfast import ops, reference
from dmfast.errors import SettingsError
from dmfast.testing import FLOAT_DTYPES, REDUCED_DTYPES, cuda_available, needs_cuda, tolerance

THETA_KINDS = ["identity", "rotation", "scale", "shift", "out_of_frame", "generic"]


def make_theta(kind: str, batch: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1  # noqa: E731
    one = torch.ones(batch, dtype=torch.float64)
    zero = torch.zeros(batch, dtype=torch.float64)
    if kind == "identity":
        theta = ops.affine_matrix(one, one, zero, zero, zero)
    elif kind == "rotation":
        theta = ops.affine_matrix(one, one, zero, zero, u(batch) * math.pi)
    elif kind == "scale":
        theta = ops.affine_matrix(1 + 0.5 * u(batch), 1 + 0.5 * u(batch), zero, zero, zero)
    elif kind == "shift":
        theta = ops.affine_matrix(one, one, 0.4 * u(batch), 0.4 * u(batch), zero)
    elif kind == "out_of_frame":  # partly and wholly outside the image
        theta = ops.affine_matrix(1 + 0.3 * u(batch), one, 1.2 + 0.8 * u(batch), 0.9 * u(batch), 0.3 * u(batch))
    else:
        theta = torch.eye(2, 3, dtype=torch.float64).expand(batch, 2, 3) + 0.3 * u(batch, 2, 3)
    return theta.to(dtype)


def rand_images(shape, gen, dtype, device):
    return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("pool", [1, 2, 4, 16])
@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("kind", THETA_KINDS)
def test_forward_matches_reference(device, dtype, pool, channels, kind, gen):
    images = rand_images((3, channels, 32, 48), gen, dtype, device)
    theta = make_theta(kind, 3, gen, dtype).to(device)
    torch.testing.assert_close(
        ops.affine_smooth(images, theta, pool), reference.affine_smooth(images, theta, pool), **tolerance(dtype)
    )


@pytest.mark.parametrize("pool", [1, 4])
def test_pool_one_is_the_plain_warp(device, pool, gen):
    images = rand_images((2, 2, 16, 16), gen, torch.float64, device)
    theta = make_theta("generic", 2, gen).to(device)
    warped = F.grid_sample(images, F.affine_grid(theta, [2, 2, 16, 16], align_corners=False), align_corners=False)
    if pool == 1:
        torch.testing.assert_close(ops.affine_smooth(images, theta, 1), warped, **tolerance(torch.float64))
    else:  # a constant image stays constant where the warp stays inside the frame
        flat = torch.full((1, 1, 16, 16), 0.25, dtype=torch.float64, device=device)
        out = ops.affine_smooth(flat, make_theta("identity", 1, gen).to(device), pool)
        torch.testing.assert_close(out, flat, **tolerance(torch.float64))


def test_far_out_of_frame_is_zero(device, gen):
    images = rand_images((2, 3, 16, 16), gen, torch.float64, device)
    theta = torch.tensor([[[1.0, 0.0, ops.THETA_LIMIT], [0.0, 1.0, 0.0]], [[1e5, 0.0, 0.0], [0.0, -1e5, 0.0]]],
                         device=device, dtype=torch.float64)
    out = ops.affine_smooth(images, theta, 4)
    torch.testing.assert_close(out, reference.affine_smooth(images, theta, 4), **tolerance(torch.float64))
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
def test_large_theta_matches_the_reference(device, dtype, scale, gen):
    # Up to the limit the result is the float64 reference's, also where huge terms cancel (a diagonal of the
    # output maps into the image): the samples on it are exact in float64, within a pixel's rounding in float32.
    images = rand_images((3, 2, 16, 17), gen, torch.float64, device)
    theta = torch.tensor([[[scale, scale, 0.0], [0.0, 1.0, 0.0]], [[scale, 0.0, 0.0], [0.0, scale, 0.0]],
                          [[-scale, 0.0, 0.3], [0.0, 0.5, scale]]], device=device, dtype=torch.float64)
    want = reference.affine_smooth(images, theta, 1)
    got = ops.affine_smooth(images.to(dtype), theta.to(dtype), 1).double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, **tolerance(dtype))
    else:  # float32 rounds the coordinates: compare where the reference is far from the cancelling diagonal
        torch.testing.assert_close(got[1:], want[1:], **tolerance(dtype))


@pytest.mark.parametrize("value", [1.01e6, 1e10, 1e30, 1e38, 3e38, -1e38, -3e38])
def test_theta_beyond_the_limit_gives_nan_never_a_crash(device, value, gen):
    # Found by a careless user: theta of +-1e38 once crashed the CPU kernel (a float overflow cast to an index).
    images = rand_images((2, 1, 16, 16), gen, torch.float32, device).requires_grad_()
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[value, 0.0, 0.0], [value, 0.0, 0.0]]], device=device,
                         requires_grad=True)
    for pool in (1, 4):
        out = ops.affine_smooth(images, theta, pool)
        assert out[1].isnan().all() and out[0].isfinite().all()
        grad_images, grad_theta = torch.autograd.grad(out[0].sum() + out[1].nan_to_num().sum(), (images, theta))
        assert grad_theta[1].isnan().all() and grad_theta[0].isfinite().all()


@needs_cuda()
@pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=str)
def test_reduced_precision_cuda(dtype, gen):
    images = rand_images((2, 3, 32, 32), gen, torch.float32, "cuda")
    theta = make_theta("generic", 2, gen, torch.float32).cuda()
    expected = reference.affine_smooth(images, theta, 4)
    torch.testing.assert_close(ops.affine_smooth(images.to(dtype), theta, 4).float(), expected, **tolerance(dtype))
    images_r = images.to(dtype).requires_grad_()
    theta_r = theta.clone().requires_grad_()
    ops.affine_smooth(images_r, theta_r, 4).float().square().sum().backward()
    assert images_r.grad.dtype == dtype and theta_r.grad.dtype == torch.float32
    assert torch.isfinite(theta_r.grad).all()


def test_non_contiguous_inputs(device, gen):
    base = rand_images((2, 3, 32, 32), gen, torch.float64, device)
    images = base.transpose(2, 3)
    theta = make_theta("generic", 2, gen).to(device).transpose(1, 2).contiguous().transpose(1, 2)
    assert not images.is_contiguous() and not theta.is_contiguous()
    torch.testing.assert_close(
        ops.affine_smooth(images, theta, 4), reference.affine_smooth(images, theta, 4), **tolerance(torch.float64)
    )


def kink_free_theta(kind, shape, gen, eps):
    """A random theta whose sample coordinates all stay clear of integers (where bilinear interpolation has kinks)
    by more than ``20 * eps`` of theta can move them (a finite-difference step, or float32 rounding), so gradients
    are compared on smooth pieces."""
    for _ in range(1000):
        theta = make_theta(kind, shape[0], gen)
        grid = F.affine_grid(theta, list(shape), align_corners=False)
        pixels = torch.stack([((grid[..., 0] + 1) * shape[3] - 1) / 2, ((grid[..., 1] + 1) * shape[2] - 1) / 2])
        distance = (pixels - pixels.round()).abs().min()
        if distance > 20 * eps * max(shape[2:]):
            return theta
    raise AssertionError("no kink-free theta drawn")


@pytest.mark.parametrize("pool", [1, 2, 4])
@pytest.mark.parametrize("kind", ["generic", "out_of_frame"])
def test_gradcheck(device, pool, kind, gen):
    shape = (2, 2, 8, 12)
    images = rand_images(shape, gen, torch.float64, device).requires_grad_()
    theta = kink_free_theta(kind, shape, gen, eps=1e-6).to(device).requires_grad_()
    fn = lambda i, t: ops.affine_smooth(i, t, pool)  # noqa: E731
    # On CUDA both gradients are summed with atomic adds, whose order varies between runs: rounding-level noise.
    nondet_tol = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(fn, (images, theta), eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=nondet_tol)


@pytest.mark.parametrize("pool", [1, 4, 16])
@pytest.mark.parametrize("need", ["theta", "images", "both"])
def test_float32_gradient_matches_reference(device, pool, need, gen):
    images = rand_images((2, 3, 32, 48), gen, torch.float32, device)
    # At an integer sample coordinate the theta gradient jumps; float32 rounding may put the two implementations on
    # different sides of it, so draw thetas whose samples stay clear of integers by far more than that rounding.
    theta = kink_free_theta("generic", images.shape, gen, eps=1e-7).to(device, torch.float32)
    grad_out = torch.randn(images.shape, generator=gen).to(device)

    def grads(fn):
        i = images.clone().requires_grad_(need in ("images", "both"))
        t = theta.clone().requires_grad_(need in ("theta", "both"))
        inputs = [x for x in (i, t) if x.requires_grad]
        return torch.autograd.grad(fn(i, t, pool), inputs, grad_out)

    for got, want in zip(grads(ops.affine_smooth), grads(reference.affine_smooth)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# Maps of the alignment regime and around it, which the AVX2/AVX-512 kernels sample a vector of lanes at a time
# (shifted loads near unit scale, a permuted window otherwise, two to four rows as the map turns) and past it,
# where they fall back to the general loop: every kind against the float64 reference.
ROW_VECTOR_MAPS = {
    "identity": (1.0, 1.0, 0.0, 0.0, 0.0),
    "near identity": (1.02, 0.97, 0.03, -0.02, 0.01),
    "turned 3 degrees": (1.0, 1.0, 0.01, 0.02, math.radians(3)),
    "turned 6 degrees": (1.05, 0.95, -0.02, 0.01, math.radians(-6)),
    "turned 12 degrees": (1.0, 1.0, 0.0, 0.0, math.radians(12)),
    "shrunk": (0.7, 0.8, 0.1, 0.0, 0.02),
    "enlarged": (1.5, 1.4, -0.1, 0.05, -0.01),
    "enlarged past the window": (2.2, 1.0, 0.0, 0.0, 0.0),
    "mirrored": (-1.0, 1.0, 0.0, 0.0, 0.0),
    "partly out of frame": (1.0, 1.1, 0.6, -0.3, 0.05),
}


def kink_bound(theta, shape, grad_out, pool, near=1e-3):
    """How far float32 rounding can move each theta gradient: the derivative of a bilinear sample jumps where its
    coordinate crosses an integer, by at most twice the image's range (1 here) per channel, so a sample within
    ``near`` pixels of one may land on the other side. Bounds the sum of those samples' jumps times their
    gradient and the coordinate's derivative to theta (at most W/2 or H/2)."""
    grid = F.affine_grid(theta, list(shape), align_corners=False)
    x, y = ((grid[..., 0] + 1) * shape[3] - 1) / 2, ((grid[..., 1] + 1) * shape[2] - 1) / 2
    warped = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    restored = F.interpolate(F.avg_pool2d(warped, pool), size=shape[2:], mode="bilinear", align_corners=False)
    (per_sample,) = torch.autograd.grad(restored, warped, grad_out.double())
    weight = 2 * per_sample.abs().sum(1)  # over channels
    at_x = ((x - x.round()).abs() < near).double() * weight * shape[3] / 2
    at_y = ((y - y.round()).abs() < near).double() * weight * shape[2] / 2
    return torch.stack([at_x.sum((1, 2)).expand(3, -1).T, at_y.sum((1, 2)).expand(3, -1).T], 1)


def theta_grads(images, theta, grad_out, pool):
    """The float32 op's theta gradient and the float64 eager chain's, for the same images and output gradient."""
    t32, t64 = theta.clone().requires_grad_(), theta.double().requires_grad_()
    (got,) = torch.autograd.grad(ops.affine_smooth(images, t32, pool), t32, grad_out)
    (exact,) = torch.autograd.grad(reference.affine_smooth(images.double(), t64, pool), t64, grad_out.double())
    return got, exact


def assert_theta_grad_close(got, exact, theta, shape, grad_out, pool):
    error = (got.double() - exact).abs()
    assert (error <= 1e-4 * exact.abs().max() + kink_bound(theta.double(), shape, grad_out, pool)).all()


@pytest.mark.parametrize("channels", [1, 2, 3])  # 2: the channel count only known at run time
@pytest.mark.parametrize("name", list(ROW_VECTOR_MAPS))
def test_float32_row_vectors_match_reference(name, channels, gen):
    scale_x, scale_y, shift_x, shift_y, angle = ROW_VECTOR_MAPS[name]
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    theta = ops.affine_matrix(one(scale_x), one(scale_y), one(shift_x), one(shift_y), one(angle)).expand(2, 2, 3)
    theta = (theta + 0.002 * torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)).float()
    images = rand_images((2, channels, 64, 160), gen, torch.float32, "cpu")
    grad_out = torch.randn(images.shape, generator=gen)
    for pool in (1, 4, 16):
        want = reference.affine_smooth(images.double(), theta.double(), pool)
        # float32 places a sample to about 1e-5 pixels at this width; the images change by up to 1 per pixel.
        torch.testing.assert_close(ops.affine_smooth(images, theta, pool).double(), want, rtol=0, atol=1e-4)
        assert_theta_grad_close(*theta_grads(images, theta, grad_out, pool), theta, images.shape, grad_out, pool)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_float32_non_finite_pixels_spread_as_in_the_reference(bad, gen):
    # The vector kernels read points a sample weighs by zero; a non-finite one must not turn that sample into NaN
    # where the eager chain, which reads only each sample's four corners, keeps it finite.
    images = rand_images((2, 3, 64, 160), gen, torch.float32, "cpu")
    images[0, 1, 20, 40] = bad
    images[1, 0, 33, 101] = bad
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    theta = ops.affine_matrix(one(1.03), one(0.98), one(0.013), one(-0.007), one(0.02)).expand(2, 2, 3).float()
    for pool in (1, 4):
        want = reference.affine_smooth(images.double(), theta.double(), pool)
        got = ops.affine_smooth(images, theta, pool).double()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, equal_nan=True)
    grad_out = torch.randn(images.shape, generator=gen)
    got, want = theta_grads(images, theta, grad_out, 4)
    assert torch.equal(got.isfinite(), want.isfinite())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_float32_non_finite_row_that_no_sample_uses_stays_out_of_the_theta_gradient(bad, gen):
    # Zoomed in along y with a slight shear: the theta backward's vectors read three rows, and at the bottom of the
    # sampled band the third is one that no sample uses as a corner, weighted by zero. Non-finite pixels there must
    # leave the gradient finite and exact, as in the eager chain (the kernel redoes such a row the general way).
    shape = (2, 3, 64, 160)
    theta = torch.tensor([[0.97, 0.0, 0.01], [0.004, 0.4, -0.3]]).expand(2, 2, 3)
    grid = F.affine_grid(theta.double(), list(shape), align_corners=False)
    y_max = (((grid[..., 1] + 1) * shape[2] - 1) / 2).max().item()
    assert 0.1 < y_max % 1 < 0.9  # float32 puts no sample's corner on the next row either
    unused = int(y_max) + 2
    images = rand_images(shape, gen, torch.float32, "cpu")
    images[:, :, unused, :] = bad
    grad_out = torch.randn(shape, generator=gen)
    grad_out[:, :, :-4] = 0  # the gradient comes from the bottom rows alone, the ones redone
    for pool in (1, 4):
        want = reference.affine_smooth(images.double(), theta.double(), pool)
        assert want.isfinite().all()
        torch.testing.assert_close(ops.affine_smooth(images, theta, pool).double(), want, rtol=0, atol=1e-4)
        got, exact = theta_grads(images, theta, grad_out, pool)
        assert exact.isfinite().all() and got.isfinite().all()
        assert_theta_grad_close(got, exact, theta, shape, grad_out, pool)


def test_theta_only_and_full_backward_agree(device, gen):
    images = rand_images((2, 3, 32, 32), gen, torch.float64, device)
    theta = make_theta("out_of_frame", 2, gen).to(device)
    grad = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(device)
    bw = torch.ops.dmfast.affine_smooth_backward.default
    gi, gt = bw(grad, images, theta, 4, [True, True])
    gi_only, empty_t = bw(grad, images, theta, 4, [True, False])
    empty_i, gt_only = bw(grad, images, theta, 4, [False, True])
    torch.testing.assert_close(gt_only, gt, rtol=1e-12, atol=1e-12)
    exact = device == "cpu"  # CUDA sums the image gradient with atomic adds, in a varying order
    torch.testing.assert_close(gi_only, gi, rtol=0 if exact else 1e-12, atol=0 if exact else 1e-12)
    assert empty_t.numel() == 0 and empty_i.numel() == 0


def test_cpu_backward_is_deterministic_across_thread_counts(gen):
    images = rand_images((2, 3, 64, 64), gen, torch.float32, "cpu")
    theta = make_theta("generic", 2, gen, torch.float32)
    grad = torch.randn(images.shape, generator=gen)
    bw = torch.ops.dmfast.affine_smooth_backward.default
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(bw(grad, images, theta, 16, [True, True]))
            results.append(bw(grad, images, theta, 16, [False, True]))
    finally:
        torch.set_num_threads(threads)
    for gi, gt in results[2::2]:
        assert torch.equal(gi, results[0][0]) and torch.equal(gt, results[0][1])
    for _, gt in results[3::2]:
        assert torch.equal(gt, results[1][1])


def test_double_backward_raises(device, gen):
    images = rand_images((1, 1, 8, 8), gen, torch.float64, device)
    theta = make_theta("generic", 1, gen).to(device).requires_grad_()
    (g,) = torch.autograd.grad(ops.affine_smooth(images, theta, 2).square().sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("pool", [1, 4])
def test_opcheck(device, pool, gen):
    images = rand_images((2, 3, 16, 16), gen, torch.float64, device)
    theta = make_theta("generic", 2, gen).to(device)
    grad = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(torch.ops.dmfast.affine_smooth.default, (images, theta, pool))
    torch.library.opcheck(
        torch.ops.dmfast.affine_smooth.default, (images.requires_grad_(), theta.requires_grad_(), pool)
    )
    # The backward op is first-order only (see test_double_backward_raises), so it is checked without grads.
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(
            torch.ops.dmfast.affine_smooth_backward.default, (grad, images.detach(), theta.detach(), pool, mask)
        )


def test_torch_compile_fullgraph(device, gen):
    images = rand_images((2, 3, 32, 32), gen, torch.float32, device)
    params = torch.tensor([1.1, 0.9, 0.05, -0.1, 0.2], device=device)

    def loss(p, img):
        theta = ops.affine_matrix(*p).expand(img.shape[0], 2, 3)
        return (ops.affine_smooth(img * 2 - 1, theta, 8) - img).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    p_eager = params.clone().requires_grad_()
    p_comp = params.clone().requires_grad_()
    eager_value = loss(p_eager, images)
    compiled_value = compiled(p_comp, images)
    eager_value.backward()
    compiled_value.backward()
    torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_comp.grad, p_eager.grad, rtol=1e-4, atol=1e-6)


ERRORS = [
    ("rank", lambda i, t: (i[0], t, 4), "images must be \\[B, C, H, W\\]"),
    ("theta shape", lambda i, t: (i, t[:, :, :2], 4), "theta must be \\[B, 2, 3\\]"),
    ("batch", lambda i, t: (i, t[:1], 4), "batch sizes differ"),
    ("divisible", lambda i, t: (i, t, 5), "divisible by pool=5"),
    ("pool < 1", lambda i, t: (i, t, 0), r"pool must be in \[1, 65536\]"),
    ("dtype mismatch", lambda i, t: (i, t.float(), 4), "theta dtype"),
    ("integer images", lambda i, t: (i.long(), t, 4), "must be float32 or float64"),
    ("float16 on CPU", lambda i, t: (i.cpu().half(), t.cpu().float(), 4), "must be float32 or float64 on CPU"),
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_theta_gives_nan_for_its_image_only(device, bad, gen):
    # No error: checking theta's values would make every CUDA call wait for the GPU.
    images = rand_images((3, 2, 16, 16), gen, torch.float64, device).requires_grad_()
    theta = make_theta("generic", 3, gen).to(device)
    theta[1, 0, 2] = bad
    theta.requires_grad_()
    out = ops.affine_smooth(images, theta, 4)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    torch.testing.assert_close(out[[0, 2]], reference.affine_smooth(images[[0, 2]], theta[[0, 2]], 4),
                               **tolerance(torch.float64))
    grad_images, grad_theta = torch.autograd.grad(out[[0, 2]].sum() + out[1].nan_to_num().sum(), (images, theta))
    assert grad_images[1].isnan().all() and grad_theta[1].isnan().all()
    assert grad_images[[0, 2]].isfinite().all() and grad_theta[[0, 2]].isfinite().all()


@pytest.mark.parametrize("name,args,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_errors(device, name, args, message, gen):
    images = rand_images((2, 3, 16, 16), gen, torch.float64, device)
    theta = make_theta("generic", 2, gen).to(device)
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.affine_smooth(*args(images, theta))


def test_bad_pool_type_and_device_mismatch(gen):
    images = rand_images((1, 1, 16, 16), gen, torch.float64, "cpu")
    theta = make_theta("identity", 1, gen)
    with pytest.raises(SettingsError, match="pool must be an int"):
        ops.affine_smooth(images, theta, 4.0)
    if cuda_available():
        with pytest.raises(RuntimeError, match="same device"):
            ops.affine_smooth(images, theta.cuda(), 4)


def test_backward_grad_shape_error(gen):
    images = rand_images((1, 1, 16, 16), gen, torch.float64, "cpu")
    theta = make_theta("identity", 1, gen)
    with pytest.raises(RuntimeError, match="grad_output shape"):
        torch.ops.dmfast.affine_smooth_backward.default(images[:, :, :8], images, theta, 4, [True, True])


def test_affine_matrix(gen):
    sx, sy, tx, ty, angle = (torch.rand(4, generator=gen, dtype=torch.float64) for _ in range(5))
    theta = ops.affine_matrix(sx, sy, tx, ty, angle)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)],
                           -2)
    expected_linear = rotation @ torch.diag_embed(torch.stack([sx, sy], -1))
    torch.testing.assert_close(theta[:, :, :2], expected_linear)
    torch.testing.assert_close(theta[:, :, 2], torch.stack([tx, ty], -1))
    identity = ops.affine_matrix(1.0, 1.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(identity, torch.eye(2, 3))
    assert ops.affine_matrix(torch.ones(3), 1.0, 0.0, 0.0, torch.zeros(3, 1)).shape == (3, 3, 2, 3)
    inputs = tuple(v.clone().requires_grad_() for v in (sx, sy, tx, ty, angle))
    assert torch.autograd.gradcheck(ops.affine_matrix, inputs)


def test_affine_inverse_undoes_the_transform(gen):
    theta = ops.affine_matrix(*(0.5 + torch.rand(2, 3, generator=gen, dtype=torch.float64) for _ in range(5)))
    inverse = ops.affine_inverse(theta)
    assert inverse.shape == (2, 3, 2, 3) and inverse.dtype == torch.float64
    points = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
    moved = (theta[..., :2] @ points[..., None])[..., 0] + theta[..., 2]
    back = (inverse[..., :2] @ moved[..., None])[..., 0] + inverse[..., 2]
    torch.testing.assert_close(back, points)
