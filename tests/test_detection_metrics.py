import contextlib
import io

import numpy as np
import pytest
import torch

from dmfast.metrics import (COCO_IOU_THRESHOLDS, RSNA_THRESHOLDS, average_precision, froc, froc_score,
                            match_detections, patient_strata, rsna_score, stratified_patient_bootstrap)


def _rng(gen) -> np.random.Generator:
    """A numpy generator seeded from the test's torch generator (so `make fuzz` reseeds it)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))


def _one_class(gt, pred, scores, thresholds=(0.5,), rule="coco", **kwargs):
    """Everything on image "a", class 0."""
    return match_detections(["a"] * len(gt), [0] * len(gt), np.reshape(gt, (-1, 4)), ["a"] * len(pred),
                            [0] * len(pred), np.reshape(pred, (-1, 4)), scores, thresholds, rule, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Matching and AP by hand
# ----------------------------------------------------------------------------------------------------------------

def test_ap_two_boxes_three_detections_by_hand():
    # GT A, B; detections by score: exact on A (TP), far away (FP), exact on B (TP).
    # cumulative TP 1,1,2; FP 0,1,1 -> recall .5,.5,1; precision 1, 1/2, 2/3; envelope 1, 2/3, 2/3.
    # COCO: recall points 0.00..0.50 (51 of them) read precision 1, 0.51..1.00 (50) read 2/3:
    #   (51 + 50 * 2/3) / 101 = 253/303.  VOC: area 0.5 * 1 + 0.5 * 2/3 = 5/6.
    m = _one_class([[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]],
                   [0.9, 0.8, 0.7])
    assert m.tp.tolist() == [[True, False, True]] and m.gt_matched.tolist() == [[True, True]]
    np.testing.assert_allclose(average_precision(m, 1), [[[253 / 303]]], rtol=1e-12)
    np.testing.assert_allclose(average_precision(m, 1, interpolation="voc"), [[[5 / 6]]], rtol=1e-12)
    # the same detections listed in another order: only scores decide the order
    m2 = _one_class([[0, 0, 10, 10], [20, 20, 30, 30]], [[20, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10]],
                    [0.7, 0.8, 0.9])
    assert m2.tp.tolist() == [[True, False, True]]
    np.testing.assert_allclose(average_precision(m2, 1), [[[253 / 303]]], rtol=1e-12)


def test_duplicates_are_false_positives_and_thresholds_change_who_matches():
    # GT A = [0,0,10,10]; d1 (0.9) = [0,0,10,6], IoU 0.6; d2 (0.8) = A, IoU 1.
    # t = 0.5: d1 takes A, d2 is a duplicate (FP): TP, FP -> precision 1 at recall 1: AP 1 (COCO and VOC).
    # t = 0.75: d1 misses, d2 takes A: FP, TP -> recall 0, 1; precision 0, 1/2 -> AP 1/2 (COCO and VOC).
    m = _one_class([[0, 0, 10, 10]], [[0, 0, 10, 6], [0, 0, 10, 10]], [0.9, 0.8], thresholds=(0.5, 0.75))
    assert m.tp.tolist() == [[True, False], [False, True]]
    assert m.fp.tolist() == [[False, True], [True, False]]
    np.testing.assert_allclose(average_precision(m, 1)[0, :, 0], [1.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(average_precision(m, 1, interpolation="voc")[0, :, 0], [1.0, 0.5], rtol=1e-12)


def test_rules_differ_on_taken_boxes_tied_overlaps_and_overlap_at_the_threshold():
    # A = [0,0,10,10], B = [4,0,14,10]. d1 = A takes A. d2 = [1,0,11,10]: IoU 90/110 with A (taken), 70/130 with B.
    # COCO and strict: d2 takes B (0.538 > 0.5); VOC: d2 only looks at A, its best, which is taken: FP.
    gt, pred = [[0, 0, 10, 10], [4, 0, 14, 10]], [[0, 0, 10, 10], [1, 0, 11, 10]]
    assert _one_class(gt, pred, [0.9, 0.8], rule="coco").tp.tolist() == [[True, True]]
    assert _one_class(gt, pred, [0.9, 0.8], rule="strict").tp.tolist() == [[True, True]]
    assert _one_class(gt, pred, [0.9, 0.8], rule="voc").tp.tolist() == [[True, False]]
    # Two identical GT boxes: COCO takes the later (pycocotools' loop keeps the last maximum), VOC the first.
    same = [[0, 0, 10, 10], [0, 0, 10, 10]]
    assert _one_class(same, [[0, 0, 10, 10]], [1.0], rule="coco").gt_matched.tolist() == [[False, True]]
    assert _one_class(same, [[0, 0, 10, 10]], [1.0], rule="strict").gt_matched.tolist() == [[False, True]]
    assert _one_class(same, [[0, 0, 10, 10]], [1.0], rule="voc").gt_matched.tolist() == [[True, False]]
    # IoU exactly 0.5 ([0,0,10,5] in [0,0,10,10]): COCO needs >=, strict and VOC need >.
    assert _one_class([[0, 0, 10, 10]], [[0, 0, 10, 5]], [1.0], rule="coco").tp.tolist() == [[True]]
    assert _one_class([[0, 0, 10, 10]], [[0, 0, 10, 5]], [1.0], rule="strict").tp.tolist() == [[False]]
    assert _one_class([[0, 0, 10, 10]], [[0, 0, 10, 5]], [1.0], rule="voc").tp.tolist() == [[False]]
    # A perfect match counts at t = 1 under COCO (pycocotools caps t at 1 - 1e-10), never under strict.
    assert _one_class([[0, 0, 10, 10]], [[0, 0, 10, 10]], [1.0], (1.0,), "coco").tp.tolist() == [[True]]
    assert _one_class([[0, 0, 10, 10]], [[0, 0, 10, 10]], [1.0], (1.0,), "strict").tp.tolist() == [[False]]
    # The cap also counts an IoU within 1e-10 of 1 (here 1 - 1e-11) at t = 1.
    near = _one_class([[0, 0, 1e6, 1e6]], [[0, 0, 1e6, 1e6 - 1e-5]], [1.0], (1.0,), "coco")
    assert near.tp.tolist() == [[True]]
    with pytest.raises(ValueError, match="rule"):
        _one_class(gt, pred, [0.9, 0.8], rule="iou")


def test_tied_scores_keep_input_order():
    # Both detections score 0.5 at t = 0.75: [0,0,10,6] (IoU 0.6) cannot match; [0,0,10,10] can.
    # Tied, the first listed goes first, so the order decides which one is the duplicate at t = 0.5.
    gt = [[0, 0, 10, 10]]
    m = _one_class(gt, [[0, 0, 10, 6], [0, 0, 10, 10]], [0.5, 0.5], thresholds=(0.5, 0.75))
    assert m.tp.tolist() == [[True, False], [False, True]]
    m = _one_class(gt, [[0, 0, 10, 10], [0, 0, 10, 6]], [0.5, 0.5], thresholds=(0.5, 0.75))
    assert m.tp.tolist() == [[True, False], [True, False]]


def test_classes_without_gt_or_detections_and_max_per_image():
    # Class 0 on "a": GT A; three detections, max_per_image 2 keeps the two best (0.9 far away: FP; 0.8 on A: TP)
    # and drops the exact 0.7 one on the second GT box B, which is then neither TP nor FP.
    # cumulative TP 0,1; FP 1,1 -> recall 0, 1/2; precision 0, 1/2; COCO: points 0..0.5 (51) read 1/2, rest 0:
    # 51/101 * 1/2. Class 1: detections but no GT (NaN). Class 2: GT on "b" but no detection (AP 0). Class 3: nothing.
    m = match_detections(["a", "a", "b"], [0, 0, 2], [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]],
                         ["a", "a", "a", "b", "a"], [0, 0, 0, 1, 1],
                         [[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5], [0, 0, 10, 10]],
                         [0.9, 0.8, 0.7, 0.6, 0.95], (0.5,), max_per_image=2)
    assert m.kept.tolist() == [True, True, False, True, True]
    assert m.tp.tolist() == [[False, True, False, False, False]]
    assert m.fp.tolist() == [[True, False, False, True, True]]
    ap = average_precision(m, 4)
    assert ap.shape == (1, 1, 4)
    np.testing.assert_allclose(ap[0, 0, [0, 2]], [51 / 101 / 2, 0.0], rtol=1e-12)
    assert np.isnan(ap[0, 0, [1, 3]]).all()
    # without the cap, the third detection finds B: TP at recall 1 with precision 2/3
    assert match_detections(["a", "a"], [0, 0], [[0, 0, 10, 10], [20, 20, 30, 30]], ["a"] * 3, [0] * 3,
                            [[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7],
                            (0.5,)).tp.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        average_precision(m, 2)


def test_empty_inputs_and_image_codes():
    no_pred = match_detections([1, 2], [0, 0], [[0, 0, 1, 1], [0, 0, 2, 2]], [], [], np.zeros((0, 4)), [],
                               COCO_IOU_THRESHOLDS)
    assert no_pred.tp.shape == (10, 0) and not no_pred.gt_matched.any()
    np.testing.assert_array_equal(average_precision(no_pred, 1), np.zeros((1, 10, 1)))
    no_gt = match_detections([], [], np.zeros((0, 4)), [1, 1], [0, 0], [[0, 0, 1, 1], [0, 0, 1, 1]], [0.5, 0.4],
                             (0.5, 0.7))
    assert no_gt.tp.shape == (2, 2) and not no_gt.tp.any() and no_gt.fp.all()
    assert np.isnan(average_precision(no_gt, 1)).all()
    nothing = match_detections([], [], [], [], [], [], [], (0.5,))
    assert nothing.tp.shape == (1, 0) and np.isnan(average_precision(nothing, 2)).all()
    # codes follow `images` (which may list images without anything); ids outside it are an error
    m = match_detections(["y"], [0], [[0, 0, 1, 1]], ["x"], [0], [[0, 0, 1, 1]], [1.0], (0.5,),
                         images=["z", "y", "x"])
    assert m.gt_image_index.tolist() == [1] and m.pred_image_index.tolist() == [2]
    assert list(m.images) == ["z", "y", "x"] and not m.tp.any()
    with pytest.raises(ValueError, match="not in images"):
        match_detections(["y"], [0], [[0, 0, 1, 1]], ["w"], [0], [[0, 0, 1, 1]], [1.0], (0.5,), images=["y"])
    with pytest.raises(ValueError, match="more than once"):
        match_detections(["y"], [0], [[0, 0, 1, 1]], [], [], [], [], (0.5,), images=["y", "y"])
    with pytest.raises(ValueError, match="NaN"):
        match_detections([], [], [], ["y"], [0], [[0, 0, 1, 1]], [np.nan], (0.5,))
    with pytest.raises(ValueError, match="weights"):
        average_precision(m, 1, weights=np.ones((2, 2)))


# ----------------------------------------------------------------------------------------------------------------
# Agreement with pycocotools
# ----------------------------------------------------------------------------------------------------------------

def _random_case(rng, num_images=7, num_classes=4, crowded_image=True, distinct_scores=False):
    """Ground truth and detections on integer pixel boxes: jittered copies of the GT (overlapping, sometimes
    exact), random boxes, an exactly duplicated GT box, tied scores, class 2 without detections, class 3 without GT
    and, when ``crowded_image``, 130 detections of class 0 on the last image. Lists of (image, class, box, score)."""
    gt, pred = [], []

    def jitter(box):
        x0, y0, x1, y1 = box + rng.integers(-4, 5, 4)
        return [int(x0), int(y0), int(max(x1, x0 + 1)), int(max(y1, y0 + 1))]

    def random_box():
        x0, y0 = rng.integers(0, 60, 2)
        w, h = rng.integers(4, 31, 2)
        return [int(x0), int(y0), int(x0 + w), int(y0 + h)]

    for image in range(1, num_images + 1):
        for c in range(num_classes - 1):
            for _ in range(rng.integers(0, 4)):
                gt.append((image, c, random_box()))
    gt.append((1, 0, [5, 5, 25, 25]))
    gt.append((1, 0, [5, 5, 25, 25]))
    for image, c, box in gt:
        if c == 2:
            continue
        for _ in range(rng.choice(3, p=[0.3, 0.4, 0.3])):
            pred.append((image, c, jitter(np.array(box)) if rng.random() < 0.8 else box))
    for image in range(1, num_images + 1):
        for c in (0, 1, 3):
            for _ in range(rng.integers(0, 3)):
                pred.append((image, c, random_box()))
    if crowded_image:
        boxes_there = [np.array(b) for i, c, b in gt if i == num_images and c == 0] or [np.array([10, 10, 30, 30])]
        for k in range(130):
            pred.append((num_images, 0, jitter(boxes_there[k % len(boxes_there)]) if k % 3 else random_box()))
    order = rng.permutation(len(pred))
    pred = [pred[i] for i in order]
    scores = (rng.permutation(len(pred)) + 1) / (len(pred) + 1) if distinct_scores else \
        rng.integers(1, 20, len(pred)) / 20
    return gt, [(i, c, b, float(s)) for (i, c, b), s in zip(pred, scores)]


def _arrays(gt, pred):
    """match_detections' first seven arguments from lists of (image, class, box) and (image, class, box, score)."""
    return (np.array([g[0] for g in gt]), np.array([g[1] for g in gt], np.int64),
            np.array([g[2] for g in gt]).reshape(-1, 4), np.array([p[0] for p in pred]),
            np.array([p[1] for p in pred], np.int64), np.array([p[2] for p in pred]).reshape(-1, 4),
            np.array([p[3] for p in pred]))


