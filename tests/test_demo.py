import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from dmfast.cli.main import main
import dmfast.demo
from dmfast.config import DemoConfig, TrainConfig
from dmfast.demo import mean_accuracy, verdict
from dmfast.testing import shared_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole chain on a small phantom with a fixed seed (about two minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out=str(out), count=700, size=96, epochs=3, attention_epochs=2, align_epochs=1, seed=1,
                        overlays=1)
    return out, dmfast.demo.run(config, Console(quiet=True))


def test_attention_localizes_better_than_the_base_model(demo):
    _, report = demo
    base = mean_accuracy(report, "base")
    attention = max(mean_accuracy(report, "+DM"), mean_accuracy(report, "+PDM"))
    assert attention > base, {name: mean_accuracy(report, name) for name in report["methods"]}
    line = verdict(report)  # with its paired interval, which decides the wording
    low, high = (float(v) for v in line.split("interval [")[1].rstrip("])").split(", "))
    assert low <= attention - base <= high
    assert ("is better than" in line) == (low > 0) and ("not shown to differ" in line) == (low <= 0 <= high)


def test_demo_writes_every_stage_and_a_consistent_report(demo):
    out, report = demo
    for path in ("base/checkpoint.pt", "align/alignment.pt", "align/alignment_grid.png", "aligned/checkpoint.pt",
                 "masks-dm/masks.pt", "masks-dm/masks.png", "masks-pdm/masks.pt", "dm/checkpoint.pt",
                 "pdm/checkpoint.pt", "eval/eval.json", "eval/eval.md"):
        assert (out / path).is_file(), path
    assert list(report["methods"]) == ["base", "+align", "+DM", "+DM mask only", "+PDM", "+PDM mask only"]
    assert set(report["stage_seconds"]) >= {"train base", "align", "masks (DM)", "train +PDM", "eval"}
    on_disk = json.loads((out / "eval" / "eval.json").read_text())
    assert on_disk["methods"]["+DM"]["mean_auroc"] == report["methods"]["+DM"]["mean_auroc"]
    assert json.loads((out / "demo.json").read_text())["stage_seconds"] == report["stage_seconds"]
    for name, method in report["methods"].items():
        iou = method["iou"]
        assert iou["thresholds"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
        accuracy = [a for a in iou["mean_accuracy"]]
        assert all(0 <= a <= 1 for a in accuracy) and accuracy == sorted(accuracy, reverse=True), name
        if method["kind"] == "checkpoint":
            assert 0.5 < method["mean_auroc"] <= 1 and method["images_per_second"] > 0
    overlays = report["overlays"]
    assert overlays and all(p.endswith(".png") for p in overlays)
    picture = np.asarray(Image.open(overlays[0]))
    assert picture.ndim == 3 and picture.shape[2] == 3
    assert ((picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 255)).any()  # a magenta GT box
    markdown = (out / "eval" / "eval.md").read_text()
    assert "Classification AUROC" in markdown and "| +PDM mask only |" in markdown


def test_masks_and_eval_commands_on_the_demo_checkpoints(demo, tmp_path):
    out, _ = demo
    runner = CliRunner()
    data, cache = out / "phantom", out / "cache-96"
    result = runner.invoke(main, ["masks", str(data), "--checkpoint", str(out / "aligned" / "checkpoint.pt"),
                                  "--out", str(tmp_path / "m"), "--confidence", "0.6", "--asymmetric", "",
                                  "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["eval", str(data), "--checkpoint", f"mine={out / 'dm' / 'checkpoint.pt'}",
                                  "--masks", f"sym={tmp_path / 'm' / 'masks.pt'}", "--box-threshold", "wang",
                                  "--max-boxes", "3", "--overlays", "0", "--out", str(tmp_path / "e"),
                                  "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(report["methods"]) == ["mine", "mine mask only", "sym mask only"]
    assert report["config"]["box_thresholds"] == pytest.approx([60 / 255, 180 / 255])
    assert not (tmp_path / "e" / "overlays").exists()


def test_pseudo_masks_of_the_real_sample_find_two_lungs(tmp_path):
    sample = shared_data("chestxray14-sample")
    if not (sample / "Data_Entry_2017.csv").is_file():
        pytest.skip("../shared/data/chestxray14-sample is absent (set DMFAST_SHARED_DATA)")
    result = CliRunner().invoke(main, ["masks", str(sample), "--pseudo", "--size", "128", "--out", str(tmp_path),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "masks.json").read_text())
    assert summary["lungs_segmented"] and summary["anchor"] == "mean of the No Finding training images"
    assert 0.1 < summary["mask_area"]["Infiltration"] < 0.5 and summary["mask_area"]["Cardiomegaly"] > 0.03


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_predict_finds_the_phantom_findings_in_resized_padded_images(demo, tmp_path):
    """The +DM model file (aligned, with attention) on test X-rays enlarged 1.5x and padded to a non-square
    canvas: the boxes of the findings it reports land on the ground-truth boxes, in the canvas's pixels."""
    from dmfast import checkpoints
    from dmfast.data.dataset import FINDINGS
    from dmfast.data.formats import open_dataset

    out, _ = demo
    dataset = open_dataset(out / "phantom")
    test = set(checkpoints.load(out / "dm" / "checkpoint.pt", checkpoints.CLASSIFIER)["splits"]["test"])
    truth = {n: b for n, b in dataset.boxes_xyxy().items() if n in test}  # in the phantom's own 128 px pixels
    (tmp_path / "in").mkdir()
    for name in truth:
        image = Image.open(dataset.paths[name]).convert("L")
        canvas = np.zeros((int(image.height * 1.5) + 16, int(image.width * 1.5)), np.uint8)
        canvas[16:] = np.asarray(image.resize((canvas.shape[1], canvas.shape[1]), Image.Resampling.LANCZOS))
        Image.fromarray(canvas).save(tmp_path / "in" / name)
    (tmp_path / "original").mkdir()
    for name in truth:
        (tmp_path / "original" / name).symlink_to(dataset.paths[name])

    def predict(folder):
        result = CliRunner().invoke(main, ["predict", str(out / "dm" / "model.pt"), str(tmp_path / folder), "--out",
                                           str(tmp_path / f"p-{folder}")])
        assert result.exit_code == 0, result.output
        images = json.loads((tmp_path / f"p-{folder}" / "predictions.json").read_text())["images"]
        return {Path(i["path"]).name: i for i in images}

    found, original = predict("in"), predict("original")
    reported, hits, agree = 0, [], []
    for name, boxes in truth.items():
        for finding, *box in boxes:
            gt = [1.5 * box[0], 1.5 * box[1] + 16, 1.5 * box[2], 1.5 * box[3] + 16]
            mine = found[name]["findings"].get(FINDINGS[finding])
            if mine:
                reported += 1
                hits.append(max((_iou(gt, b["box"]) for b in mine["boxes"]), default=0.0))
        # The same finding's boxes on the original image, carried into the canvas, land on the canvas's boxes:
        # the model sees nearly the same pixels, so a wrong scale or offset would show here, not its accuracy.
        for finding, result in found[name]["findings"].items():
            if finding in original[name]["findings"] and result["boxes"]:
                carried = [[1.5 * b[0], 1.5 * b[1] + 16, 1.5 * b[2], 1.5 * b[3] + 16]
                           for b in (o["box"] for o in original[name]["findings"][finding]["boxes"])]
                agree.append(max(_iou(result["boxes"][0]["box"], c) for c in carried))
    print(f"{reported} of {sum(map(len, truth.values()))} ground-truth boxes of a reported class; IoU {hits}")
    print(f"canvas against carried original boxes: IoU {agree}")
    assert reported >= 10 and sum(h > 0.1 for h in hits) >= 0.4 * reported and max(hits) >= 0.3
    assert len(agree) >= 10 and sorted(agree)[len(agree) // 2] >= 0.7


def test_detection_scores_rank_boxes_and_match_pycocotools(demo):
    """The demo's eval as a detection benchmark: boxes have many distinct scores that rank them (AP clearly above
    the same boxes with shuffled scores), every test image is in boxes.csv (the phantom marks every finding, so all
    are scored for detection), and pycocotools reads the COCO files and finds the AP of eval.json."""
    import contextlib
    import csv
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out, report = demo
    rows = list(csv.DictReader(open(out / "eval" / "boxes.csv")))
    predictions = list(csv.DictReader(open(out / "eval" / "predictions.csv")))
    assert report["detection"]["images"] == report["test_images"]
    files = report["detection"]["coco_files"]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(files["ground_truth"])

    def ap(detections, iou: float) -> float:
        """pycocotools' AP at one IoU threshold (all areas, 100 detections per image)."""
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
            evaluation.params.iouThrs = np.array([iou])
            evaluation.evaluate()
            evaluation.accumulate()
        precision = evaluation.eval["precision"][0, :, :, 0, -1]
        return float(precision[precision > -1].mean())

    for method in ("base", "+DM"):
        mine = [r for r in rows if r["method"] == method]
        assert {r["image"] for r in mine} == {r["image"] for r in predictions if r["method"] == method}
        scores = [float(r["score"]) for r in mine if r["score"]]
        assert len(set(scores)) > 0.5 * len(scores), method  # not one score per map peak
        results = json.loads(Path(files[method]).read_text())
        detection = report["methods"][method]["detection"]
        assert detection["pycocotools"]["replaced"] == []  # dmfast's own AP agreed with pycocotools'
        assert detection["pycocotools"]["AP50"] == pytest.approx(detection["coco_ap50"], abs=1e-9)
        assert ap(results, 0.5) == pytest.approx(detection["coco_ap50"], abs=1e-9)
        # the demo's 96-px models rarely reach IoU 0.5: the ranking shows where their boxes hit a finding at all
        shuffled = np.random.default_rng(0).permutation([r["score"] for r in results])
        mine_ap, shuffled_ap = ap(results, 0.1), ap([{**r, "score": float(s)} for r, s in zip(results, shuffled)], 0.1)
        assert mine_ap > 2 * shuffled_ap + 0.05, (method, mine_ap, shuffled_ap)


def test_every_interval_of_the_demo_contains_its_estimate(demo):
    _, report = demo
    for name, method in report["methods"].items():
        u = method["uncertainty"]
        assert u["incomplete"] == 0
        for key, (low, high) in u["intervals"].items():
            point = method["mean_auroc"] if key == "mean_auroc" else method["detection"][key] \
                if key in method.get("detection", {}) else \
                method["iou"]["mean_accuracy"][method["iou"]["thresholds"].index(float(key.split("@")[1]))]
            assert low - 1e-12 <= point <= high + 1e-12, (name, key, point, low, high)


def test_model_files_and_checkpoints_evaluate_alike_from_anywhere(demo, tmp_path, monkeypatch):
    """The demo's four checkpoints and their model files give identical tables; the model files, copied away and
    evaluated from another working directory, still report their overlap with the training images."""
    import shutil

    out, _ = demo
    runs = {"base": "base", "+align": "aligned", "+DM": "dm", "+PDM": "pdm"}
    for run in runs.values():
        (tmp_path / "models" / run).mkdir(parents=True)
        shutil.copy(out / run / "model.pt", tmp_path / "models" / run / "model.pt")
    monkeypatch.chdir(tmp_path)

    def evaluate(kind: str, *extra) -> dict:
        arguments = ["eval", str(out / "phantom"), "--cache", str(out / "cache-96"), "--overlays", "0",
                     "--bootstrap", "0", "--out", f"e-{kind}", *extra]
        for name, run in runs.items():
            path = out / run / "checkpoint.pt" if kind == "checkpoints" else f"models/{run}/model.pt"
            arguments += ["--checkpoint", f"{name}={path}"]
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / f"e-{kind}" / "eval.json").read_text())

    checkpoints, models = evaluate("checkpoints"), evaluate("models")
    assert checkpoints["methods"].keys() == models["methods"].keys()
    for name in checkpoints["methods"]:
        a, b = checkpoints["methods"][name], models["methods"][name]
        for key in ("auroc", "iou", "iobb", "detection"):
            assert a.get(key) == b.get(key), (name, key)
    assert checkpoints["selection"] == models["selection"]
    shutil.move(out / "phantom", tmp_path / "moved")  # the training data gone: the model file still knows
    try:
        other = tmp_path / "other"
        shutil.copytree(tmp_path / "moved", other)
        result = CliRunner().invoke(main, ["eval", str(other), "--checkpoint", "m=models/dm/model.pt", "--out",
                                           "e-moved", "--overlays", "0", "--bootstrap", "0", "--split", "all",
                                           "--cache", str(tmp_path / "cache")])
        assert result.exit_code == 1 and "share a name" in result.output, result.output
    finally:
        shutil.move(tmp_path / "moved", out / "phantom")


def test_precision_benchmark_compares_the_demo_models_and_trainings_in_both_precisions(demo, tmp_path):
    """benchmarks.precision on a demo's folder: whole eval and predict passes of its four models in float32 and
    bf16 (the two stages compare the same outputs, so their largest probability differences agree), the base
    classifier trained twice per precision, paired by seed, and the alignment module once per precision."""
    from benchmarks.precision import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--arch", "resnet18", "--size", "32", "--batch", "2", "--train-size", "32", "--train-batch", "2",
                "--min-run-time", "0.01", "--rounds", "1", "--models", str(demo[0]), "--pass-rounds", "1",
                "--train-seeds", "2", "--train-steps", "2", "--train-fp32-steps", "1", "--align-seeds", "1",
                "--out", str(out)])
    config = json.loads(out.read_text())["config"]
    passes, runs = config["trained_passes"], config["training_runs"]
    assert [name for name, _ in passes["models"]] == ["base", "+align", "+DM", "+PDM"]
    assert set(passes["images_per_second"]) == {"eval fp32", "eval bf16", "predict fp32", "predict bf16"}
    for name, agreement in passes["agreement"].items():
        assert 0 < agreement["max_probability_difference"] < 0.1, name
        assert abs(agreement["max_probability_difference"] - agreement["predict_max_probability_difference"]) < 1e-5
        assert agreement["boxes"] == 14 * passes["test_images"] and 0.8 <= agreement["boxes_iou_0.9"] <= 1
    for name in ("validation_auroc", "test_auroc"):
        paired = runs[name]
        assert len(paired["first"]) == len(paired["second"]) == 2
        assert paired["difference"] == pytest.approx(np.mean(paired["second"]) - np.mean(paired["first"]))
        assert paired["interval"][0] <= paired["difference"] <= paired["interval"][1]
    assert runs["images_per_second"]["fp32"] > 0 and runs["images_per_second"]["bf16"] > 0
    aligns = config["alignment_runs"]
    assert aligns["config"]["seeds"] == [0] and aligns["config"]["epochs"] == 1  # the demo's align_epochs
    assert aligns["config"]["max_steps"] == 2
    assert [(r["precision"], r["seed"]) for r in aligns["runs"]] == [("fp32", 0), ("bf16", 0)]  # as saved
    assert all(r["kept"] in ("learned", "identity") for r in aligns["runs"])
    for name in ("validation_loss", "misalignment_after"):  # the phantom has its known misalignment
        paired = aligns[name]
        assert len(paired["first"]) == len(paired["second"]) == 1
        assert all(0 < value < 1 for value in paired["first"] + paired["second"]), name
    assert aligns["seconds_per_run"]["fp32"] > 0 and aligns["seconds_per_run"]["bf16"] > 0
    gradients = config["gradient_error"]  # bf16's step departs from float32's, at random and trained weights
    assert list(gradients) == ["random weights", "trained weights"]
    for errors in gradients.values():
        assert list(errors) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
        assert all(0 < error < 2 for error in errors.values()), errors


