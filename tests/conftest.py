import os
import random

import pytest
import torch

from dmfast.testing import cuda_available

# Inputs are fresh on every run; the seed is printed so a failure can be replayed with DMFAST_TEST_SEED.
SEED = int(os.environ.get("DMFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"dmfast test seed: DMFAST_TEST_SEED={SEED}"


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the session seed and the test's id."""
    g = torch.Generator()
    g.manual_seed((SEED + sum(map(ord, request.node.nodeid)) * 7919) % 2**63)
    return g


def device_params():
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU (or built without CUDA kernels)"),
        ),
    ]


@pytest.fixture(params=device_params())
def device(request):
    return request.param


def phantom_with_cache(tmp_path_factory, name: str, count: int, size: int, seed: int):
    """A phantom dataset and its image cache in a fresh temporary folder: (data folder, cache folder)."""
    from dmfast.data.cache import prepare
    from dmfast.data.phantom import synthesize

    root = tmp_path_factory.mktemp(name)
    data = synthesize(root / "data", count=count, size=size, seed=seed)
    prepare(data, root / "cache", size=size, workers=2)
    return data, root / "cache"
