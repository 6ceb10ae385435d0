"""Detection outputs and scores: box confidences, image-pixel boxes, COCO files against pycocotools, the challenges'
submission files, and bootstrap intervals that describe their estimate (coverage and centring)."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dmfast.data.dataset import FINDINGS
from dmfast.detection import (VINBIGDATA_NO_FINDING, Boxes, Task, coco_ground_truth, coco_results, pycocotools_ap,
                              rsna_submission, submission_id, vindr_submission)
from dmfast.inference import Prediction
from dmfast.metrics import class_preserving_bootstrap, interval, weighted_mean_accuracy, weighted_mean_auroc

C = len(FINDINGS)


def test_box_scores_rank_maps_and_tell_nested_boxes_apart():
    cams = torch.zeros(2, C, 8, 8)
    cams[0, 3, 2:6, 2:6] = 0.5  # two levels: a wide plateau around a bright core
    cams[0, 3, 3:5, 3:5] = 1.0
    cams[1, 3, 1:3, 1:3] = 1.0
    probabilities = torch.full((2, C), 0.1)
    probabilities[0, 3], probabilities[1, 3] = 0.9, 0.4
    prediction = Prediction(probabilities, cams, None)
    args = ([0, 1], [3, 3], 32, (0.2, 0.8), 4, ["a", "b"])
    _, boxes, mean, counts = prediction.boxes(*args, score="mean")
    assert counts.tolist() == [2, 2]  # a region at each level (the upsampled map's edges are ramps)
    # image 0: one peak, so the plateau box (level 0.2) comes first as the paper ranks them, but the core box
    # (level 0.8) inside it has the higher mean; both times p
    assert 0.9 >= mean[0, 1] > mean[0, 0] > 0.9 * 0.2 and mean[0, 2:].eq(0).all()
    assert 0.4 >= mean[1, 1] > mean[1, 0] > 0.4 * 0.2
    _, _, peak, _ = prediction.boxes(*args, score="peak")
    assert peak[0, 0] == peak[0, 1] == pytest.approx(0.9)  # one peak in both nested regions
    _, _, alone, _ = prediction.boxes(*args, score="probability")
    assert alone[0, :2].tolist() == pytest.approx([0.9, 0.9]) and alone[0, 2:].eq(0).all()
    with pytest.raises(ValueError, match="box score must be one of"):
        prediction.boxes(*args, score="area")


def _kept_by_peak_with_means(maps: torch.Tensor, size: int, levels, keep: int):
    """scipy's regions of each normalised, upsampled map, the ``keep`` best by peak (ties: level, raster order),
    with their boxes and their means."""
    from scipy import ndimage
    import torch.nn.functional as F

    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    up = F.interpolate(((maps - low) / (high - low))[:, None].double(), size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    result = []
    for image in up:
        found = []
        for level, threshold in enumerate(levels):
            labels, count = ndimage.label(image >= threshold, structure=np.ones((3, 3), dtype=int))
            index = np.arange(1, count + 1)
            peaks, means = ndimage.maximum(image, labels, index), ndimage.mean(image, labels, index)
            for label, (rows, cols) in enumerate(ndimage.find_objects(labels)):
                found.append((-peaks[label], level, label, [cols.start, rows.start, cols.stop, rows.stop],
                              means[label]))
        found.sort(key=lambda f: f[:3])
        result.append([(box, mean) for *_, box, mean in found[:keep]])
    return result


@pytest.mark.parametrize("keep", [1, 3])
def test_the_mean_score_keeps_the_papers_boxes_and_scores_them_by_their_regions_mean(keep):
    """``--box-score mean`` changes the scores only: the boxes kept are those of the peak ranking (so the paper's
    accuracy and AFP do not depend on the score), each scored by its own region's mean."""
    from dmfast import ops
    from dmfast.inference import scored_boxes

    generator = torch.Generator().manual_seed(5)
    maps = torch.rand(6, 7, 7, generator=generator)
    maps[3] = 0  # a constant map: no box
    levels = (60 / 255, 180 / 255)
    boxes, region, counts = scored_boxes(maps, 40, levels, keep, "mean")
    by_peak, peak, peak_counts = ops.cam_boxes(maps, (40, 40), levels, keep, "max")
    assert torch.equal(boxes, by_peak) and torch.equal(counts, peak_counts)
    assert counts.max() > keep  # many regions compete for the kept places
    for i, expected in enumerate(_kept_by_peak_with_means(maps[[i for i in range(6)]], 40, levels, keep)):
        assert boxes[i, :len(expected)].tolist() == [box for box, _ in expected]
        assert region[i, :len(expected)].tolist() == pytest.approx([mean for _, mean in expected], abs=1e-5)
        assert region[i, len(expected):].eq(0).all()
    assert torch.equal(scored_boxes(maps, 40, levels, keep, "peak")[1], peak)
    shown = (torch.arange(keep)[None] < counts[:, None]).double()
    assert torch.equal(scored_boxes(maps, 40, levels, keep, "probability")[1], shown)