def _cocoeval(gt, pred, image_ids, num_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    dataset = {"images": [{"id": i, "width": 100, "height": 100} for i in image_ids],
               "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)],
               "annotations": [{"id": k + 1, "image_id": int(i), "category_id": int(c) + 1, "bbox": xywh(b),
                                "area": xywh(b)[2] * xywh(b)[3], "iscrowd": 0} for k, (i, c, b) in enumerate(gt)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        results = coco.loadRes([{"image_id": int(i), "category_id": int(c) + 1, "bbox": xywh(b), "score": s}
                                for i, c, b, s in pred])
        evaluation = COCOeval(coco, results, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


@pytest.mark.parametrize("case", range(4))
def test_average_precision_equals_pycocotools(gen, case):
    rng, num_classes = _rng(gen), 4
    image_ids = list(range(1, 9))  # image 8 has neither GT nor detections
    gt, pred = _random_case(rng, num_images=7, num_classes=num_classes)
    evaluation = _cocoeval(gt, pred, image_ids, num_classes)
    thresholds = evaluation.params.iouThrs
    np.testing.assert_array_equal(thresholds, COCO_IOU_THRESHOLDS)
    precision = evaluation.eval["precision"][:, :, :, 0, 2]  # [T, recall, K]: area "all", maxDets 100
    expected = np.where(precision[:, 0] > -1, precision.mean(1), np.nan)  # [T, K]

    m = match_detections(*_arrays(gt, pred), thresholds, rule="coco", max_per_image=100, images=image_ids)
    assert (~m.kept).sum() >= 30  # the crowded image exercises maxDets
    ap = average_precision(m, num_classes)
    assert ap.shape == (1, 10, num_classes)
    assert np.isnan(ap[0, :, 3]).all() and (ap[0, :, 2] == 0).all()  # no GT; GT without detections
    assert np.isfinite(expected[:, :3]).all() and ((expected > 0) & (expected < 1)).any()
    np.testing.assert_allclose(ap[0], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.nanmean(ap[0]), evaluation.stats[0], rtol=0, atol=1e-12)  # AP
    np.testing.assert_allclose(np.nanmean(ap[0, 0]), evaluation.stats[1], rtol=0, atol=1e-12)  # AP50
    np.testing.assert_allclose(np.nanmean(ap[0, 5]), evaluation.stats[2], rtol=0, atol=1e-12)  # AP75


@pytest.mark.parametrize("flip", [False, True])
def test_tied_overlaps_take_the_later_box_as_pycocotools(flip):
    # G1 = [2,0,12,10], G2 = [4,0,14,10]; d1 (0.9) = [3,0,13,10] overlaps both by 90/110. d2 (0.8) = [0,0,10,10]
    # overlaps G1 by 80/120 and G2 by 60/140. If d1 takes the later box G2, d2 takes G1 at t = 0.5 (AP 1); listed
    # the other way round d1 takes G1 and d2 misses: TP, FP at recall 1/2 -> COCO AP 51/101.
    gt = [(1, 0, [2, 0, 12, 10]), (1, 0, [4, 0, 14, 10])][::-1 if flip else 1]
    pred = [(1, 0, [3, 0, 13, 10], 0.9), (1, 0, [0, 0, 10, 10], 0.8)]
    m = match_detections(*_arrays(gt, pred), COCO_IOU_THRESHOLDS, images=[1])
    expected = 51 / 101 if flip else 1.0
    np.testing.assert_allclose(average_precision(m, 1)[0, 0, 0], expected, rtol=1e-12)
    evaluation = _cocoeval(gt, pred, [1], 1)
    np.testing.assert_allclose(evaluation.eval["precision"][0, :, 0, 0, 2].mean(), expected, rtol=1e-12)
    np.testing.assert_allclose(average_precision(m, 1)[0, :, 0], evaluation.eval["precision"][:, :, 0, 0, 2].mean(1),
                               rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# FROC and RSNA by hand
# ----------------------------------------------------------------------------------------------------------------

def _froc_case():
    # GT: a class 0 (A), b class 1 (B), c class 0 (C); d has nothing. Detections by score:
    #   0.9 on A (TP); 0.8 on d (FP); 0.7 on B (TP) tied with 0.7 far away on c (FP); 0.6 on b at B but class 0
    #   (FP: no class-0 box there); 0.5 on C (TP).
    gt = (["a", "b", "c"], [0, 1, 0], [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    pred = (["a", "d", "b", "c", "b", "c"], [0, 0, 1, 0, 0, 0],
            [[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]],
            [0.9, 0.8, 0.7, 0.7, 0.6, 0.5])
    return gt, pred


def test_froc_by_hand():
    gt, pred = _froc_case()
    m = match_detections(*gt, *pred, (0.5,), images=["a", "b", "c", "d"])
    # cuts (TP, FP): 0.9 (1, 0); 0.8 (1, 1); 0.7 together (2, 2); 0.6 (2, 3); 0.5 (3, 3). With 4 images the FP
    # rates are 0, .25, .5, .75, .75 and the sensitivities 1/3, 1/3, 2/3, 2/3, 1:
    #   at 1/8: 1/3; 1/4: 1/3 (taking 0.7's TP alone would give 2/3: ties enter together); 1/2: 2/3; 1 and up: 1.
    sensitivity = froc(m, 4)
    np.testing.assert_allclose(sensitivity, [[1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1]], rtol=1e-12)
    np.testing.assert_allclose(froc_score(sensitivity), [16 / 21], rtol=1e-12)
    # four more images without anything halve the FP rates: 0, 1/8, 1/4, 3/8, 3/8
    m8 = match_detections(*gt, *pred, (0.5,), images=list("abcdefgh"))
    np.testing.assert_allclose(froc(m8, 8), [[1 / 3, 2 / 3, 1, 1, 1, 1, 1]], rtol=1e-12)
    np.testing.assert_allclose(froc(m, 8), [[1 / 3, 2 / 3, 1, 1, 1, 1, 1]], rtol=1e-12)  # codes 4..7: the same
    # rates in any order; below the first FP nothing but the 0.9 hit
    np.testing.assert_allclose(froc(m, 4, fp_rates=(1, 0.25, 0)), [[1, 1 / 3, 1 / 3]], rtol=1e-12)
    # a second threshold: at IoU 0.95 the same boxes still match exactly
    m2 = match_detections(*gt, *pred, (0.5, 0.95))
    np.testing.assert_allclose(froc(m2, 4, threshold_index=1), sensitivity, rtol=1e-12)
    with pytest.raises(ValueError, match="num_images"):
        froc(m, 3)
    # weights: image a twice, b not at all, c once, d three times, i.e. GT 2 (a) + 1 (c), 6 image units.
    # cuts: 0.9 (2, 0); 0.8 (2, 3); 0.7 (2, 4) (b's TP weighs 0); 0.6 (2, 4); 0.5 (3, 4). FP rates 0, .5, 2/3, 2/3.
    # Sensitivities 2/3, 2/3, 2/3, 1: at 1/8, 1/4: 2/3; 1/2: 2/3; 1 and up: 1.
    np.testing.assert_allclose(froc(m, 4, weights=[[2, 0, 1, 3]]), [[2 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1]], rtol=1e-12)
    assert np.isnan(froc(m, 4, weights=[[0, 0, 0, 1]])).all()  # no GT in the resample


def test_rsna_score_by_hand():
    # i1: exact hit -> 1 at every threshold. i2: a miss -> TP 0, FP 1, FN 1: 0. i3: no GT, a detection: 0.
    # i4: no GT, no detection: left out. i5: IoU 0.6 ([0,0,10,6] in [0,0,10,10]) hits at 0.4, 0.45, 0.5, 0.55
    # only (> t, strictly): 4/8 = 0.5. i6: two GT boxes, one exact hit and one spurious detection:
    # TP 1, FP 1, FN 1 -> 1/3. Mean over i1, i2, i3, i5, i6: (1 + 0 + 0 + 0.5 + 1/3) / 5 = 11/30.
    images = ["i1", "i2", "i3", "i4", "i5", "i6"]
    gt_image = ["i1", "i2", "i5", "i6", "i6"]
    gt_boxes = [[0, 0, 10, 10]] * 4 + [[20, 20, 30, 30]]
    pred_image = ["i1", "i2", "i3", "i5", "i6", "i6"]
    pred_boxes = [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 10], [70, 70, 80, 80]]
    scores = [0.9, 0.9, 0.9, 0.9, 0.9, 0.3]
    assert RSNA_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    np.testing.assert_allclose(rsna_score(gt_image, gt_boxes, pred_image, pred_boxes, scores, images), [11 / 30],
                               rtol=1e-12)
    # Resample 2 weighs i1 2, i2 0, i3 1, i4 5 (left out anyway), i5 0, i6 1: (2 + 0 + 1/3) / 4 = 7/12.
    # Resample 3 keeps only i4, which is left out: NaN.
    weights = [[1, 1, 1, 1, 1, 1], [2, 0, 1, 5, 0, 1], [0, 0, 0, 1, 0, 0]]
    result = rsna_score(gt_image, gt_boxes, pred_image, pred_boxes, scores, images, weights=weights)
    np.testing.assert_allclose(result[:2], [11 / 30, 7 / 12], rtol=1e-12)
    assert np.isnan(result[2])
    # at the threshold 0.6 alone i5 scores 0 (0.6 is not > 0.6): (1 + 1/3) / 5; at 0.55 alone it scores 1:
    # (1 + 1 + 1/3) / 5
    np.testing.assert_allclose(rsna_score(gt_image, gt_boxes, pred_image, pred_boxes, scores, images, (0.6,)),
                               [(4 / 3) / 5], rtol=1e-12)
    np.testing.assert_allclose(rsna_score(gt_image, gt_boxes, pred_image, pred_boxes, scores, images, (0.55,)),
                               [(7 / 3) / 5], rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Integer weights = duplicated images
# ----------------------------------------------------------------------------------------------------------------

def _duplicate(gt, pred, weights):
    """The case with image i repeated weights[i - 1] times, as new ids "i/copy"."""
    copies = {i: [f"{i}/{k}" for k in range(int(w))] for i, w in enumerate(weights, start=1)}
    return ([(new, c, b) for i, c, b in gt for new in copies[i]],
            [(new, c, b, s) for i, c, b, s in pred for new in copies[i]],
            [new for i in sorted(copies) for new in copies[i]])


@pytest.mark.parametrize("case", range(3))
def test_integer_weights_equal_duplicated_images(gen, case):
    rng, num_classes, num_images = _rng(gen), 4, 8
    image_ids = list(range(1, num_images + 1))
    weights = rng.integers(0, 4, size=(3, num_images))
    weights[:, 0] = 2  # image 1 holds the duplicated GT boxes
    thresholds = (0.3, 0.5, 0.75)
    # AP: distinct scores (a score tied across images could change the interpolated precision; see the docstring)
    gt, pred = _random_case(rng, num_images=7, num_classes=num_classes, crowded_image=False, distinct_scores=True)
    m = match_detections(*_arrays(gt, pred), thresholds, max_per_image=3, images=image_ids)
    for interpolation in ("coco", "voc"):
        weighted = average_precision(m, num_classes, weights=weights, interpolation=interpolation)
        np.testing.assert_allclose(average_precision(m, num_classes, weights, interpolation, chunk=1), weighted,
                                   rtol=0, atol=0)
        for row, w in zip(weighted, weights):
            dup_gt, dup_pred, dup_images = _duplicate(gt, pred, w)
            dm = match_detections(*_arrays(dup_gt, dup_pred), thresholds, max_per_image=3, images=dup_images)
            np.testing.assert_allclose(row, average_precision(dm, num_classes, interpolation=interpolation)[0],
                                       rtol=0, atol=1e-12)
    assert np.isfinite(weighted).any() and not np.isin(weighted[np.isfinite(weighted)], (0, 1)).all()

    # FROC and RSNA: tied scores allowed (a duplicate's detections tie with the original's: they enter together)
    gt, pred = _random_case(rng, num_images=7, num_classes=num_classes, crowded_image=False)
    m = match_detections(*_arrays(gt, pred), thresholds, images=image_ids)
    rates = (0.25, 0.5, 1, 2, 4, 8, 16)
    weighted = froc(m, num_images, rates, weights=weights, threshold_index=1)
    np.testing.assert_allclose(froc(m, num_images, rates, weights, 1, chunk=1), weighted, rtol=0, atol=0)
    one_class = [(i, 0, b) for i, c, b in gt], [(i, 0, b, s) for i, c, b, s in pred]
    rsna = rsna_score(*[np.asarray(a) for a in _rsna_args(*one_class)], images=image_ids, weights=weights)
    for k, w in enumerate(weights):
        dup_gt, dup_pred, dup_images = _duplicate(gt, pred, w)
        dm = match_detections(*_arrays(dup_gt, dup_pred), thresholds, images=dup_images)
        np.testing.assert_allclose(weighted[k], froc(dm, len(dup_images), rates, threshold_index=1)[0],
                                   rtol=0, atol=1e-12)
        dup_gt, dup_pred, dup_images = _duplicate(*one_class, w)
        np.testing.assert_allclose(rsna[k], rsna_score(*_rsna_args(dup_gt, dup_pred), images=dup_images)[0],
                                   rtol=0, atol=1e-12)
    assert ((weighted > 0) & (weighted < 1)).any() and np.isfinite(rsna).all() and ((rsna > 0) & (rsna < 1)).any()


def _rsna_args(gt, pred):
    return ([g[0] for g in gt], np.array([g[2] for g in gt]).reshape(-1, 4), [p[0] for p in pred],
            np.array([p[2] for p in pred]).reshape(-1, 4), [p[3] for p in pred])


# ----------------------------------------------------------------------------------------------------------------
# Stratified patient bootstrap
# ----------------------------------------------------------------------------------------------------------------

def _patients():
    # 12 patients with 1-3 images: strata "a" (p0-p4), "b" (p5-p10), "c" (p11 alone)
    images_per_patient = [1, 2, 3, 1, 2, 1, 1, 3, 2, 1, 2, 2]
    patients = np.repeat([f"p{k}" for k in range(12)], images_per_patient)
    strata = np.array(["a" if int(p[1:]) < 5 else "b" if int(p[1:]) < 11 else "c" for p in patients])
    return patients, strata


def test_stratified_bootstrap_keeps_strata_sizes_and_patients_together():
    patients, strata = _patients()
    result = stratified_patient_bootstrap(patients, strata, resamples=300, seed=3)
    w = result.weights
    assert w.shape == (300, len(patients)) and not result.redrawn.any() and not result.failed.any()
    first = {p: int(np.flatnonzero(patients == p)[0]) for p in np.unique(patients)}
    for p in first:
        same = patients == p
        assert (w[:, same] == w[:, [first[p]]]).all()  # images of a patient share its multiplicity
    per_patient = {p: w[:, first[p]] for p in first}
    sizes = {"a": 5, "b": 6, "c": 1}
    for s, size in sizes.items():
        members = [p for p in first if strata[first[p]] == s]
        assert len(members) == size
        np.testing.assert_array_equal(sum(per_patient[p] for p in members), size)
    np.testing.assert_array_equal(per_patient["p11"], 1)  # alone in its stratum: always drawn once
    assert per_patient["p0"].max() >= 2 and (per_patient["p0"] == 0).any()  # resampled, not copied
    again = stratified_patient_bootstrap(patients, strata, resamples=300, seed=3).weights
    np.testing.assert_array_equal(again, w)
    assert not np.array_equal(stratified_patient_bootstrap(patients, strata, 300, seed=4).weights, w)


def test_stratified_bootstrap_redraws_rejected_resamples():
    patients, strata = _patients()
    p5 = int(np.flatnonzero(patients == "p5")[0])
    # p5 drawn at least twice among the 6 of stratum b: probability about 0.26 per draw
    result = stratified_patient_bootstrap(patients, strata, 200, seed=0, required=lambda row: row[p5] >= 2)
    assert (result.weights[:, p5] >= 2).all() and not result.failed.any()
    assert result.redrawn.sum() > 100 and (result.redrawn == 0).any()
    assert result.redrawn.max() <= 100
    # an impossible requirement: every resample redrawn max_redraws times, then kept and flagged
    calls = []
    hopeless = stratified_patient_bootstrap(patients, strata, 5, seed=0, max_redraws=3,
                                            required=lambda row: calls.append(1) and False)
    assert hopeless.failed.all() and (hopeless.redrawn == 3).all() and len(calls) == 5 * 4
    np.testing.assert_array_equal(hopeless.weights[:, patients == "p11"], 1)
    with pytest.raises(ValueError, match="strata"):
        stratified_patient_bootstrap(["p", "p", "q"], ["a", "b", "a"], 3, seed=0)


def test_patient_strata_rarest_box_class_then_rarest_label():
    # Box classes by patient: p1 {0, 2} (over two images), p2 {0}, p5 {0}: class 0 has 3 patients, class 2 one,
    # so p1 -> box:2, p2 and p5 -> box:0. Positive labels: p3 {1, 3}, p5 {1}: class 1 has 2 patients, class 3 one,
    # so p3 -> label:3. p4: only unknown (-1) and negative labels -> none.
    patients = ["p1", "p1", "p2", "p3", "p4", "p5"]
    box_classes = [[0], [2], [0, 0], [], [], [0]]
    labels = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1], [-1, 0, -1, 0], [1, 1, 0, 0]])
    strata = patient_strata(patients, box_classes, labels)
    assert strata.tolist() == ["box:2", "box:2", "box:0", "label:3", "none", "box:0"]
    # without labels nothing is a label stratum
    assert patient_strata(patients, box_classes).tolist() == ["box:2", "box:2", "box:0", "none", "none", "box:0"]
    weights = stratified_patient_bootstrap(patients, strata, 50, seed=1).weights
    np.testing.assert_array_equal(weights[:, :2], 1)  # p1 alone in box:2 (both images)
    np.testing.assert_array_equal(weights[:, 2] + weights[:, 5], 2)  # box:0 keeps its two patients
