"""The readers of the public releases (dmfast.data.formats), each against a miniature copy of its real layout
(tests/releases.py, and the real label files' excerpts in ../shared/data/release-formats), and the readers against
each other: the same phantom images through two releases' files train and score the same."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dmfast.cli.main import main
from dmfast.data.dataset import FINDINGS, UNKNOWN, DataError, LabelPolicy, fuse_readers
from dmfast.data.formats import detect_format, open_dataset
from dmfast.phantom import synthesize
from dmfast.testing import shared_data, write_dicom

from . import releases

FORMATS_DIR = shared_data("release-formats")
needs_formats = pytest.mark.skipif(not FORMATS_DIR.is_dir(), reason=f"{FORMATS_DIR} is absent (the real excerpts)")
ONE_TO_ONE = [f for f in releases.VINDR_BOXED if f not in ("Nodule", "Mass")]  # VinDr's own name for each


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("phantom") / "nih", count=40, size=64, seed=3)


def _by_image(dataset) -> dict:
    return {r.image: r for r in dataset.records}


def test_each_layout_is_detected_and_a_folder_of_none_is_named(phantom, tmp_path):
    made = {"chestxray14": phantom, "vindr": releases.vindr(phantom, tmp_path / "vindr"),
            "rsna": releases.rsna(phantom, tmp_path / "rsna"), "chexpert": releases.chexpert(phantom, tmp_path / "cx"),
            "mimic": releases.mimic(phantom, tmp_path / "mimic"), "csv": releases.generic(phantom, tmp_path / "csv")}
    for format, folder in made.items():
        assert detect_format(folder) == format
        assert open_dataset(folder).format == format
    with pytest.raises(DataError, match="not a folder of a known release"):
        detect_format(tmp_path)
    shutil.copy(made["csv"] / "labels.csv", phantom.parent / "labels.csv")
    (phantom.parent / "Data_Entry_2017.csv").symlink_to(phantom / "Data_Entry_2017.csv")
    with pytest.raises(DataError, match="several releases .chestxray14, csv.; give --format"):
        detect_format(phantom.parent)
    (phantom.parent / "labels.csv").unlink()
    (phantom.parent / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match="no labels.csv"):
        open_dataset(phantom, "csv")


def test_vindr_records_labels_boxes_readers_and_splits(phantom, tmp_path):
    nih = open_dataset(phantom)
    vindr = open_dataset(releases.vindr(phantom, tmp_path / "vindr", readers=("R8", "R9")))
    assert vindr.format == "vindr" and vindr.box_space == "image" and not vindr.problems
    header = (tmp_path / "vindr" / "annotations" / "annotations_test.csv").read_text().splitlines()[0]
    assert header == "image_id,class_name,x_min,y_min,x_max,y_max"  # the test set's consensus: no reader
    ids = {releases.image_id(n): n for n in nih.images}
    assert {ids[i] for i in vindr.train_val} == nih.train_val and {ids[i] for i in vindr.test} == nih.test
    assert all(vindr.paths[i].suffix == ".dicom" and vindr.paths[i].parent.name in ("train", "test")
               for i in vindr.images)
    records, hernia = _by_image(nih), FINDINGS.index("Hernia")
    for record in vindr.records:
        own = records[ids[record.image]]
        assert record.labels[hernia] == UNKNOWN and record.patient == record.image
        for f in range(len(FINDINGS)):
            if FINDINGS[f] in ("Nodule", "Mass"):  # one class in VinDr-CXR: either makes both
                assert record.labels[f] == int(own.labels[[4, 5]].any())
            elif f != hernia:
                assert record.labels[f] == own.labels[f]
    # Boxes in image pixels, each reader's kept apart: two of every train box of the one-to-one findings.
    theirs = nih.boxes_xyxy()
    for image, boxes in vindr.boxes_xyxy().items():
        mine = sorted(b for b in boxes if FINDINGS[b[0]] in ONE_TO_ONE)
        want = sorted(b for b in theirs[ids[image]] if FINDINGS[b[0]] in ONE_TO_ONE)
        step = 2 if image in vindr.train_val else 1
        np.testing.assert_allclose(np.array(mine)[::step], np.array(want), rtol=0, atol=1e-9)
    assert {b.reader for b in vindr.boxes} == {"R8", "R9", ""}
    fused = fuse_readers(vindr.boxes)
    train = [b for b in vindr.boxes if b.image in vindr.train_val]
    assert len(fused) == len(train) // 2 + len(vindr.boxes) - len(train)
    assert {b.reader for b in fused} == {"R8+R9", ""}
    healthy = [r for r in vindr.records if r.healthy]
    assert healthy and all(not records[ids[r.image]].labels.any() for r in healthy)


def test_vindr_fusion_keeps_disagreeing_readers_apart():
    from dmfast.data.dataset import Box

    boxes = [Box("a", 1, (10, 10, 100, 100), "R1"), Box("a", 1, (20, 10, 100, 100), "R2"),
             Box("a", 1, (500, 500, 50, 50), "R3"), Box("a", 2, (10, 10, 100, 100), "R3")]
    fused = sorted(fuse_readers(boxes), key=lambda b: (b.finding, b.xywh))
    assert [(b.finding, b.reader) for b in fused] == [(1, "R1+R2"), (1, "R3"), (2, "R3")]
    assert fused[0].xywh == pytest.approx((15, 10, 100, 100))


@needs_formats
def test_vindr_real_annotations_excerpt_in_kaggles_layout(tmp_path):
    """The excerpt of Kaggle's copy (its train.csv, with class_id): every image_id gets a small DICOM in train/; no
    image labels file, so the labels come from the boxes and the findings Kaggle's 14 local classes do not cover
    (Pneumonia, Edema, Emphysema, Hernia) are unknown."""
    source = FORMATS_DIR / "vindr-cxr_annotations_train.excerpt.csv"
    shutil.copy(source, tmp_path / "train.csv")
    rows = [line.split(",") for line in source.read_text().splitlines()[1:]]
    for image in {r[0] for r in rows}:
        write_dicom(tmp_path / "train" / f"{image}.dicom", np.full((2400, 2400), 90, np.uint8)[::8, ::8])
    dataset = open_dataset(tmp_path)
    assert dataset.format == "vindr" and len(dataset.images) == len({r[0] for r in rows}) and not dataset.problems
    notes = dataset.problems.report(notes=True)
    assert "outside the 14" in notes and "Aortic enlargement (79 rows)" in notes
    mapped = [r for r in rows if r[1] in ("Atelectasis", "Cardiomegaly", "Consolidation", "Infiltration",
                                          "Pleural effusion", "Pleural thickening", "Pulmonary fibrosis")]
    nodules = [r for r in rows if r[1] == "Nodule/Mass"]
    assert len(dataset.boxes) == len(mapped) + 2 * len(nodules)
    first = next(b for b in dataset.boxes if b.reader == "R9")
    assert first.xywh == (1540.0, 818.0, 98.0, 69.0) and FINDINGS[first.finding] == "Fibrosis"
    labels = dataset.labels()
    for unknown in ("Pneumonia", "Edema", "Emphysema", "Hernia"):
        assert (labels[:, FINDINGS.index(unknown)] == UNKNOWN).all()
    healthy = {r[0] for r in rows if r[1] == "No finding"} - {r[0] for r in rows if r[1] != "No finding"}
    assert healthy and all((_by_image(dataset)[i].labels[labels[0] != UNKNOWN] == 0).all() for i in healthy)
    assert dataset.train_val == set(dataset.images) and not dataset.test


def test_vindr_unknown_findings_and_columns_and_unreadable_dicoms_are_reported(phantom, tmp_path):
    folder = releases.vindr(phantom, tmp_path / "vindr")
    path = folder / "annotations" / "annotations_train.csv"
    lines = path.read_text().splitlines()
    lines.append(",".join(["Lung nodule" if i == 2 else v for i, v in enumerate(lines[1].split(","))]))
    path.write_text("\n".join(lines) + "\n")
    labels = folder / "annotations" / "image_labels_train.csv"
    labels.write_text(labels.read_text().replace("No finding", "No finding,Hernia", 1).replace("\n", ",0\n")
                      .replace(",Hernia,0\n", ",Hernia\n", 1))
    with pytest.raises(DataError) as error:
        open_dataset(folder)
    assert "1 unknown findings: annotations_train.csv" in str(error.value) and "'Lung nodule'" in str(error.value)
    assert "1 unknown columns: image_labels_train.csv: 'Hernia'" in str(error.value)
    boxed = next(line.split(",")[0] for line in lines[1:] if line.split(",")[3])
    broken = folder / "train" / f"{boxed}.dicom"  # an image with boxes: eval reads its header for them
    broken.write_bytes(b"DICM? no: " + broken.read_bytes()[:300])
    result = CliRunner().invoke(main, ["prepare", str(folder), "--size", "32", "--skip-problems", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "images that could not be decoded" in result.output and broken.name in result.output.replace("\n", "")
    assert "unknown findings" in result.output
    checkpoint = _train(phantom, tmp_path / "run")
    result = CliRunner().invoke(main, ["eval", str(folder), "--checkpoint", f"m={checkpoint}", "--out",
                                       str(tmp_path / "e"), "--split", "all", "--skip-problems", "--overlays", "0",
                                       "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert "images whose size cannot be read" in result.output and boxed in "".join(result.output.split())


@needs_formats
def test_rsna_real_labels_excerpt(tmp_path):
    source = FORMATS_DIR / "rsna-pneumonia_stage_2_train_labels.excerpt.csv"
    lines = source.read_text().splitlines()
    ids = list(dict.fromkeys(line.split(",")[0] for line in lines[1:]))[:12]
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",")[0] in ids]
    (tmp_path / "stage_2_train_labels.csv").write_text("\n".join(kept) + "\n")
    for image in ids:
        write_dicom(tmp_path / "stage_2_train_images" / f"{image}.dcm", np.zeros((16, 16), np.uint8))
    dataset = open_dataset(tmp_path)
    assert dataset.format == "rsna" and dataset.images == ids and dataset.box_space == "image"
    pneumonia = FINDINGS.index("Pneumonia")
    rows = [line.split(",") for line in kept[1:]]
    for record in dataset.records:
        assert record.labels[pneumonia] == int(next(r[5] for r in rows if r[0] == record.image))
        assert (np.delete(record.labels, pneumonia) == UNKNOWN).all() and record.patient == record.image
    want = [(r[0], tuple(map(float, r[1:5]))) for r in rows if r[5] == "1"]
    assert [(b.image, b.xywh) for b in dataset.boxes] == want and {b.finding for b in dataset.boxes} == {pneumonia}
    assert dataset.train_val == set(ids) and not dataset.test  # the challenge's test images have no labels
    with (tmp_path / "stage_2_train_labels.csv").open("a") as f:
        f.write(f"{ids[0]},,,,,{1 - int(rows[0][5])}\n")
    write_dicom(tmp_path / "stage_2_train_images" / "unlisted.dcm", np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path)
    assert "contradictory rows" in str(error.value) and "not listed in stage_2_train_labels.csv: unlisted" in \
        str(error.value)


@needs_formats
@pytest.mark.parametrize("uncertain,blank", [("ignore", "unknown"), ("positive", "unknown"), ("negative", "negative")])
def test_chexpert_real_train_excerpt_with_each_policy(tmp_path, uncertain, blank):
    source = FORMATS_DIR / "chexpert_train.excerpt.csv"
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    shutil.copy(source, folder / "train.csv")
    rows = [line.split(",") for line in source.read_text().splitlines()[1:]]
    for row in rows:
        if row[3] == "Frontal":
            path = tmp_path / row[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.new("L", (20, 24), 100).save(path)
    dataset = open_dataset(tmp_path, policy=LabelPolicy(uncertain, blank))
    assert dataset.format == "chexpert" and len(dataset.images) == sum(r[3] == "Frontal" for r in rows)
    assert "lateral views" in dataset.problems.report(notes=True) and not dataset.problems
    header = source.read_text().splitlines()[0].split(",")
    value = {"1.0": 1, "0.0": 0, "-1.0": {"ignore": UNKNOWN, "positive": 1, "negative": 0}[uncertain],
             "": UNKNOWN if blank == "unknown" else 0}
    for row in (r for r in rows if r[3] == "Frontal"):
        record = _by_image(dataset)[row[0].split("/", 1)[1]]
        assert record.patient == row[0].split("/")[2]
        nothing = row[header.index("No Finding")] == "1.0"
        for name, finding in (("Atelectasis", "Atelectasis"), ("Pleural Effusion", "Effusion"), ("Edema", "Edema"),
                              ("Pneumonia", "Pneumonia"), ("Cardiomegaly", "Cardiomegaly")):
            cell = row[header.index(name)]
            want = 0 if nothing and not cell else value[cell]  # No Finding: a blank is absent, a -1 follows policy
            assert record.labels[FINDINGS.index(finding)] == want, (row[0], name, cell)
        for finding in ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"):
            assert record.labels[FINDINGS.index(finding)] == UNKNOWN
    assert dataset.train_val == set(dataset.images) and not dataset.test and not dataset.boxes
    (folder / "train.csv").write_text(source.read_text().replace("Support Devices", "Support Devices,Hernia", 1))
    with pytest.raises(DataError, match="unknown columns: train.csv: 'Hernia'"):
        open_dataset(tmp_path)


def test_chexpert_and_mimic_layouts_of_the_phantom(phantom, tmp_path):
    nih = open_dataset(phantom)
    doubt = {nih.images[0]: ("Edema",), nih.images[1]: ("Cardiomegaly", "Effusion")}
    cx = open_dataset(releases.chexpert(phantom, tmp_path / "cx", uncertain=doubt))
    mimic = open_dataset(releases.mimic(phantom, tmp_path / "mimic", uncertain=doubt))
    assert len(cx.train_val) == len(nih.train_val) and len(cx.test) == len(nih.test)
    assert len(mimic.test) == len(nih.test) and len(mimic.train_val) == len(nih.train_val)
    assert "views other than PA or AP" in mimic.problems.report(notes=True)
    by_name = _by_image(nih)
    written = {"cx": [n for n in nih.images if n in nih.train_val] + [n for n in nih.images if n in nih.test],
               "mimic": nih.images}  # the order each writer lists them in
    for dataset, order in ((cx, written["cx"]), (mimic, written["mimic"])):
        assert len(dataset.records) == len(order)
        for mine, theirs in zip(dataset.records, (by_name[n] for n in order)):
            for f, finding in enumerate(FINDINGS):
                mapped = finding in ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax",
                                     "Consolidation", "Edema")
                doubted = finding in doubt.get(theirs.image, ())
                assert mine.labels[f] == (theirs.labels[f] if mapped and not doubted else UNKNOWN)
    assert {r.patient for r in mimic.records} == {str(10000000 + r.patient) for r in nih.records}


def test_generic_csv_layout_and_its_problems(phantom, tmp_path):
    nih = open_dataset(phantom)
    folder = releases.generic(phantom, tmp_path / "csv")
    dataset = open_dataset(folder)
    assert [r.labels.tolist() for r in dataset.records] == [r.labels.tolist() for r in nih.records]
    assert dataset.train_val == {f"images/{n}" for n in nih.train_val} and len(dataset.test) == len(nih.test)
    mine, theirs = dataset.boxes_xyxy(), nih.boxes_xyxy()
    assert len(mine) == len(theirs)
    for name, boxes in theirs.items():
        np.testing.assert_allclose(np.array(mine[f"images/{name}"]), np.array(boxes), rtol=0, atol=1e-9)
    (folder / "labels.csv").write_text((folder / "labels.csv").read_text().replace("Hernia", "Hernia,Tumour", 1))
    (folder / "boxes.csv").write_text((folder / "boxes.csv").read_text() + "images/nope.png,Mass,1,1,5,5\n")
    with pytest.raises(DataError) as error:
        open_dataset(folder)
    assert "unknown columns: labels.csv: 'Tumour'" in str(error.value)
    assert "boxes of images missing or not in labels.csv: images/nope.png" in str(error.value)


def _train(data, out, **settings):
    from dmfast import train
    from dmfast.config import TrainConfig

    base = {"arch": "resnet18", "size": 64, "batch": 8, "epochs": 1, "max_steps": 2, "cam_stride": 16}
    return train.run(TrainConfig(data=str(data), out=str(out), **{**base, **settings}))


def _eval(data, checkpoint, out, *extra):
    result = CliRunner().invoke(main, ["eval", str(data), "--checkpoint", f"m={checkpoint}", "--out", str(out),
                                       "--overlays", "0", "--bootstrap", "0", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text())["methods"]["m"]


def test_cross_dataset_eval_gives_identical_numbers_for_the_shared_classes(phantom, tmp_path):
    """A model trained on the ChestX-ray14-format phantom scores the same on its images re-packaged as VinDr-CXR
    (DICOMs, image-pixel boxes) and as RSNA Pneumonia, for the classes the releases share (all 40 images: the
    test split alone has too few boxes of some classes)."""
    nih = open_dataset(phantom)
    checkpoint = _train(phantom, tmp_path / "run")
    own = _eval(phantom, checkpoint, tmp_path / "e-nih", "--split", "all", "--allow-overlap")
    vindr = _eval(releases.vindr(phantom, tmp_path / "vindr", readers=("R8", "R9")), checkpoint, tmp_path / "e-vindr",
                  "--split", "all", "--fuse-readers")  # two readers' boxes fused into one
    rsna = _eval(releases.rsna(phantom, tmp_path / "rsna"), checkpoint, tmp_path / "e-rsna", "--split", "all")
    assert own["images"] == vindr["images"] == rsna["images"] == len(nih.images)
    for metric in ("iou", "iobb"):
        for name in ONE_TO_ONE:
            assert vindr[metric]["accuracy"][name] == own[metric]["accuracy"][name], (metric, name)
            assert vindr[metric]["afp"][name] == own[metric]["afp"][name], (metric, name)
        assert rsna[metric]["accuracy"]["Pneumonia"] == own[metric]["accuracy"]["Pneumonia"]
        assert rsna[metric]["afp"]["Pneumonia"] == own[metric]["afp"]["Pneumonia"]
        assert all(v is None for k, values in rsna[metric]["accuracy"].items() if k != "Pneumonia" for v in values)
    scored = [n for n in [*ONE_TO_ONE, "Pneumonia"] if own["iou"]["accuracy"][n][0] is not None]
    assert len(scored) >= 8 and "Pneumonia" in scored  # there were boxes to score
    assert 0 < sum(own["iou"]["accuracy"][n][0] for n in scored)  # and some were found
    for name in [*ONE_TO_ONE, "Pneumonia"]:  # the labels the releases give are the same, so is each AUROC
        assert vindr["auroc"][name] == pytest.approx(own["auroc"][name], abs=1e-12)
    assert rsna["auroc"]["Pneumonia"] == pytest.approx(own["auroc"]["Pneumonia"], abs=1e-12)
    assert vindr["auroc"]["Hernia"] is None and rsna["auroc"]["Edema"] is None  # unknown there: not scored


def test_mixed_training_masks_the_unknown_labels_out_of_the_loss(phantom, tmp_path, monkeypatch):
    from dmfast import training

    nih = open_dataset(phantom)
    doubt = {n: ("Edema",) for n in nih.images[:6]}
    cx = releases.chexpert(phantom, tmp_path / "cx", uncertain=doubt)
    seen = []
    original = training.weighted_bce
    monkeypatch.setattr(training, "weighted_bce", lambda logits, targets, counts=None: seen.append(
        (logits.detach().clone(), targets.clone())) or original(logits, targets, counts))
    checkpoint = _train(phantom, tmp_path / "run", mix=[str(cx)], split="patients", val_fraction=0.2, max_steps=6)
    from dmfast import checkpoints

    state = checkpoints.load(checkpoint, checkpoints.CLASSIFIER)
    mixed = [n for n in state["splits"]["train"] if n.startswith("mix1:")]
    assert len(mixed) == len(open_dataset(cx).train_val) and state["config"]["mix"] == [str(cx)]
    targets = np.concatenate([t.numpy() for _, t in seen])
    assert (targets == UNKNOWN).any() and ((targets == 0) | (targets == 1) | (targets == UNKNOWN)).all()
    unknown_rows = (targets == UNKNOWN).any(1)
    assert unknown_rows.any() and (~unknown_rows).any()  # CheXpert images and ChestX-ray14 images in the batches
    result = CliRunner().invoke(main, ["eval", str(cx), "--checkpoint", f"m={checkpoint}", "--out",
                                       str(tmp_path / "e"), "--overlays", "0", "--split", "all"])
    assert result.exit_code == 1 and "share a name" in result.output  # its mixed-in images are training images
    for logits, batch in seen:  # each batch's loss is the loss of its known entries alone
        moved = logits.clone()
        moved[batch == UNKNOWN] += 100.0
        assert original(moved, batch).item() == pytest.approx(original(logits, batch).item(), rel=1e-6)


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("release", ["vindr", "rsna", "chexpert", "mimic", "generic"])
def test_every_stage_runs_on_every_release(phantom, tmp_path, release):
    """prepare, align, train, masks, eval and predict on each layout (of the phantom's images), through the CLI."""
    folder = getattr(releases, release)(phantom, tmp_path / release)
    dataset = open_dataset(folder)
    _cli("prepare", folder, "--size", 64, "--workers", 1)
    output = _cli("align", folder, "--out", tmp_path / "align", "--size", 64, "--pool", 8, "--epochs", 1,
                  "--batch", 4, "--max-steps", 1, "--input-size", 64, "--anchor-images", 8)
    assert "anchor: mean of 8 No Finding training images" in output  # the images the release calls normal
    _cli("train", folder, "--out", tmp_path / "run", "--arch", "resnet18", "--size", 64, "--batch", 8, "--epochs", 1,
         "--max-steps", 1, "--cam-stride", 16)
    _cli("masks", folder, "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--out", tmp_path / "masks")
    masks = json.loads((tmp_path / "masks" / "masks.json").read_text())
    labelled = {FINDINGS[f] for f in range(14) if (dataset.labels()[:, f] == 1).any()}
    assert {c for c, n in masks["counts"].items() if n} <= labelled  # no mask from unknown labels
    _cli("eval", folder, "--checkpoint", f"m={tmp_path / 'run' / 'checkpoint.pt'}", "--out", tmp_path / "eval",
         "--split", "all", "--allow-overlap", "--overlays", "0", "--bootstrap", "10")
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["test_images"] == len(dataset.images) and report["gt_boxes"] == len(dataset.boxes)
    _cli("predict", tmp_path / "run" / "model.pt", folder, "--out", tmp_path / "predict", "--format", "auto")
    predicted = [line.split(",")[0] for line in (tmp_path / "predict" / "predictions.csv").read_text().splitlines()[1:]]
    assert sorted(predicted) == sorted(str(dataset.paths[n]) for n in dataset.images)  # the listed images only


def test_predict_reads_the_releases_dicoms_as_the_cache_does(phantom, tmp_path):
    """The same pixels as DICOM (VinDr-CXR) and as PNG give the same probabilities through predict."""
    import dmfast

    nih = open_dataset(phantom)
    vindr = open_dataset(releases.vindr(phantom, tmp_path / "vindr"))
    model = dmfast.load_model(_train(phantom, tmp_path / "run").parent / "model.pt")
    names = nih.images[:6]
    png = model.predict([nih.paths[n] for n in names], min_probability=0)
    dicom = model.predict([vindr.paths[releases.image_id(n)] for n in names], min_probability=0)
    for a, b in zip(png, dicom):
        assert a.probabilities == b.probabilities


def test_bad_release_inputs_get_named_errors(phantom, tmp_path):
    from tests.test_bad_inputs import expect

    run = ["--out", tmp_path / "run", "--arch", "resnet18", "--size", 64, "--batch", 8, "--epochs", 1, "--max-steps",
           1, "--cam-stride", 16]
    for format, fragment in (("vindr", "no VinDr-CXR images found"), ("rsna", "no stage_2_train_labels.csv"),
                             ("chexpert", "no CheXpert train.csv"), ("mimic", "MIMIC-CXR-JPG needs"),
                             ("csv", "no labels.csv")):
        expect(["prepare", phantom, "--format", format], fragment)  # the wrong --format for the folder
    expect(["train", tmp_path, *run], "not a folder of a known release")
    expect(["train", phantom, "--format", "dicom", *run], "Invalid value for '--format'", code=2)
    expect(["train", phantom, "--mix", tmp_path, *run], f"{tmp_path}: not a folder of a known release")
    expect(["train", phantom, "--uncertain", "maybe", *run], "Invalid value for '--uncertain'", code=2)
    expect(["eval", releases.rsna(phantom, tmp_path / "rsna"), "--checkpoint", f"m={tmp_path}/none.pt",
            "--out", tmp_path / "e", "--box-space", "release"], "none.pt", code=2)
    cx = releases.chexpert(phantom, tmp_path / "cx")
    (cx / "CheXpert-v1.0-small" / "train.csv").write_text(
        (cx / "CheXpert-v1.0-small" / "train.csv").read_text().replace(",1.0,", ",yes,", 1))
    expect(["train", phantom, "--mix", cx, *run], "problems found", "label 'yes' is not 1, 0, -1 or blank")
    output = expect(["train", phantom, "--mix", cx, "--skip-problems", *run], code=0)  # the row is left out
    assert f"left out of {cx}" in output.replace("\n", "") and "train.csv:2" in output
    expect(["train", phantom, "--resume", "--mix", releases.generic(phantom, tmp_path / "csv"), *run[:2]],
           "was trained with mix")


def test_generic_csv_takes_release_spellings_and_suggests_a_close_name(phantom, tmp_path):
    from dmfast.data.formats import open_dataset

    folder = releases.generic(phantom, tmp_path / "csv")
    labels = (folder / "labels.csv").read_text()
    (folder / "labels.csv").write_text(labels.replace("Infiltration", "Infiltrate", 1).replace("Effusion",
                                                                                            "pleural effusion", 1))
    boxes = (folder / "boxes.csv").read_text().splitlines()
    row = boxes[1].split(",")
    (folder / "boxes.csv").write_text("\n".join(boxes + [",".join([row[0], "Infiltrate", *row[2:]]),
                                                        ",".join([row[0], "Cardiomegally", *row[2:]])]) + "\n")
    with pytest.raises(DataError) as error:
        open_dataset(folder)
    assert "did you mean 'Cardiomegaly'?" in str(error.value) and "Infiltrate" not in str(error.value)
    dataset = open_dataset(folder, skip_problems=True)
    original = open_dataset(releases.generic(phantom, tmp_path / "again"))
    assert [r.labels.tolist() for r in dataset.records] == [r.labels.tolist() for r in original.records]
    assert len(dataset.boxes) == len(original.boxes) + 1  # the Infiltrate box read as Infiltration


def _header_only(path: Path) -> None:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        header = f.readline()
    with opener(path, "wt") as f:
        f.write(header)


@pytest.mark.parametrize("release, listing", [
    ("vindr", "annotations/*.csv"), ("rsna", "stage_2_train_labels.csv"), ("chexpert", "*/*.csv"),
    ("mimic", "*chexpert.csv.gz"), ("generic", "labels.csv")])
def test_a_label_file_with_a_header_only_lists_no_images(phantom, tmp_path, release, listing):
    from tests.test_bad_inputs import expect

    folder = getattr(releases, release)(phantom, tmp_path / release)
    files = sorted(folder.glob(listing))
    assert files
    for path in files:  # the boxes files (generic's boxes.csv, VinDr's boxes) keep their rows
        _header_only(path)
    expect(["prepare", folder, "--cache", tmp_path / "cache", "--size", 64], "lists no images (a header only)")


def test_box_space_release_is_refused_for_releases_that_draw_on_their_images(phantom, tmp_path):
    with pytest.raises(ValueError, match="box space 'release' is ChestX-ray14's"):
        open_dataset(releases.rsna(phantom, tmp_path / "rsna"), box_space="release")


def test_generic_csv_label_cells_follow_the_policies(tmp_path):
    from PIL import Image

    (tmp_path / "x").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (16, 16), 50).save(tmp_path / "x" / name)
    (tmp_path / "labels.csv").write_text("image,Edema,Mass,Hernia\nx/a.png,1,-1,\nx/b.png,0.0,,-1.0\n")
    edema, mass, hernia = (FINDINGS.index(f) for f in ("Edema", "Mass", "Hernia"))
    for uncertain, blank, want_a, want_b in (("ignore", "unknown", (1, -1, -1), (0, -1, -1)),
                                             ("positive", "negative", (1, 1, 0), (0, 0, 1))):
        dataset = open_dataset(tmp_path, policy=LabelPolicy(uncertain, blank))
        for record, want in zip(dataset.records, (want_a, want_b)):
            assert tuple(record.labels[[edema, mass, hernia]]) == want
            assert (np.delete(record.labels, [edema, mass, hernia]) == UNKNOWN).all()  # no column: unknown
    (tmp_path / "labels.csv").write_text("image,Edema\nx/a.png,2\n")
    with pytest.raises(DataError, match="label '2' is not 1, 0, -1 or blank"):
        open_dataset(tmp_path)


