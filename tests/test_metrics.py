import csv
import gzip

import numpy as np
import pytest
import torch

from dmfast import ops
from dmfast.metrics import box_overlap, localization, predictions_from_padded, roc_auc, weighted_mean_auroc
from dmfast.testing import shared_data

REFERENCE = shared_data("reference-predictions")


def test_box_overlap_by_hand():
    pred = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 0, 5]])
    gt = np.array([[0, 0, 10, 10], [0, 0, 20, 20]])
    iou = box_overlap(pred, gt, "iou")
    np.testing.assert_allclose(iou, [[1.0, 0.25], [50 / 150, 100 / 400], [0.0, 0.0]])
    iobb = box_overlap(pred, gt, "iobb")
    np.testing.assert_allclose(iobb, [[1.0, 1.0], [0.5, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="x1 < x0"):
        box_overlap([[5, 0, 1, 1]], gt)


def test_localization_by_hand_with_iou_exactly_at_threshold():
    # image a: class 0 GT [0,0,10,10]; predictions: one with IoU exactly 0.5, one far away (a false positive).
    # image b: class 1 GT [0,0,4,4], found with IoU 1; class 0 has no GT on b, so its prediction there is ignored.
    gt_image, gt_class = ["a", "b"], [0, 1]
    gt_boxes = [[0, 0, 10, 10], [0, 0, 4, 4]]
    pred_image, pred_class = ["a", "a", "b", "b"], [0, 0, 1, 0]
    pred_boxes = [[0, 0, 10, 5], [50, 50, 60, 60], [0, 0, 4, 4], [0, 0, 4, 4]]
    result = localization(gt_image, gt_class, gt_boxes, pred_image, pred_class, pred_boxes, num_classes=3,
                          thresholds=(0.3, 0.5, 0.7))
    np.testing.assert_allclose(result.accuracy[:, :2], [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # 0.5 is not > 0.5
    assert np.isnan(result.accuracy[:, 2]).all()
    np.testing.assert_allclose(result.afp[:, :2], [[1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(result.mean_accuracy, [1.0, 0.5, 0.5])
    assert result.gt_boxes.tolist() == [1, 1, 0] and result.images.tolist() == [1, 1, 0]
    iobb = localization(gt_image, gt_class, gt_boxes, pred_image, pred_class, pred_boxes, 3, (0.5, 0.99), "iobb")
    np.testing.assert_allclose(iobb.accuracy[:, 0], [1.0, 1.0])  # the half box lies wholly inside the GT


def test_localization_several_gt_boxes_and_no_predictions():
    result = localization([0, 0, 1], [2, 2, 2], [[0, 0, 2, 2], [10, 10, 12, 12], [0, 0, 2, 2]],
                          [0], [2], [[10, 10, 12, 12]], num_classes=3, thresholds=(0.5,))
    assert result.accuracy[0, 2] == pytest.approx(1 / 3)
    assert result.afp[0, 2] == 0.0  # the one prediction matches a GT box
    empty = localization([0], [0], [[0, 0, 1, 1]], [], [], np.zeros((0, 4)), num_classes=1, thresholds=(0.1,))
    assert empty.accuracy[0, 0] == 0.0 and empty.afp[0, 0] == 0.0


def test_localization_from_cam_boxes_output():
    cams = torch.zeros(2, 8, 8, dtype=torch.float64)
    cams[0, 1:3, 1:3] = 1
    cams[1, 5:7, 5:7] = 1
    boxes, _, counts = ops.cam_boxes(cams, (8, 8), 0.5, max_boxes=3)
    images, classes, flat = predictions_from_padded(boxes, counts, ["x", "y"], [0, 0])
    assert list(images) == ["x", "y"] and flat.tolist() == [[1, 1, 3, 3], [5, 5, 7, 7]]
    result = localization(["x", "y"], [0, 0], [[1, 1, 3, 3], [0, 0, 2, 2]], images, classes, flat, 1, (0.5,))
    assert result.accuracy[0, 0] == 0.5 and result.afp[0, 0] == 0.5


def test_roc_auc_by_hand_with_ties_and_undefined_classes():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.5], [0.5, 0.2, 0.4], [0.5, 0.3, 0.3], [0.1, 0.4, 0.2]])
    result = roc_auc(labels, scores)
    # class 0: positives 0.9, 0.5 vs negatives 0.5, 0.1: pairs win 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4
    assert result.per_class[0] == pytest.approx(3.5 / 4)
    assert np.isnan(result.per_class[1:]).all() and result.undefined == [1, 2]
    assert result.mean == pytest.approx(3.5 / 4)
    assert roc_auc(torch.tensor([0, 1]), torch.tensor([0.2, 0.8])).mean == 1.0
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0, 1 or -1"):
        roc_auc([0, 2], [0.1, 0.2])


@pytest.mark.random_inputs
def test_unknown_labels_are_left_out_of_their_class(gen):
    labels = (torch.rand(200, 3, generator=gen) < 0.3).long().numpy()
    scores = torch.rand(200, 3, generator=gen).numpy()
    unknown = torch.rand(200, 3, generator=gen).numpy() < 0.4
    labels[:, 2] = -1  # a class the release never gives: undefined, not all-negative
    with_unknown = np.where(unknown, -1, labels)
    result = roc_auc(with_unknown, scores)
    for c in range(2):
        known = ~unknown[:, c]
        assert result.per_class[c] == pytest.approx(roc_auc(labels[known, c], scores[known, c]).mean, abs=1e-12)
    assert np.isnan(result.per_class[2]) and result.undefined == [2]
    assert result.mean == pytest.approx(np.mean(result.per_class[:2]), abs=1e-12)
    ones = np.ones((1, 200))
    assert weighted_mean_auroc(with_unknown, scores, ones)[0] == pytest.approx(result.mean, abs=1e-12)


def test_roc_auc_matches_pairwise_definition(gen):
    labels = (torch.rand(300, 4, generator=gen) < 0.3).int().numpy()
    scores = torch.randint(0, 20, (300, 4), generator=gen).double().numpy()  # many ties
    result = roc_auc(labels, scores)
    for c in range(4):
        pos, neg = scores[labels[:, c] == 1, c], scores[labels[:, c] == 0, c]
        wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert result.per_class[c] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


@pytest.mark.skipif(not (REFERENCE / "preds.csv").exists(), reason=f"reference predictions not found at {REFERENCE}")
def test_roc_auc_golden_on_real_predictions():
    with open(REFERENCE / "preds.csv") as f:
        rows = list(csv.reader(f))
    classes = [name.removeprefix("prob_") for name in rows[0][1:]]
    with gzip.open(REFERENCE / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        findings = {r["Image Index"]: set(r["Finding Labels"].split("|")) for r in csv.DictReader(f)}
    labels = np.array([[c in findings[r[0]] for c in classes] for r in rows[1:]], dtype=int)
    scores = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    with open(REFERENCE / "aucs.csv") as f:
        expected = {r["label"]: float(r["auc"]) for r in csv.DictReader(f)}
    result = roc_auc(labels, scores)
    assert len(rows) - 1 == 22433
    for name, auc in zip(classes, result.per_class):
        assert round(auc, 4) == round(expected[name], 4), name


def test_bootstrap_weights_give_the_metrics_of_the_resampled_images(gen):
    from dmfast.metrics import patient_bootstrap, weighted_mean_accuracy, weighted_mean_auroc

    labels = torch.randint(0, 2, (40, 3), generator=gen).numpy()
    scores = (torch.randint(0, 5, (40, 3), generator=gen) / 4).numpy()  # many ties
    patients = torch.randint(0, 15, (40,), generator=gen).numpy()
    weights = patient_bootstrap(patients, 5, seed=3)
    assert weights.shape == (5, 40) and (weights == weights[:, [0]])[:, patients == patients[0]].all()
    auroc = weighted_mean_auroc(labels, scores, weights)
    found = torch.rand(2, 40, generator=gen).numpy() > 0.5  # one box per image here
    classes = labels[:, 0]
    accuracy = weighted_mean_accuracy(found, classes, weights, 2)
    for r in range(5):
        index = np.repeat(np.arange(40), weights[r].astype(int))  # the resampled images, repeats included
        assert np.isclose(auroc[r], roc_auc(labels[index], scores[index]).mean)
        for t in range(2):
            per_class = [found[t, index][classes[index] == c].mean() for c in (0, 1) if (classes[index] == c).any()]
            assert np.isclose(accuracy[r, t], np.mean(per_class))


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_patients():
    from dmfast.metrics import interval, patient_bootstrap, weighted_mean_auroc

    widths = []
    for count in (80, 800):
        rng = np.random.default_rng(1)
        labels = rng.integers(0, 2, (count, 2))
        scores = labels + rng.normal(0, 1.0, (count, 2))  # AUROC about 0.76
        low, high = interval(weighted_mean_auroc(labels, scores, patient_bootstrap(np.arange(count) // 2, 1000, 0)))
        assert low < roc_auc(labels, scores).mean < high
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # about 1/sqrt(10) as wide
