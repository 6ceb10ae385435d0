"""Benchmark of dmfast.ops.affine_smooth against the eager chain and torch.compile of the eager chain.

    python -m benchmarks.affine_smooth [--device cuda] [--threads N] [--out results.json]

Cases: forward, and forward + backward to theta (the alignment module's training step: images need no grad).
"""

import argparse

import torch

from dmfast import ops, reference

from .common import best_median_ms, environment, report


def make_inputs(batch, channels, size, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=g).to(device=device, dtype=dtype)
    theta = torch.eye(2, 3).expand(batch, 2, 3) + 0.05 * torch.randn(batch, 2, 3, generator=g)
    grad = torch.randn(batch, channels, size, size, generator=g).to(device=device, dtype=dtype)
    return images, theta.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype), grad


def implementations(compile_reference: bool) -> dict:
    impls = {"fused": ops.affine_smooth, "eager": reference.affine_smooth}
    if compile_reference:
        impls["compiled eager"] = torch.compile(reference.affine_smooth, fullgraph=True)
    return impls


def run(args) -> dict:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    images, theta, grad = make_inputs(args.batch, args.channels, args.size, args.device)
    theta_var = theta.clone().requires_grad_()
    pool = args.pool
    cases = {"forward": {}, "forward+backward (theta)": {}}
    for name, fn in implementations(not args.no_compile).items():
        forward = lambda fn=fn: fn(images, theta, pool)  # noqa: E731
        both = lambda fn=fn: torch.autograd.grad(fn(images, theta_var, pool), theta_var, grad)  # noqa: E731
        forward(), both()  # warm up (and compile)
        times = best_median_ms({"forward": forward, "both": both}, threads, args.min_run_time, args.rounds)
        cases["forward"][name] = times["forward"]
        cases["forward+backward (theta)"][name] = times["both"]
    # Speed-ups are reported as (implementation time) / (fused time).
    config = {"batch": args.batch, "channels": args.channels, "size": args.size, "pool": pool, "dtype": "float32",
              "min_run_time_s": args.min_run_time, "rounds": args.rounds}
    return report("affine_smooth", cases, "fused", environment(args.device, threads), config, args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current count)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pool", type=int, default=16)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each implementation's best is kept")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/affine_smooth-<device>.json)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"benchmarks/results/affine_smooth-{args.device}.json"
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