def test_boxes_go_to_each_images_own_pixels_rounded_and_clipped():
    boxes = Boxes.of(["a", "b"], [0, 2], [[10, 20, 30, 40], [0, 0, 64, 64]], [0.5, 0.25], [0.4, 0.2])
    # a: 200 x 100 X-ray in a 64-px square: scale 200/64, padded 50 px on top; b: 64 x 64 at scale 1
    moved = boxes.to_image_pixels({"a": (200 / 64, 0, 50, 200, 100), "b": (1.0, 0, 0, 60, 64)})
    assert moved.boxes.tolist() == [[31.25, 12.5, 93.75, 75.0], [0, 0, 60, 64]]
    assert moved.probability.tolist() == [0.5, 0.25] and moved.score.tolist() == [0.4, 0.2]
    assert len(moved.on(["b"])) == 1 and len(moved.on(["a", "b"], [2])) == 1


def _random_case(rng, images: int = 7, classes=(0, 3, 5)):
    truth, found = [], []
    for i in range(images):
        for c in classes:
            for _ in range(rng.integers(0, 3)):
                x, y = rng.uniform(0, 200, 2)
                w, h = rng.uniform(10, 80, 2)
                truth.append((f"im{i}", c, [x, y, x + w, y + h]))
                for _ in range(rng.integers(0, 3)):  # detections near it, of varying overlap
                    jitter = rng.normal(0, 8, 4)
                    found.append((f"im{i}", c, [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]))
            for _ in range(rng.integers(0, 2)):  # false positives
                x, y = rng.uniform(0, 200, 2)
                found.append((f"im{i}", c, [x, y, x + 30, y + 30]))
    scores = np.round(rng.uniform(0, 1, len(found)), 2)  # rounded: ties across images
    truth_boxes = Boxes.of(*zip(*truth))
    detections = Boxes.of(*zip(*found), probability=scores, score=scores)
    def rounded(b):  # corners ordered (jitter may cross them), inside the image, rounded as written
        corners = np.round(np.clip(b.boxes, 0, None), 2)
        corners = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2],
                                                                                          corners[:, 2:])], 1)
        return Boxes(b.image, b.cls, corners, b.probability, b.score)

    return [f"im{i}" for i in range(images)], rounded(truth_boxes), rounded(detections)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dmfast_coco_ap_is_pycocotools_on_the_written_files(seed):
    images, truth, detections = _random_case(np.random.default_rng(seed))
    task = Task.of(images, truth, 0.5, 0.4)
    mine = task.score(detections)
    sizes = {n: (300, 300) for n in images}
    ground = coco_ground_truth(truth, images, sizes)
    theirs = pycocotools_ap(ground, coco_results(detections, images))
    assert mine["coco_ap"][0] == pytest.approx(theirs["AP"], abs=1e-12)
    assert mine["coco_ap50"][0] == pytest.approx(theirs["AP50"], abs=1e-12)
    assert mine["coco_ap75"][0] == pytest.approx(theirs["AP75"], abs=1e-12)
    np.testing.assert_allclose(mine["per_class_ap"], theirs["per_class"][task.classes], atol=1e-12)
    assert 0 < mine["map40"][0] <= 1 and 0 < mine["froc"][0] <= 1 and 0 <= mine["rsna"][0] <= 1
    nothing = pycocotools_ap(ground, [])
    assert nothing["AP"] == 0 and task.score(Boxes.of())["coco_ap"][0] == 0


def test_the_challenges_submission_rows():
    cardiomegaly, nodule, mass, hernia, pneumonia = (FINDINGS.index(f) for f in
                                                    ("Cardiomegaly", "Nodule", "Mass", "Hernia", "Pneumonia"))
    rows = vindr_submission([("img1", [(cardiomegaly, 0.91, [10.2, 20.7, 300.4, 200.5]), (nodule, 0.5, [1, 2, 3, 4]),
                                       (mass, 0.25, [5, 6, 7, 8]), (hernia, 0.7, [0, 0, 9, 9])]),
                             ("img2", []), ("img3", [(hernia, 0.9, [0, 0, 9, 9])])])
    # VinBigData ids: Cardiomegaly 3, Nodule/Mass 8; Hernia is not one of its classes
    assert rows == [["img1", "3 0.910000 10 21 300 200 8 0.500000 1 2 3 4 8 0.250000 5 6 7 8"],
                    ["img2", VINBIGDATA_NO_FINDING], ["img3", VINBIGDATA_NO_FINDING]]
    # a Mass box on the Nodule box (IoU 0.81) would be the challenge's duplicate: the lower-scored one goes; a
    # nested box of one class stays (two regions of its own CAM)
    rows = vindr_submission([("img1", [(nodule, 0.4, [0, 0, 10, 10]), (mass, 0.6, [0, 0, 9, 9]),
                                       (nodule, 0.3, [0, 0, 9, 10]), (mass, 0.2, [50, 50, 60, 60])])])
    assert rows == [["img1", "8 0.600000 0 0 9 9 8 0.200000 50 50 60 60"]]
    rows = vindr_submission([("img1", [(nodule, 0.4, [0, 0, 10, 10]), (nodule, 0.3, [0, 0, 9, 10])])])
    assert rows == [["img1", "8 0.400000 0 0 10 10 8 0.300000 0 0 9 10"]]
    rows = rsna_submission([("p1", [(pneumonia, 0.8, [10, 20, 110, 70]), (cardiomegaly, 0.9, [0, 0, 5, 5])]),
                            ("p2", [])])
    assert rows == [["p1", "0.800000 10 20 100 50"], ["p2", ""]]  # x y width height
    assert submission_id("a/b/0005d3cc3c3c8d0c.dicom") == "0005d3cc3c3c8d0c" and submission_id("x/p-1.dcm") == "p-1"


