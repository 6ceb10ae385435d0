"""``dmfast demo``: the fused alignment warp on a generated chest-like image, with a before/after figure."""

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import ops, reference
from .io import save_png, to_uint8


def chest_like_image(size: int, generator: torch.Generator) -> torch.Tensor:
    """A simple frontal-chest-like image ``[1, 1, size, size]`` in [0, 1]: soft-tissue body, two lung fields,
    a heart shadow off the midline, ribs and a spine, plus noise."""
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(lin, lin, indexing="ij")

    def ellipse(cx, cy, rx, ry, edge=0.04):
        d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        return torch.sigmoid((1 - d) / edge)

    body = ellipse(0.0, 0.05, 0.85, 1.05)
    lungs = ellipse(-0.36, -0.05, 0.27, 0.58) + ellipse(0.36, -0.05, 0.27, 0.58)
    heart = ellipse(0.12, 0.3, 0.28, 0.22)
    spine = torch.sigmoid((0.07 - x.abs()) / 0.02) * body
    ribs = 0.5 + 0.5 * torch.cos(2 * math.pi * (y * 5.5 + 0.6 * x.abs() ** 2))
    image = 0.15 + 0.55 * body - 0.45 * lungs * (1 - 0.35 * ribs) * (1 - heart) + 0.1 * heart + 0.2 * spine
    image = image + 0.02 * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)[None, None]


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_demo(out_dir, size: int = 512, pool: int = 16, seed: int = 0, console: Console | None = None) -> Path:
    console = console or Console()
    if size % pool:
        raise ValueError(f"--size {size} must be a multiple of --pool {pool}")
    generator = torch.Generator().manual_seed(seed)
    image = chest_like_image(size, generator)
    # A misalignment of the kind the alignment module undoes: rotation, anisotropic scale and shift.
    misalign = ops.affine_matrix(torch.tensor([1.12]), torch.tensor([0.93]), torch.tensor([0.06]),
                                 torch.tensor([-0.04]), torch.tensor([math.radians(7.0)]))
    moved = ops.affine_smooth(image, misalign, 1)
    smoothed = ops.affine_smooth(image, misalign, pool)
    error = (smoothed - reference.affine_smooth(image, misalign, pool)).abs().max().item()

    panel = torch.cat([image, moved, smoothed], dim=-1)[0, 0]
    path = save_png(Path(out_dir) / "affine_smooth_before_after.png", to_uint8(panel))

    batch = image.expand(8, 3, size, size).contiguous()
    theta = misalign.expand(8, 2, 3).contiguous()
    fused_ms = _median_ms(lambda: ops.affine_smooth(batch, theta, pool))
    eager_ms = _median_ms(lambda: reference.affine_smooth(batch, theta, pool))

    table = Table(title=f"dmfast demo: fused affine warp + {pool}x{pool} pool + bilinear restore")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("image", f"{size}x{size} chest-like phantom (seed {seed})")
    table.add_row("max |fused - eager reference|", f"{error:.2e}")
    table.add_row(f"fused, batch 8x3x{size}x{size}", f"{fused_ms:.1f} ms")
    table.add_row("eager reference, same batch", f"{eager_ms:.1f} ms")
    table.add_row("speed-up", f"{eager_ms / fused_ms:.1f}x")
    table.add_row("figure (original | warped | smoothed warp)", str(path))
    console.print(table)
    return path
