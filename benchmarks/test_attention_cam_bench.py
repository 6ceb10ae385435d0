"""pytest-benchmark cases of attention_cam (run with ``pytest benchmarks --benchmark-enable``)."""

import pytest
import torch

from .attention_cam import IMPLEMENTATIONS, make_inputs

FAST = {k: v for k, v in IMPLEMENTATIONS.items() if k != "literal"}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(32, 2048, 16, 14, "cpu")


@pytest.mark.parametrize("impl", FAST)
def test_forward_backward(benchmark, inputs, impl):
    leaves = [t.clone().requires_grad_() for t in inputs]
    benchmark.group = "attention_cam forward+backward, B=32 K=2048 16x16 C=14, masks"
    benchmark(lambda: torch.autograd.grad(FAST[impl](*leaves)[0].sum(), leaves))
