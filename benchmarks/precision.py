"""Images per second of dmfast's classifier in float32 and bf16, each in the contiguous and the channels_last
layout: inference (probabilities and CAMs) and a training step (forward, weighted BCE, backward, Adam), with how far
bf16's probabilities lie from float32's on the same weights and images.

    python -m benchmarks.precision [--arch resnet50] [--size 256] [--batch 8] [--train-arch resnet18]
                                   [--train-size 128] [--train-batch 32]

``--precision bf16`` in dmfast means bf16 autocast in channels_last; the other two rows say what each half of that
contributes. The network is the CAM classifier with random weights (the arithmetic does not depend on them); the
images are phantom X-rays.
"""

import torch

from dmfast import training
from dmfast.data.images import to_model_input
from dmfast.phantom import draw_image, sample_findings
from dmfast.models import CAMClassifier

from .common import best_median_ms, environment, parse, parser, report

VARIANTS = {"fp32": (None, False), "fp32 + channels_last": (None, True), "bf16": (torch.bfloat16, False),
            "bf16 + channels_last": (torch.bfloat16, True)}


def phantom_batch(count: int, size: int) -> torch.Tensor:
    import numpy as np

    rng = np.random.default_rng(0)
    images = [draw_image(size, sample_findings(rng, 0.4), rng)[0] for _ in range(count)]
    pixels = (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)[:, None]
    return to_model_input(pixels)


def _prepared(model: torch.nn.Module, images: torch.Tensor, last: bool) -> tuple:
    layout = torch.channels_last if last else torch.contiguous_format
    return model.to(memory_format=layout), images.contiguous(memory_format=layout)


def inference(args) -> tuple:
    torch.manual_seed(0)
    model = CAMClassifier(args.arch, cam_stride=16).eval()
    images = phantom_batch(args.batch, args.size)
    calls, probabilities = {}, {}
    for name, (dtype, last) in VARIANTS.items():
        def run(dtype=dtype, last=last):
            net, x = _prepared(model, images, last)
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits, cams = net(x, cams=True)
            return torch.sigmoid(logits.float())
        probabilities[name] = run()
        calls[name] = run
    times = best_median_ms(calls, args.threads, args.min_run_time, args.rounds)
    deviation = {name: float((p - probabilities["fp32"]).abs().max()) for name, p in probabilities.items()}
    return times, deviation


def training_step(args) -> dict:
    torch.manual_seed(0)
    model = CAMClassifier(args.train_arch, cam_stride=16).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    images = phantom_batch(args.train_batch, args.train_size)
    targets = (torch.rand(args.train_batch, 14, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    calls = {}
    for name, (dtype, last) in VARIANTS.items():
        def step(dtype=dtype, last=last):
            net, x = _prepared(model, images, last)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = training.weighted_bce(net(x).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        calls[name] = step
    return best_median_ms(calls, args.threads, args.min_run_time, args.rounds)


def run(args) -> dict:
    infer, deviation = inference(args)
    train = training_step(args)
    cases = {f"inference {args.arch} {args.size}px batch {args.batch}": infer,
             f"training step {args.train_arch} {args.train_size}px batch {args.train_batch}": train}
    for name in VARIANTS:
        print(f"{name}: inference {args.batch / infer[name] * 1e3:.1f} images/s (max |p - p_fp32| "
              f"{deviation[name]:.4f}), training {args.train_batch / train[name] * 1e3:.1f} images/s")
    config = {k: getattr(args, k) for k in ("arch", "size", "batch", "train_arch", "train_size", "train_batch")}
    config["max_probability_difference"] = deviation
    config["images_per_second"] = {"inference": {k: args.batch / v * 1e3 for k, v in infer.items()},
                                   "training": {k: args.train_batch / v * 1e3 for k, v in train.items()}}
    return report("classifier precision and layout (ms per batch)", cases, "bf16 + channels_last",
                  environment("cpu", args.threads),
                  config, args.out)


def parse_args(argv=None):
    p = parser(__doc__, rounds=2)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-arch", default="resnet18")
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=32)
    return parse(p, "precision", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
