import math

import pytest
import torch

from dmfast.training import weighted_bce


def test_weighted_bce_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [-2.0, 0.5], [3.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 0], [0, 0], [0, 1], [1, 0]])
    # class 0: P = 2, N = 2 -> w_P = w_N = 2; class 1: P = 1, N = 3 -> w_P = 4, w_N = 4/3
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    terms = [
        2 * -logsig(0.0), 4 / 3 * -logsig(-2.0),
        2 * -logsig(-1.0), 4 / 3 * -logsig(1.0),
        2 * -logsig(2.0), 4 * -logsig(0.5),
        2 * -logsig(3.0), 4 / 3 * -logsig(0.0),
    ]
    assert weighted_bce(logits, targets).item() == pytest.approx(sum(terms) / 8, rel=1e-12)


def test_class_without_positives_or_negatives():
    logits = torch.tensor([[0.3, -0.2], [-1.0, 0.4]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 1], [0, 1]])  # class 0 all negative, class 1 all positive: weights 1
    loss = weighted_bce(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.double())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_shape_error():
    with pytest.raises(ValueError, match="must both be \\[B, C\\]"):
        weighted_bce(torch.zeros(2, 3), torch.zeros(2, 4))