def test_precision_benchmark_trains_from_a_given_classifier(demo, tmp_path):
    """--train-init starts the benchmark's trainings from a trained classifier's weights instead of random ones;
    --train-first-seed runs later seeds (to pool with earlier runs: each seed's runs do not depend on the others)."""
    from benchmarks.precision import parse_args, training_runs
    from dmfast import checkpoints

    def runs(folder, *options):
        args = parse_args(["--models", str(demo[0]), "--train-seeds", "1", "--train-steps", "1", *options])
        return training_runs(args, tmp_path / folder)

    def settings(folder, run):
        return checkpoints.load(tmp_path / folder / run / "checkpoint.pt", checkpoints.CLASSIFIER)["config"]

    base = str(demo[0] / "base" / "model.pt")
    scratch, started = runs("scratch"), runs("started", "--train-init", base)
    assert started["config"]["init"] == base and scratch["config"]["init"] is None
    assert scratch["config"]["fp32_steps"] == TrainConfig.fp32_steps  # the bf16 runs' float32 start is train's
    ran = settings("scratch", "train-bf16-0")
    assert ran["precision"] == "bf16" and ran["fp32_steps"] == TrainConfig.fp32_steps
    for name in ("validation_auroc", "test_auroc"):
        assert started[name]["first"] != scratch[name]["first"], name
    later = runs("later", "--train-first-seed", "3")
    assert scratch["config"]["seeds"] == [0] and later["config"]["seeds"] == [3]
    assert settings("later", "train-fp32-3")["seed"] == settings("later", "train-bf16-3")["seed"] == 3
