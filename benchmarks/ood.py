"""How well the out-of-distribution score (dmfast.inference.Model.ood_score) tells a model's own kind of X-ray from
inputs it was not made for: held-out test X-rays of its training data against blank, mid-grey, uniform-noise,
inverted, rotated and smooth-texture inputs made from them, and real X-rays of another source when given.

    python -m benchmarks.ood [--model out/demo/dm] [--cache out/demo/cache-128] [--images 128]
                             [--real ../shared/data/chestxray14-sample/images] [--out FILE]

For each kind: the AUROC of the score against the test X-rays, and the share flagged at the model's threshold.
A model file written before the statistics had them gets them computed here from its run's image cache.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from dmfast.data.cache import ImageCache
from dmfast.data.images import load_gray, to_square
from dmfast.inference import feature_statistics, load_model
from dmfast.io import atomic_write_json
from dmfast.metrics import roc_auc

from .common import environment


def kinds_of(xrays: torch.Tensor, count: int, size: int, real: list, seed: int = 0) -> dict:
    """uint8 ``[N, 1, size, size]`` batches of each kind of input the X-rays are not."""
    generator = torch.Generator().manual_seed(seed)
    some = xrays[:count]
    made = {"blank": torch.zeros_like(some), "mid-grey": torch.full_like(some, 128),
            "uniform noise": torch.randint(0, 256, some.shape, generator=generator, dtype=torch.uint8),
            "inverted X-rays": 255 - some, "rotated 90 degrees": some.rot90(1, (2, 3)).contiguous(),
            "smooth random textures": (F.interpolate(torch.rand(len(some), 1, 8, 8, generator=generator), size=size,
                                                     mode="bicubic").clamp(0, 1) * 255).round().to(torch.uint8)}
    if real:
        made["real X-rays (--real)"] = torch.stack([torch.from_numpy(np.array(to_square(load_gray(p), size).pixels))
                                                    for p in real[:count]])[:, None]
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/demo/dm", help="a model file, run folder or checkpoint")
    p.add_argument("--cache", default=None, help="its image cache [default: the run's]")
    p.add_argument("--images", type=int, default=128, help="inputs of each kind")
    p.add_argument("--real", default="../shared/data/chestxray14-sample/images", help="a folder of other X-rays")
    p.add_argument("--out", default="benchmarks/results/ood.json")
    args = p.parse_args(argv)
    model = load_model(args.model, "cpu", "fp32")
    cache_folder = args.cache or model.config.cache
    if model.ood is None:
        model.ood = feature_statistics(model, cache_folder, model.splits)
    cache = ImageCache(cache_folder, check_sources=False)
    test = [n for n in model.splits.test if n in cache]

    def scores(pixels: torch.Tensor) -> np.ndarray:
        return torch.cat([model(pixels[i:i + 64]).ood for i in range(0, len(pixels), 64)]).numpy()

    xrays = cache.batch(test)
    inside = scores(xrays)
    threshold = model.ood["threshold"]
    real = sorted(Path(args.real).glob("*.png")) if args.real and Path(args.real).is_dir() else []
    results = [{"kind": "test X-rays", "images": len(inside), "auroc": None,
                "flagged": float((inside > threshold).mean())}]
    for kind, pixels in kinds_of(xrays, args.images, cache.size, real).items():
        outside = scores(pixels)
        labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))].astype(int)[:, None]
        results.append({"kind": kind, "images": len(outside),
                        "auroc": float(roc_auc(labels, np.r_[inside, outside][:, None]).mean),
                        "flagged": float((outside > threshold).mean())})
    table = Table(title=f"out-of-distribution score of {args.model} (threshold {threshold:.3f})")
    for column in ("inputs", "images", "AUROC against the test X-rays", "flagged"):
        table.add_column(column, justify="left" if column == "inputs" else "right")
    for r in results:
        table.add_row(r["kind"], str(r["images"]), "-" if r["auroc"] is None else f"{r['auroc']:.3f}",
                      f"{r['flagged']:.1%}")
    Console().print(table)
    payload = {"benchmark": "ood", "environment": environment("cpu", torch.get_num_threads()),
               "config": vars(args), "threshold": threshold, "results": results}
    atomic_write_json(args.out, payload, indent=2)
    return payload


if __name__ == "__main__":
    main()
