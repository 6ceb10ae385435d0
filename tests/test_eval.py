import numpy as np
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dmfast.cli.main import main
from dmfast.data.dataset import FINDINGS
from dmfast.config import EvalConfig
from dmfast.eval import GroundTruth, mask_only
from dmfast.inference import to_image_frame
from dmfast.ops import affine_matrix

C = len(FINDINGS)


def test_to_image_frame_inverts_the_alignment(gen):
    maps = torch.randn(5, 6, 6, generator=gen)
    theta = affine_matrix(1 + 0.1 * torch.randn(5, generator=gen), 1 + 0.1 * torch.randn(5, generator=gen),
                          0.1 * torch.randn(5, generator=gen), 0.1 * torch.randn(5, generator=gen),
                          0.2 * torch.randn(5, generator=gen))
    resolution = 24
    up = F.interpolate(maps[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    torch.testing.assert_close(to_image_frame(maps, None, resolution), up[:, 0])
    # reference: sample the aligned map where the inverse transform sends each image pixel; outside, the minimum
    full = torch.cat([theta.double(), torch.tensor([[[0, 0, 1.0]]], dtype=torch.float64).expand(5, 1, 3)], 1)
    inverse = torch.linalg.inv(full)[:, :2]
    low = up.double().amin((2, 3), keepdim=True)
    grid = F.affine_grid(inverse, (5, 1, resolution, resolution), align_corners=False)
    expected = F.grid_sample(up.double() - low, grid, align_corners=False, padding_mode="zeros") + low
    torch.testing.assert_close(to_image_frame(maps, theta, resolution).double(), expected[:, 0], atol=1e-5, rtol=0)


class _Dataset:
    def __init__(self, boxes):
        self._boxes = boxes

    def boxes_in_square(self, names, size, space):
        return self._boxes

    def image_in_square(self, name, size):
        return 0, 0, size, size


def test_mask_only_baseline_predicts_the_mask_boxes_for_every_image():
    masks = torch.zeros(C, 16, 16)
    masks[1, 4:12, 8:14] = 1  # cardiomegaly: one rectangle (x 8..14, y 4..12 on the 16-grid)
    masks[2, 10:14, 1:5] = 1
    size = 64  # x4: the rectangle is x 32..56, y 16..48
    boxes = {"a.png": [(1, 32.0, 16.0, 56.0, 48.0), (2, 0.0, 0.0, 10.0, 10.0)],
             "b.png": [(1, 30.0, 16.0, 56.0, 50.0)], "c.png": [(0, 1.0, 1.0, 5.0, 5.0)]}
    truth = GroundTruth(_Dataset(boxes), ["a.png", "b.png", "c.png", "d.png"], size)
    assert truth.images == ["a.png", "b.png", "c.png"] and len(truth.boxes) == 4
    config = EvalConfig(data="", out="", checkpoints=[])
    method = mask_only("m", masks, truth, config)
    iou = method.localization["iou"]
    k = iou.thresholds.index(0.7)
    assert iou.accuracy[k, 1] == 1.0  # both cardiomegaly boxes found at IoU 0.7 (the second: 768/884 = 0.87)
    assert iou.accuracy[k, 2] == 0.0 and iou.afp[k, 2] == 1.0  # the effusion mask is elsewhere: 1 false positive
    assert iou.accuracy[k, 0] == 0.0 and iou.afp[k, 0] == 0.0  # no atelectasis mask: no boxes at all
    assert np.isnan(iou.accuracy[k, 3])  # no ground truth: not scored, not in the mean
    assert np.isclose(iou.mean_accuracy[k], 1 / 3)


def test_eval_command_reports_bad_options(tmp_path):
    runner = CliRunner()
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(main, ["eval", str(tmp_path), "--checkpoint", f"x={tmp_path / 'ckpt.pt'}", "--out",
                                  str(tmp_path / "o"), "--box-threshold", "half"])
    assert result.exit_code == 2 and "--box-threshold" in result.output
    result = runner.invoke(main, ["eval", str(tmp_path), "--checkpoint", f"x={tmp_path / 'missing.pt'}", "--out",
                                  str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing.pt is not a file" in result.output
    result = runner.invoke(main, ["eval", str(tmp_path), "--checkpoint", f"x={tmp_path / 'ckpt.pt'}", "--out",
                                  str(tmp_path / "o")])
    assert result.exit_code == 1 and "ckpt.pt: not a readable model file or classifier checkpoint" in result.output


def test_eval_scores_the_chosen_images_of_any_data_and_reports_training_overlap(tmp_path):
    import json

    from dmfast import train
    from dmfast.config import TrainConfig
    from dmfast.data.formats import open_dataset
    from dmfast.testing import phantom_with_cache

    a, cache_a = phantom_with_cache(tmp_path / "a", count=64, size=64, seed=1)
    b, cache_b = phantom_with_cache(tmp_path / "b", count=48, size=64, seed=2)  # another phantom, the same names
    checkpoint = train.run(TrainConfig(data=str(a), out=str(tmp_path / "run"), cache=str(cache_a), arch="resnet18",
                                       size=64, batch=8, epochs=1, max_steps=1, split="patients",
                                       val_fraction=0.2))

    def evaluate(data, cache, *extra):
        out = tmp_path / f"e{len(list(tmp_path.glob('e*')))}"
        result = CliRunner().invoke(main, ["eval", str(data), "--checkpoint", f"m={checkpoint}", "--out", str(out),
                                           "--cache", str(cache), "--overlays", "0", *extra])
        report = json.loads((out / "eval.json").read_text()) if result.exit_code == 0 else None
        return result, report

    _, report = evaluate(a, cache_a)  # its own training data: the checkpoint's test split
    trained = train.checkpoints.load(checkpoint, train.checkpoints.CLASSIFIER)["splits"]
    assert report["test_images"] == len(trained["test"])
    assert report["selection"]["what"] == "the checkpoint's test split"
    assert report["selection"]["overlap"]["m"] == {"names": 0, "patients": 0, "unknown_because": None}
    _recompute_from_the_csvs(tmp_path / "e0", report, open_dataset(a))
    result, _ = evaluate(b, cache_b)  # other data whose names the run trained on: refused unless allowed
    assert result.exit_code == 1 and "share a name" in result.output and "--allow-overlap" in result.output
    result, report = evaluate(b, cache_b, "--allow-overlap")  # then exactly its own test_list.txt
    other = open_dataset(b)
    assert result.exit_code == 0 and report["test_images"] == len(other.test)
    out = sorted(tmp_path.glob("e*"), key=lambda p: int(p.name[1:]))[-1]
    assert {line.split(",")[0] for line in (out / "predictions.csv").read_text().splitlines()[1:]} == other.test
    overlap = report["selection"]["overlap"]["m"]
    assert overlap["names"] > 0 and "share a name" in result.output  # phantoms reuse the NIH file names
    _, report = evaluate(b, cache_b, "--split", "all", "--checkpoint", f"same={checkpoint}", "--allow-overlap")
    assert report["test_images"] == len(other.images) == 48
    mine, same = report["methods"]["m"], report["methods"]["same"]
    low, high = mine["uncertainty"]["intervals"]["mean_auroc"]
    assert low <= mine["mean_auroc"] <= high and mine["uncertainty"]["resamples"] == 1000
    for difference in same["uncertainty"]["difference"].values():  # a method against itself: exactly [0, 0]
        assert difference["point"] == 0 and difference["interval"] == [0, 0]
    # four times the images: about half as wide (at 48 images most classes have a single positive, whose AUROC
    # varies with the negatives alone, so the smaller set here has 240)
    c, cache_c = phantom_with_cache(tmp_path / "c", count=240, size=64, seed=5)
    d, cache_d = phantom_with_cache(tmp_path / "d", count=960, size=64, seed=6)
    reports = [evaluate(data, cache, "--split", "all", "--allow-overlap")[1] for data, cache in ((c, cache_c),
                                                                                               (d, cache_d))]
    widths = [r["methods"]["m"]["uncertainty"]["intervals"]["mean_auroc"] for r in reports]
    assert widths[1][1] - widths[1][0] < 0.7 * (widths[0][1] - widths[0][0])
    (tmp_path / "names.txt").write_text("# three of them\n" + "\n".join(other.images[:3]) + "\n")
    _, report = evaluate(b, cache_b, "--images", str(tmp_path / "names.txt"), "--allow-overlap")
    assert report["test_images"] == 3
    (tmp_path / "bad.txt").write_text("nope.png\n")
    result, _ = evaluate(b, cache_b, "--images", str(tmp_path / "bad.txt"))
    assert result.exit_code == 1 and "1 names are not images of" in result.output
    (b / "test_list.txt").unlink()
    result, _ = evaluate(b, cache_b, "--allow-overlap")
    assert result.exit_code == 1 and "no test_list.txt" in result.output and "--split all" in result.output


def _box_iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _recompute_from_the_csvs(out, report, dataset):
    """The AUROC and localization accuracy of eval.json, from predictions.csv and boxes.csv alone."""
    import csv

    from dmfast.metrics import roc_auc

    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == report["test_images"] and {r["method"] for r in rows} == {"m"}
    scores = np.array([[float(r[c]) for c in FINDINGS] for r in rows])
    labels = np.array([[int(r[f"{c} label"]) for c in FINDINGS] for r in rows])
    assert np.isclose(roc_auc(labels, scores).mean, report["methods"]["m"]["mean_auroc"], atol=1e-4)
    boxes = [r for r in csv.DictReader(open(out / "boxes.csv")) if r["method"] == "m"]
    truth = dataset.boxes_xyxy()
    scored = {r["image"] for r in rows}
    found, total = np.zeros(C), np.zeros(C)
    for image, gts in truth.items():
        if image not in scored:
            continue
        for c, *gt in gts:
            mine = [[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in boxes
                    if r["image"] == image and r["class"] == FINDINGS[c]]
            total[c] += 1
            found[c] += any(_box_iou(box, gt) > 0.3 for box in mine)
    for r in boxes:  # each box's best IoU with the ground truth of its class on its image (none: empty)
        gts = [gt for c, *gt in truth.get(r["image"], []) if FINDINGS[c] == r["class"]]
        if not gts:
            assert r["best_iou"] == ""
            continue
        box = [float(r[k]) for k in ("x0", "y0", "x1", "y1")]
        assert np.isclose(float(r["best_iou"]), max(_box_iou(box, gt) for gt in gts), atol=1e-3)
    iou = report["methods"]["m"]["iou"]
    accuracy = np.divide(found, total, out=np.zeros(C), where=total > 0)[total > 0]
    assert total.sum() > 0 and np.isclose(accuracy.mean(), iou["mean_accuracy"][iou["thresholds"].index(0.3)])
