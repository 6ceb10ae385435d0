"""Achieved memory bandwidth of the CUDA ops against the device's own copy bandwidth (the memory floor).

    python -m benchmarks.gpu_bandwidth [--repeats 50] [--out results.json]

For each op and case: the fewest bytes it must move through device memory (each input read once, each output
written once, counted below), its median time over CUDA events, the achieved GB/s, and the time over the floor
(bytes / copy bandwidth, the copy bandwidth measured first as a large device-to-device copy, bytes read plus
written). Sizes are several times the L2 so the timings measure memory, not cache. The eager references are timed
on the same inputs for the speed-up. cam_boxes moves almost no bytes (16x16 maps in, boxes out): its line gives
thresholded pixels per second instead.
"""

import argparse

import torch
from rich.console import Console
from rich.table import Table

from dmfast import ops, reference
from dmfast.io import atomic_write_json

from .common import environment

FLOAT = 4  # bytes per float32


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 2 GiB device-to-device copy, counting the bytes read and the bytes written."""
    source = torch.rand(2**29, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * FLOAT / ms / 1e6


def cases(g: torch.Generator):
    """(op, case, fused callable, eager callable, fewest bytes moved)."""
    def rand(*shape):
        return torch.rand(*shape, generator=g, device="cuda")

    b, c, s = 64, 3, 512
    images = rand(b, c, s, s)
    theta = (torch.eye(2, 3, device="cuda") + 0.05 * torch.randn(b, 2, 3, generator=g, device="cuda"))
    theta_var = theta.clone().requires_grad_()
    grad = rand(b, c, s, s)
    n = images.numel()
    for pool in (16, 1):
        yield ("affine_smooth", f"fwd {b}x{c}x{s}x{s} pool {pool}",
               lambda p=pool: ops.affine_smooth(images, theta, p),
               lambda p=pool: reference.affine_smooth(images, theta, p), 2 * n * FLOAT)
        yield ("affine_smooth", f"fwd+bwd(theta) {b}x{c}x{s}x{s} pool {pool}",
               lambda p=pool: torch.autograd.grad(ops.affine_smooth(images, theta_var, p), theta_var, grad),
               lambda p=pool: torch.autograd.grad(reference.affine_smooth(images, theta_var, p), theta_var, grad),
               4 * n * FLOAT)  # forward: images in, warp out; backward: grad and images in

    b, k, h, classes = 256, 2048, 16, 14
    features = rand(b, k, h, h)
    n = features.numel()
    per_channel = rand(1, k, h, h)
    leaves = [features.clone().requires_grad_(), per_channel.clone().requires_grad_()]
    grad = rand(b, k, h, h)
    yield ("mask_attention", f"fwd {b}x{k}x{h}x{h}", lambda: ops.mask_attention(features, per_channel),
           lambda: reference.mask_attention(features, per_channel), 2 * n * FLOAT)
    yield ("mask_attention", f"fwd+bwd {b}x{k}x{h}x{h}",
           lambda: torch.autograd.grad(ops.mask_attention(*leaves), leaves, grad),
           lambda: torch.autograd.grad(reference.mask_attention(*leaves), leaves, grad),
           5 * n * FLOAT)  # forward: features in, out; backward: grad and features in, feature grad out

    weight = torch.randn(classes, k, generator=g, device="cuda") / k**0.5
    bias = torch.randn(classes, generator=g, device="cuda")
    masks = rand(classes, h, h)
    head = [t.clone().requires_grad_() for t in (features, weight, bias, masks)]
    yield ("attention_cam", f"fwd {b}x{k}x{h}x{h} C={classes}",
           lambda: ops.attention_cam(features, weight, bias, masks),
           lambda: reference.attention_cam(features, weight, bias, masks), n * FLOAT)
    yield ("attention_cam", f"fwd+bwd(logits) {b}x{k}x{h}x{h} C={classes}",
           lambda: torch.autograd.grad(ops.attention_cam(*head)[0].sum(), head),
           lambda: torch.autograd.grad(reference.attention_cam(*head)[0].sum(), head),
           3 * n * FLOAT)  # forward: features in; backward: features in (weight grad), feature grad out


def run(args) -> dict:
    console = Console()
    g = torch.Generator(device="cuda").manual_seed(0)
    copy = copy_bandwidth(args.repeats)
    console.print(f"device-to-device copy: {copy:.0f} GB/s (bytes read + written)")
    table = Table(title=f"CUDA ops against the memory floor ({torch.cuda.get_device_name()}, copy {copy:.0f} GB/s)")
    for column in ("op", "case", "fused ms", "eager ms", "speed-up", "min bytes", "GB/s", "floor ms", "x floor"):
        table.add_column(column, justify="left" if column in ("op", "case") else "right")
    results = []
    for op, case, fused, eager, nbytes in cases(g):
        fused_ms, eager_ms = median_ms(fused, args.repeats), median_ms(eager, args.repeats)
        floor_ms = nbytes / copy / 1e6
        row = {"op": op, "case": case, "fused_ms": fused_ms, "eager_ms": eager_ms, "min_bytes": nbytes,
               "achieved_gb_s": nbytes / fused_ms / 1e6, "floor_ms": floor_ms, "times_floor": fused_ms / floor_ms}
        results.append(row)
        table.add_row(op, case, f"{fused_ms:.3f}", f"{eager_ms:.3f}", f"{eager_ms / fused_ms:.2f}x",
                      f"{nbytes / 1e6:.0f} MB", f"{row['achieved_gb_s']:.0f}", f"{floor_ms:.3f}",
                      f"{row['times_floor']:.2f}")
        torch.cuda.empty_cache()

    maps, cam, size = 2048, 16, 512
    cams = torch.randn(maps, cam, cam, generator=g, device="cuda")
    thresholds = (60 / 255, 180 / 255)
    fused_ms = median_ms(lambda: ops.cam_boxes(cams, (size, size), thresholds, 8), args.repeats)
    pixels = maps * len(thresholds) * size * size
    results.append({"op": "cam_boxes", "case": f"{maps} maps {cam}px -> {size}px, 2 thresholds", "fused_ms": fused_ms,
                    "gigapixels_per_s": pixels / fused_ms / 1e6, "ms_per_megapixel": fused_ms / (pixels / 1e6)})
    table.add_row("cam_boxes", results[-1]["case"], f"{fused_ms:.3f}", "-", "-", "~0", "-", "-", "-")
    console.print(table)
    console.print(f"cam_boxes: {results[-1]['gigapixels_per_s']:.1f} thresholded Gpx/s "
                  f"({results[-1]['ms_per_megapixel'] * 1e3:.2f} us per Mpx)")
    payload = {"benchmark": "gpu_bandwidth", "environment": environment("cuda", torch.get_num_threads()),
               "copy_gb_s": copy, "repeats": args.repeats, "results": results}
    atomic_write_json(args.out, payload, indent=2)
    console.print(f"results written to {args.out}")
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results/gpu_bandwidth-cuda.json")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and ops.cuda_ready()):
        raise SystemExit("gpu_bandwidth: needs a CUDA GPU and dmfast built with its CUDA kernels")
    return run(args)


if __name__ == "__main__":
    main()
