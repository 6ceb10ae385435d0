"""One model artefact everywhere: every reader of a trained classifier (eval, predict, masks, export, train
--init, align --perceptual) takes a model file, a run folder, a checkpoint.pt and a best.pt, and gives the same
results for the same weights; a model file carries what eval needs to check a test set against its training
images wherever it goes; runs store their paths resolved."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from dmfast import align, checkpoints, train
from dmfast.cli.main import main
from dmfast.config import AlignConfig, TrainConfig
from dmfast.errors import ModelFileError
from dmfast.data.formats import open_dataset
from dmfast.eval import training_overlap
from dmfast.inference import Classifier, export_model, load_classifier, load_model
from dmfast.testing import phantom_with_cache

SMALL = dict(size=64, batch=8, split="patients", val_fraction=0.2)
RUN = dict(arch="resnet18", cam_stride=16, epochs=1, max_steps=2, lr=1e-3, **SMALL)
ALIGN = dict(pool=8, epochs=1, max_steps=1, input_size=32, anchor_images=20, **SMALL)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 64 px phantom, an alignment run and a classifier trained on aligned images, both given relative paths
    (from the phantom's parent folder); the four ways to name the classifier."""
    folder = tmp_path_factory.mktemp("artefact")
    data, cache = phantom_with_cache(folder / "phantom", count=96, size=64, seed=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        relative = dict(data="phantom/data", cache="phantom/cache")
        align.run(AlignConfig(out="align", **relative, **ALIGN))
        train.run(TrainConfig(out="run", aligned="align/alignment.pt", **relative, **RUN))
    run = folder / "run"
    assert (run / "best.pt").is_file()  # the one epoch is the best
    kinds = {"model": run / "model.pt", "folder": run, "checkpoint": run / "checkpoint.pt", "best": run / "best.pt"}
    return SimpleNamespace(folder=folder, data=data, cache=cache, run=run, align=folder / "align", kinds=kinds)


def _invoke(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _said(result) -> str:
    """The output with its lines joined (rich wraps long warnings)."""
    return " ".join(result.output.split())


def test_runs_store_their_paths_resolved(world):
    resolved = lambda path: str(Path(path).resolve())  # noqa: E731
    for path in (world.run / "checkpoint.pt", world.run / "best.pt"):
        config = checkpoints.load(path, checkpoints.CLASSIFIER)["config"]
        assert config["data"] == resolved(world.data) and config["cache"] == resolved(world.cache)
        assert config["aligned"] == resolved(world.align / "alignment.pt")
    config = checkpoints.load(world.align / "alignment.pt", checkpoints.ALIGNMENT)["config"]
    assert config["data"] == resolved(world.data) and config["cache"] == resolved(world.cache)
    model = torch.load(world.run / "model.pt", weights_only=True)  # plain lists of str: weights-only readable
    assert model["config"]["data"] == resolved(world.data) and model["config"]["format"] == "chestxray14"
    state = checkpoints.load(world.run / "checkpoint.pt", checkpoints.CLASSIFIER)
    assert model["splits"] == state["splits"]
    dataset = open_dataset(world.data)
    trained = set(state["splits"]["train"]) | set(state["splits"]["val"])
    assert model["patients"] == sorted({str(r.patient) for r in dataset.records if r.image in trained})
    assert model["patients"] and all(isinstance(p, str) for p in model["patients"])


def test_every_kind_of_path_gives_the_same_classifier(world, gen, tmp_path):
    reference = Classifier(world.kinds["checkpoint"], "cpu")
    pixels = torch.randint(0, 256, (3, 1, 64, 64), generator=gen, dtype=torch.uint8)
    want = reference(pixels)
    assert want.theta is not None and reference.anchor is not None  # aligned: the alignment run's net and anchor
    stored = torch.load(world.kinds["model"], weights_only=True)
    for kind, path in world.kinds.items():
        model = load_model(path, "cpu") if kind == "folder" else Classifier(path, "cpu")  # load_model: a Classifier
        got = model(pixels)
        for name in ("probabilities", "cams", "theta"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6,
                                       msg=f"{kind} {name}")
        assert model.path.is_file() and model.config.data == reference.config.data, kind
        for name in ("size", "arch", "cam_stride", "mix", "aligned", "seed"):
            assert getattr(model.config, name) == getattr(reference.config, name), (kind, name)
        assert model.config.format in (None, "chestxray14"), kind  # a model file: as detected at export
        assert model.splits == reference.splits and model.splits_known and model.masks is None, kind
        torch.testing.assert_close(model.anchor, reference.anchor)
        config = TrainConfig(data=str(world.data), out=str(tmp_path / "unused"), init=str(path), **RUN)
        start = train.build_model(config, Console(quiet=True)).state_dict()  # train --init
        for key, value in reference.model.state_dict().items():
            assert key == "masks" or torch.equal(start[key], value), (kind, key)
        exported = torch.load(export_model(path, tmp_path / f"{kind}.pt"), weights_only=True)  # export
        for key in ("config", "splits", "patients", "size", "half"):
            assert exported[key] == stored[key], (kind, key)
        for key, value in stored["classifier"]["state"].items():
            assert torch.equal(exported["classifier"]["state"][key], value), (kind, key)
        torch.testing.assert_close(exported["aligner"]["anchor"], stored["aligner"]["anchor"])
    assert load_classifier(world.run)[2]["format"] == checkpoints.MODEL  # a run folder: its model.pt first
    (tmp_path / "unfinished").mkdir()
    shutil.copy(world.kinds["checkpoint"], tmp_path / "unfinished" / "checkpoint.pt")
    assert Classifier(tmp_path / "unfinished", "cpu").path.name == "checkpoint.pt"  # else its checkpoint.pt
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="a folder without model.pt or checkpoint.pt"):
        Classifier(tmp_path / "empty")
    with pytest.raises(ValueError, match="that is SOURCE itself.*or SOURCE .*checkpoint.pt to write it again"):
        export_model(world.kinds["model"], world.kinds["model"], overwrite=True)


def test_predict_masks_and_eval_take_every_kind(world, tmp_path):
    image = sorted((world.data / "images").glob("*.png"))[0]
    found = {}
    for kind in ("model", "checkpoint"):  # load_model reads the four (test above); predict, a checkpoint too
        _invoke("predict", world.kinds[kind], image, "--out", tmp_path / f"p-{kind}", "--min-probability", "0")
        found[kind] = json.loads((tmp_path / f"p-{kind}" / "predictions.json").read_text())["images"]
    assert found["model"][0]["ood_score"] is not None  # a model file keeps its training images' statistics
    assert found["checkpoint"][0]["ood_score"] is None  # a checkpoint does not: predict says so with null
    ood = ("ood_score", "out_of_distribution")
    for kind in found:
        assert [{k: v for k, v in r.items() if k not in ood} for r in found[kind]] == \
            [{k: v for k, v in r.items() if k not in ood} for r in found["checkpoint"]], kind
    masks = {}
    for kind in ("folder", "checkpoint"):
        _invoke("masks", world.data, "--checkpoint", world.kinds[kind], "--out", tmp_path / f"m-{kind}", "--cache",
                world.cache)
        masks[kind] = checkpoints.load(tmp_path / f"m-{kind}" / "masks.pt", checkpoints.MASKS)
    for kind in masks:
        assert torch.equal(masks[kind]["average"], masks["checkpoint"]["average"]), kind
        assert torch.equal(masks[kind]["masks"], masks["checkpoint"]["masks"]), kind
        assert masks[kind]["checkpoint"] == str(Classifier(world.kinds[kind], "cpu").path.resolve())
    assert masks["folder"]["anchor"].startswith("embedded in")  # the model file's own anchor, as the run's
    assert masks["checkpoint"]["anchor"] == str(world.align / "anchor.pt")

    out = tmp_path / "eval"  # one evaluation of the four: the same tables
    _invoke("eval", world.data, *[f for kind, path in world.kinds.items() for f in ("--checkpoint", f"{kind}={path}")],
            "--out", out, "--cache", world.cache, "--overlays", "0", "--bootstrap", "0")
    report = json.loads((out / "eval.json").read_text())
    assert report["selection"]["what"] == "the checkpoint's test split"
    tables = {name: {k: v for k, v in method.items() if k not in ("source", "seconds", "images_per_second")}
              for name, method in report["methods"].items()}
    assert set(tables) == set(world.kinds) and tables["checkpoint"]["auroc"] and tables["checkpoint"]["iou"]
    for kind in tables:
        assert tables[kind] == tables["checkpoint"], kind
        assert report["selection"]["overlap"][kind] == {"names": 0, "patients": 0, "unknown_because": None}
    assert report["methods"]["folder"]["source"] == str(world.run / "model.pt")


def test_eval_of_a_checkpoint_and_its_exported_model_file_match(world, tmp_path):
    exported = export_model(world.kinds["checkpoint"], tmp_path / "exported.pt")
    tables = {}
    for name, path in (("checkpoint", world.kinds["checkpoint"]), ("exported", exported)):
        _invoke("eval", world.data, "--checkpoint", f"m={path}", "--out", tmp_path / name, "--cache", world.cache,
                "--overlays", "0", "--bootstrap", "50", "--split", "all", "--allow-overlap")
        report = json.loads((tmp_path / name / "eval.json").read_text())
        tables[name] = {k: v for k, v in report["methods"]["m"].items()
                        if k not in ("source", "seconds", "images_per_second")}
        overlap = report["selection"]["overlap"]["m"]
        assert overlap["names"] > 0 and overlap["patients"] > 0 and overlap["unknown_because"] is None
        tables[name]["overlap"] = overlap
    assert tables["exported"] == tables["checkpoint"]


def test_train_init_and_align_perceptual_take_a_run_folder(world, tmp_path):
    output = _invoke("train", world.data, "--out", tmp_path / "t", "--cache", world.cache, "--init", world.run,
                     "--arch", "resnet18", "--cam-stride", "16", "--size", "64", "--epochs", "1", "--max-steps", "1",
                     "--batch", "8", "--split", "patients", "--val-fraction", "0.2")
    assert f"initialised from {world.kinds['model']}" in " ".join(output.split())
    assert checkpoints.load(tmp_path / "t" / "checkpoint.pt", checkpoints.CLASSIFIER)["config"]["init"] == \
        str(world.run.resolve())
    _invoke("align", world.data, "--out", tmp_path / "a", "--cache", world.cache, "--perceptual", world.run,
            "--size", "64", "--pool", "8", "--epochs", "1", "--max-steps", "1", "--input-size", "32",
            "--anchor-images", "20", "--batch", "8", "--split", "patients", "--val-fraction", "0.2")
    config = checkpoints.load(tmp_path / "a" / "alignment.pt", checkpoints.ALIGNMENT)["config"]
    assert config["perceptual"] == str(world.kinds["model"].resolve())  # the file it read


def test_a_model_file_reports_its_overlap_wherever_it_goes(world, tmp_path, monkeypatch):
    data = shutil.copytree(world.data, tmp_path / "a" / "data")  # the run's checkpoint, trained on this copy
    state = checkpoints.load(world.kinds["checkpoint"], checkpoints.CLASSIFIER)
    checkpoints.save(tmp_path / "a" / "run" / "checkpoint.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "data": str(data)}})
    export_model(tmp_path / "a" / "run" / "checkpoint.pt", tmp_path / "a" / "run" / "model.pt")
    travelled = tmp_path / "elsewhere" / "copy.pt"
    travelled.parent.mkdir()
    shutil.copy(tmp_path / "a" / "run" / "model.pt", travelled)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    def evaluate(data_dir, path, *extra) -> tuple:
        out = tmp_path / f"e{len(list(tmp_path.glob('e*')))}"
        result = CliRunner().invoke(main, ["eval", str(data_dir), "--checkpoint", f"m={path}", "--out", str(out),
                                           "--cache", str(tmp_path / f"cache-{data_dir.name}"), "--overlays", "0",
                                           "--bootstrap", "0", *extra])
        report = json.loads((out / "eval.json").read_text()) if result.exit_code == 0 else None
        return result, report

    result, here = evaluate(data, travelled, "--split", "all", "--allow-overlap")  # the data where it was
    overlap = here["selection"]["overlap"]["m"]
    assert overlap["names"] > 0 and overlap["patients"] > 0 and overlap["unknown_because"] is None
    assert f"{overlap['names']} of the 96 evaluation images share a name" in _said(result)
    assert f"{overlap['patients']} share a patient ID" in _said(result)

    moved = shutil.move(data, tmp_path / "moved")  # the training data is no longer where the run recorded it
    result, away = evaluate(Path(moved), travelled, "--split", "all", "--allow-overlap")
    assert away["selection"]["overlap"]["m"] == overlap  # patients from the model file
    result, report = evaluate(Path(moved), travelled)  # its images: the model's own test split, none shared
    assert report["selection"]["what"] == "the checkpoint's test split"
    assert report["selection"]["overlap"]["m"] == {"names": 0, "patients": 0, "unknown_because": None}
    result, report = evaluate(Path(moved), tmp_path / "a" / "run" / "checkpoint.pt")  # a checkpoint keeps no patients
    assert report["selection"]["overlap"]["m"]["patients"] is None
    assert "none of the" in _said(result) and "share a name" in _said(result) and "0 of the" not in _said(result)
    assert "an unknown number share a patient ID (not checked: its training data" in _said(result)
    result, _ = evaluate(Path(moved), tmp_path / "a" / "run" / "checkpoint.pt", "--strict")
    assert result.exit_code == 1 and "(--strict)" in result.output


def test_older_model_files_and_relative_checkpoints_still_read(world, tmp_path):
    payload = torch.load(world.kinds["model"], weights_only=True)
    older = {k: v for k, v in payload.items() if k not in ("format", "version", "config", "splits", "patients")}
    checkpoints.save(tmp_path / "older.pt", checkpoints.MODEL, older)
    classifier = Classifier(tmp_path / "older.pt", "cpu")
    assert classifier.config.data is None and not classifier.splits_known and classifier.config.size == 64
    dataset = open_dataset(world.data)
    overlap = training_overlap(classifier, dataset, dataset.images)
    assert overlap["names"] is None and overlap["patients"] is None and "written before" in overlap["unknown_because"]
    result = CliRunner().invoke(main, ["masks", str(world.data), "--checkpoint", str(tmp_path / "older.pt"), "--out",
                                       str(tmp_path / "m"), "--cache", str(world.cache)])
    assert result.exit_code == 1 and "without its run's splits" in result.output
    state = checkpoints.load(world.kinds["best"], checkpoints.CLASSIFIER)  # a run of an older dmfast: relative
    checkpoints.save(tmp_path / "relative.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "data": "phantom/data"}})
    classifier = Classifier(tmp_path / "relative.pt", "cpu")
    assert classifier.config.data == "phantom/data"
    warned = []
    again = torch.load(export_model(tmp_path / "relative.pt", tmp_path / "relative-model.pt", warn=warned.append),
                       weights_only=True)
    assert again["patients"] is None and again["splits"] == state["splits"]  # its data is not here: no patients
    assert len(warned) == 1 and "by name only" in warned[0] and "phantom/data" in warned[0]


def test_resume_needs_the_runs_checkpoint(world, tmp_path):
    (tmp_path / "copied").mkdir()
    shutil.copy(world.kinds["model"], tmp_path / "copied" / "model.pt")
    args = ["train", str(world.data), "--cache", str(world.cache), "--arch", "resnet18", "--size", "64",
            "--cam-stride", "16", "--epochs", "2", "--resume"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "copied")])
    assert result.exit_code == 1 and "holds model.pt but no checkpoint.pt" in result.output
    assert f"--init {tmp_path / 'copied' / 'model.pt'}" in result.output and "Traceback" not in result.output
    (tmp_path / "renamed").mkdir()
    shutil.copy(world.kinds["model"], tmp_path / "renamed" / "checkpoint.pt")
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "renamed")])
    assert result.exit_code == 1 and "checkpoint.pt is a model file" in result.output and "--init" in result.output
    assert not (tmp_path / "renamed" / "metrics.jsonl").exists()
