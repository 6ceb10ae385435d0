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


def test_unknown_targets_have_no_term_and_no_weight():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [-2.0, 0.5], [3.0, 0.0]], dtype=torch.float64,
                          requires_grad=True)
    targets = torch.tensor([[1, 0], [0, -1], [0, 1], [-1, 0]])  # -1: the image's release does not say
    # class 0 known on rows 0-2: P = 1, N = 2 -> w_P = 3, w_N = 3/2; class 1 on rows 0, 2, 3: P = 1, N = 2 likewise
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    terms = [3 * -logsig(0.0), 1.5 * -logsig(-2.0), 1.5 * -logsig(-1.0), 1.5 * -logsig(2.0), 3 * -logsig(0.5),
             1.5 * -logsig(0.0)]
    loss = weighted_bce(logits, targets)
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-12)
    loss.backward()
    assert logits.grad[1, 1] == 0 and logits.grad[3, 0] == 0  # unknown targets pull the logit nowhere
    assert (logits.grad[targets != -1] != 0).all()


def test_unknown_targets_equal_the_loss_on_the_known_ones_only(gen):
    # Mixed data: ChestX-ray14 rows know all 14 findings, CheXpert rows only 7; the loss of a mixed batch is the
    # loss over the known entries with the weights counted on them, whatever logits the unknown entries have.
    logits = torch.randn(6, 14, generator=gen, dtype=torch.float64)
    targets = (torch.rand(6, 14, generator=gen) < 0.3).long()
    targets[3:, 7:] = -1
    other = logits.clone()
    other[3:, 7:] = torch.randn(3, 7, generator=gen, dtype=torch.float64) * 10
    assert weighted_bce(logits, targets).item() == pytest.approx(weighted_bce(other, targets).item(), rel=1e-12)
    known = weighted_bce(logits[:, :7], targets[:, :7]) * 42 + weighted_bce(logits[:3, 7:], targets[:3, 7:]) * 21
    assert weighted_bce(logits, targets).item() == pytest.approx(known.item() / 63, rel=1e-12)


@pytest.mark.parametrize("unknown", [0.0, 0.5])
def test_data_parallel_shards_average_to_the_whole_batch(gen, unknown):
    """DDP averages the shards' gradients: the mean of the shards' losses must be the whole batch's loss, also when
    one shard holds most of the unknown labels (mixed releases)."""
    from dmfast.training import label_counts, shard_counts

    logits = torch.randn(8, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(8, 5, generator=gen) < 0.4).long()
    targets[4:][torch.rand(4, 5, generator=gen) < unknown] = -1  # the second shard's images know less
    counts = shard_counts(sum(label_counts(targets[s]) for s in (slice(0, 4), slice(4, 8))), 2)
    shards = [weighted_bce(logits[s], targets[s], tuple(c.double() for c in counts)) for s in (slice(0, 4),
                                                                                                 slice(4, 8))]
    whole = weighted_bce(logits, targets)
    assert ((shards[0] + shards[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-12)
    gradient = torch.autograd.grad((shards[0] + shards[1]) / 2, logits)[0]
    torch.testing.assert_close(gradient, torch.autograd.grad(whole, logits)[0], rtol=1e-12, atol=1e-15)
