import os

import pytest
import torch

from dmfast.testing import devices

# `make test` is deterministic: every random input comes from `gen`, seeded from SEED (0 unless DMFAST_TEST_SEED
# says otherwise) and the test's id. `make fuzz` reruns the tests that draw random inputs with fresh seeds.
SEED = int(os.environ.get("DMFAST_TEST_SEED", "0"))
# Precision "auto" infers in bf16 on CPUs with native bf16 only: pinned to float32 here (and in the dmfast processes
# tests start), so that results do not depend on the CI machine's CPU; bf16 tests ask for bf16 by name.
os.environ["DMFAST_CPU_BF16"] = "0"


def pytest_report_header(config):
    return f"dmfast test seed: DMFAST_TEST_SEED={SEED}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gen" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.random_inputs)


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the session seed and the test's id."""
    g = torch.Generator()
    g.manual_seed((SEED + sum(map(ord, request.node.nodeid)) * 7919) % 2**63)
    return g


@pytest.fixture(params=devices())
def device(request):
    return request.param