def test_vindr_malformed_cell_is_unknown_not_negative(phantom, tmp_path):
    folder = releases.vindr(phantom, tmp_path / "vindr")
    path = folder / "annotations" / "image_labels_test.csv"
    lines = path.read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("Atelectasis")] = "maybe"
    path.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    dataset = open_dataset(folder, skip_problems=True)
    assert "Atelectasis = 'maybe'" in dataset.problems.report()
    record = _by_image(dataset)[first[0]]
    assert record.labels[FINDINGS.index("Atelectasis")] == UNKNOWN


def test_mimic_studies_without_labels_and_a_missing_metadata_file(phantom, tmp_path):
    nih = open_dataset(phantom)
    folder = releases.mimic(phantom, tmp_path / "mimic", unlabelled=nih.images[:2])
    with pytest.raises(DataError, match="2 images whose study has no row in mimic-cxr-2.0.0-chexpert.csv.gz"):
        open_dataset(folder)
    assert len(open_dataset(folder, skip_problems=True).images) == len(nih.images) - 2
    (folder / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    dataset = open_dataset(folder, skip_problems=True)
    assert "views unknown, every image read" in dataset.problems.report(notes=True)


def test_rsna_images_are_chestxray14_images_and_overlap_is_found_with_the_mapping(phantom, tmp_path):
    from tests.test_bad_inputs import expect

    checkpoint = _train(phantom, tmp_path / "run")
    plain = releases.rsna(phantom, tmp_path / "rsna")
    args = ["--checkpoint", f"m={checkpoint}", "--split", "all", "--overlays", "0", "--bootstrap", "0"]
    output = expect(["eval", plain, *args, "--out", tmp_path / "e1"], code=0)
    assert "RSNA Pneumonia's images are ChestX-ray14 images under new names" in " ".join(output.split())
    expect(["eval", plain, *args, "--out", tmp_path / "e2", "--strict"], "(--strict)")
    mapped = releases.rsna(phantom, tmp_path / "rsna-mapped", mapping=True)
    dataset = open_dataset(mapped)
    assert all(r.same_as and r.patient == int(r.same_as.split("_")[0]) for r in dataset.records)
    output = expect(["eval", mapped, *args, "--out", tmp_path / "e3"], "share a name", "--allow-overlap")
    trained = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert f"{len(trained['train']) + len(trained['val'])} of the 40 evaluation images share a name" in output
    output = expect(["train", phantom, "--mix", mapped, "--out", tmp_path / "mixed", "--arch", "resnet18", "--size",
                     64, "--batch", 8, "--epochs", 1, "--max-steps", 1, "--cam-stride", 16], code=0)
    assert "mixed images left out: their patients are in the validation or test split" in " ".join(output.split())