def _skewed_set(rng, patients: int = 80):
    """Patients with one or two images; class 0 has a single box, class 1 many, class 2 a few; AUROC labels with a
    rare class. Returns patients, labels, box images, box classes and found flags [T, G]."""
    patient = np.repeat(np.arange(patients), rng.integers(1, 3, patients))
    n = len(patient)
    labels = (rng.uniform(size=(n, 3)) < [0.05, 0.3, 0.5]).astype(np.int8)
    labels[0, 0], labels[1, 0] = 1, 0
    images = [0] + list(rng.choice(n, 40)) + list(rng.choice(n, 6))
    classes = [0] + [1] * 40 + [2] * 6
    found = rng.uniform(size=(2, len(images))) < np.array([[0.7], [0.4]])
    return patient, labels, np.array(images), np.array(classes), found


def test_intervals_contain_and_centre_on_their_estimates_on_a_skewed_set():
    positions = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        patient, labels, images, classes, found = _skewed_set(rng)
        scores = labels + rng.normal(0, 1, labels.shape)
        drawn, _ = class_preserving_bootstrap(patient, labels, [(images, classes)], 400, seed)
        assert not drawn.failed.any()
        weights = drawn.weights
        # every resample keeps each class's box and positive/negative: the class set of the estimate
        assert (weights[:, images[classes == 0]] > 0).all() and (weights @ labels[:, 0] > 0).all()
        ones = np.ones((1, len(patient)))
        estimates = {"auroc": (weighted_mean_auroc(labels, scores, ones)[0],
                               weighted_mean_auroc(labels, scores, weights)),
                     **{f"accuracy{t}": (weighted_mean_accuracy(found, classes, ones[:, images], 3)[0, t],
                                         weighted_mean_accuracy(found, classes, weights[:, images], 3)[:, t])
                        for t in range(2)}}
        for name, (point, draws) in estimates.items():
            low, high = interval(draws)
            assert np.isfinite(draws).all() and low <= point <= high, (seed, name, point, low, high)
            positions.append((point - low) / (high - low))
    assert 0.35 < np.mean(positions) < 0.65, np.mean(positions)


def test_the_95_percent_intervals_cover_the_generating_value():
    """Mean AUROC (scores N(label * d_c, 1): AUC_c = Phi(d_c / sqrt 2)) and mean localization accuracy (a box of
    class c found with probability q_c), over repeated draws of 100 patients with one or two images each."""
    separation, hit = np.array([0.8, 1.2, 1.6]), np.array([0.3, 0.5, 0.8])
    true_auroc, true_accuracy = norm.cdf(separation / np.sqrt(2)).mean(), hit.mean()
    covered = {"auroc": 0, "accuracy": 0}
    draws = 100
    for seed in range(draws):
        rng = np.random.default_rng(1000 + seed)
        patient = np.repeat(np.arange(100), rng.integers(1, 3, 100))
        labels = (rng.uniform(size=(len(patient), 3)) < [0.1, 0.3, 0.5]).astype(np.int8)
        scores = labels * separation + rng.normal(0, 1, labels.shape)
        images = np.flatnonzero(labels.any(1))
        classes = np.array([int(np.flatnonzero(labels[i])[0]) for i in images])
        found = (rng.uniform(size=len(images)) < hit[classes])[None]
        drawn, _ = class_preserving_bootstrap(patient, labels, [(images, classes)], 300, seed)
        low, high = interval(weighted_mean_auroc(labels, scores, drawn.weights))
        covered["auroc"] += low <= true_auroc <= high
        low, high = interval(weighted_mean_accuracy(found, classes, drawn.weights[:, images], 3)[:, 0])
        covered["accuracy"] += low <= true_accuracy <= high
    assert all(count >= 0.9 * draws for count in covered.values()), covered
