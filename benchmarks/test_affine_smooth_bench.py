"""pytest-benchmark cases of affine_smooth (run with ``pytest benchmarks --benchmark-enable``)."""

import pytest
import torch

from dmfast import ops, reference

from .affine_smooth import make_inputs

IMPLS = {"fused": ops.affine_smooth, "eager": reference.affine_smooth}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(8, 3, 512, "cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, inputs, impl):
    images, theta, _ = inputs
    benchmark.group = "affine_smooth forward, 8x3x512x512, pool 16"
    benchmark(IMPLS[impl], images, theta, 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward_theta(benchmark, inputs, impl):
    images, theta, grad = inputs
    theta = theta.clone().requires_grad_()
    benchmark.group = "affine_smooth forward+backward to theta, 8x3x512x512, pool 16"
    benchmark(lambda: torch.autograd.grad(IMPLS[impl](images, theta, 16), theta, grad))
