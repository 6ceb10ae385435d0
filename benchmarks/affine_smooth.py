"""Benchmark of dmfast.ops.affine_smooth against the eager chain and torch.compile of the eager chain.

    python -m benchmarks.affine_smooth [--device cuda] [--threads N] [--out results.json]

Cases: forward, and forward + backward to theta (the alignment module's training step: images need no grad).
"""

import torch

from dmfast import ops, reference

from .common import best_median_ms, environment, parse, parser, report


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
    threads = args.threads
    images, theta, grad = make_inputs(args.batch, args.channels, args.size, args.device)
    theta_var = theta.clone().requires_grad_()
    pool = args.pool
    statements = {}
    for name, fn in implementations(not args.no_compile).items():
        statements[name, "forward"] = lambda fn=fn: fn(images, theta, pool)
        statements[name, "forward+backward (theta)"] = (
            lambda fn=fn: torch.autograd.grad(fn(images, theta_var, pool), theta_var, grad))
    for fn in statements.values():
        fn()  # warm up (and compile)
    # All implementations in each round, so that a slow spell of a shared machine hits them alike.
    times = best_median_ms(statements, threads, args.min_run_time, args.rounds)
    cases = {"forward": {}, "forward+backward (theta)": {}}
    for (name, case), ms in times.items():
        cases[case][name] = ms
    # Speed-ups are reported as (implementation time) / (fused time).
    config = {"batch": args.batch, "channels": args.channels, "size": args.size, "pool": pool, "dtype": "float32",
              "min_run_time_s": args.min_run_time, "rounds": args.rounds}
    return report("affine_smooth", cases, "fused", environment(args.device, threads), config, args.out)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pool", type=int, default=16)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return parse(p, "affine_smooth", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
