"""Benchmark of dmfast.ops.attention_cam against the literal Eq. 4/5 form and the eager forms.

    python -m benchmarks.attention_cam [--device cuda] [--threads N] [--out results.json]

B=32, K=2048, 16x16, C=14 (a ResNet-50 head at 512 px) in float32. The loss is the training loss's use: the
logits (and, in the "+cams" case, also the maps). The literal form builds a [B, C, K, h, w] tensor (~0.9 GB).
"""

import torch

from dmfast import ops, reference

from .common import best_median_ms, environment, parse, parser, report

IMPLEMENTATIONS = {
    "fused": ops.attention_cam,
    "eager einsum": reference.attention_cam,
    "eager bmm": reference.attention_cam_batched_matmul,
    "literal": reference.attention_cam_literal,
}


def make_inputs(batch, channels, size, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, size, size, generator=g).relu()
    weight = torch.randn(classes, channels, generator=g) / channels**0.5
    bias = torch.randn(classes, generator=g)
    masks = torch.rand(classes, size, size, generator=g)
    return [t.to(device) for t in (features, weight, bias, masks)]


def run(args) -> dict:
    threads = args.threads
    features, weight, bias, masks = make_inputs(args.batch, args.channels, args.size, args.classes, args.device)
    leaves = [t.clone().requires_grad_() for t in (features, weight, bias, masks)]
    cases = {}
    for name, fn in IMPLEMENTATIONS.items():
        if name == "literal" and args.skip_literal:
            continue
        statements = {
            "forward (masks)": lambda fn=fn: fn(features, weight, bias, masks),
            "forward+backward (masks, loss on logits)": lambda fn=fn: torch.autograd.grad(
                fn(*leaves)[0].sum(), leaves),
            "forward+backward (masks, loss on logits+cams)": lambda fn=fn: torch.autograd.grad(
                sum(o.sum() for o in fn(*leaves)), leaves),
            "forward+backward (no masks, loss on logits)": lambda fn=fn: torch.autograd.grad(
                fn(*leaves[:3])[0].sum(), leaves[:3]),
        }
        slow = name == "literal"
        for fn_ in statements.values():
            fn_()  # warm up
        times = best_median_ms(statements, threads, 0.2 if slow else args.min_run_time, 1 if slow else args.rounds)
        for case, ms in times.items():
            cases.setdefault(case, {})[name] = ms
    config = {"batch": args.batch, "channels": args.channels, "size": args.size, "classes": args.classes,
              "dtype": "float32", "min_run_time_s": args.min_run_time, "rounds": args.rounds}
    return report("attention_cam", cases, "fused", environment(args.device, threads), config, args.out)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--skip-literal", action="store_true", help="skip the (slow, memory-hungry) literal form")
    return parse(p, "attention_cam", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
