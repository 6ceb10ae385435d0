"""Device and dtype lists and tolerances shared by the tests and the benchmarks."""

import os
from pathlib import Path

import torch

DEVICES = ["cpu", "cuda"]
FLOAT_DTYPES = [torch.float64, torch.float32]
REDUCED_DTYPES = [torch.float16, torch.bfloat16]  # CUDA only

# (rtol, atol) of the fused ops against their float64/float32 eager references.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def cuda_available() -> bool:
    from . import _C

    return torch.cuda.is_available() and _C.built_with_cuda()


def tolerance(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def shared_data(name: str) -> Path:
    """A folder of the project's shared data: ``$DMFAST_SHARED_DATA/<name>``, by default ``../shared/data/<name>``
    beside the repository."""
    root = os.environ.get("DMFAST_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root) / name
