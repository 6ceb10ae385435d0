"""dmfast predict and dmfast.load_model on files the tests make: PNG (8/16-bit, RGB, RGBA, palette), JPEG, DICOM
(MONOCHROME1/2, rescale, windows, VOI LUT), non-square images, broken files; the README's example."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import dmfast
from dmfast import train
from dmfast.cli.main import main
from dmfast.errors import DataError, ModelFileError
from dmfast.config import TrainConfig
from dmfast.data.dataset import FINDINGS
from dmfast.data.dicom import DicomError, read_dicom, window
from dmfast.data.images import ImageError, list_xrays, load_gray
from dmfast.predict import output_names
from dmfast.testing import cuda_available, phantom_with_cache, write_dicom

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained ResNet-18 on a 64 px phantom (its run folder) and a phantom X-ray."""
    folder = tmp_path_factory.mktemp("predict")
    data, cache = phantom_with_cache(folder / "phantom", count=96, size=64, seed=3)
    checkpoint = train.run(TrainConfig(data=str(data), out=str(folder / "run"), cache=str(cache), arch="resnet18",
                                       size=64, batch=8, epochs=1, max_steps=2, lr=1e-3, split="patients",
                                       val_fraction=0.2))
    xray = load_gray(sorted((data / "images").glob("*.png"))[0])
    return checkpoint.parent, xray


def _rows(path) -> dict:
    with open(path, newline="") as f:
        return {Path(row["path"]).name: row for row in csv.DictReader(f)}


def _probabilities(row) -> np.ndarray:
    return np.array([float(row[c]) for c in FINDINGS])


def test_predict_on_a_folder_of_every_format(run, tmp_path):
    folder, xray = run
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(xray).save(inputs / "plain.png")
    Image.fromarray(xray.astype(np.uint16) * 257).save(inputs / "deep.png")  # 16-bit, full range
    Image.fromarray(np.stack([xray] * 3, -1)).save(inputs / "rgb.png")
    Image.fromarray(np.stack([xray] * 3 + [np.full_like(xray, 200)], -1)).save(inputs / "rgba.png")
    Image.fromarray(xray).convert("P").save(inputs / "palette.png")
    Image.fromarray(xray).save(inputs / "photo.JPG", quality=95)
    wide = xray[8:56]  # 64 wide, 48 high: padded back to the square it came from
    square = np.zeros_like(xray)
    square[8:56] = wide
    Image.fromarray(wide).save(inputs / "wide.png")
    Image.fromarray(square).save(inputs / "square.png")
    big = np.kron(square, np.ones((2, 2), np.uint8))  # twice the model's size: padded, then resized
    Image.fromarray(big[16:112]).save(inputs / "wide2x.png")
    Image.fromarray(big).save(inputs / "square2x.png")
    # The same pixels as DICOM: 16-bit stored 4p + 1000, rescaled to 2p, windowed back to p / 255 ...
    write_dicom(inputs / "mono2.dcm", xray.astype(np.uint16) * 4 + 1000, RescaleSlope=0.5, RescaleIntercept=-500,
                WindowCenter=255.5, WindowWidth=511)
    # ... and 8-bit inverted (MONOCHROME1) with a window of unit slope, in a subfolder, without an extension.
    write_dicom(inputs / "sub" / "mono1", 255 - xray, "MONOCHROME1", WindowCenter=128, WindowWidth=256)
    (inputs / "sub" / "truncated.png").write_bytes((inputs / "plain.png").read_bytes()[:200])
    (inputs / "sub" / "notes.dcm").write_text("not an image\n")
    (inputs / "sub" / "labels.csv").write_text("a,b\n")  # left out: not an X-ray format
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(folder), str(inputs), "--out", str(out), "--min-probability",
                                       "0", "--max-boxes", "2", "--cams", "--overlays"])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "predictions.csv")
    assert sorted(rows) == sorted(["plain.png", "deep.png", "rgb.png", "rgba.png", "palette.png", "photo.JPG",
                                   "wide.png", "square.png", "wide2x.png", "square2x.png", "mono2.dcm", "mono1"])
    assert {name: (int(r["width"]), int(r["height"])) for name, r in rows.items()}["wide.png"] == (64, 48)
    plain = _probabilities(rows["plain.png"])
    for same in ("deep.png", "rgb.png", "rgba.png", "mono2.dcm", "mono1"):  # the same pixels in another file format
        np.testing.assert_allclose(_probabilities(rows[same]), plain, atol=1e-4, err_msg=same)
    problems = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(open(out / "problems.csv"))}
    assert set(problems) == {"truncated.png", "notes.dcm", "labels.csv"}
    assert "truncated" in problems["truncated.png"] and "not a DICOM file" in problems["notes.dcm"]
    assert problems["labels.csv"] == "not a PNG, JPEG or DICOM file" and "3 files left out" in result.output

    report = json.loads((out / "predictions.json").read_text())
    assert report["box_thresholds"] == [0.5] and report["max_boxes"] == 2 and report["min_probability"] == 0
    images = {Path(i["path"]).name: i for i in report["images"]}
    assert set(images["plain.png"]["findings"]) == set(FINDINGS)  # every class reaches probability 0
    for wide, square, pad in (("wide.png", "square.png", 8), ("wide2x.png", "square2x.png", 16)):
        for name, finding in images[square]["findings"].items():  # the wide image's boxes: moved up, clipped
            height = images[wide]["height"]
            want = [[x0, min(max(y0 - pad, 0), height), x1, min(max(y1 - pad, 0), height)]
                    for x0, y0, x1, y1 in (b["box"] for b in finding["boxes"])]
            want = [box for box in want if box[3] > box[1]]  # a box wholly in the padding is not reported
            assert [b["box"] for b in images[wide]["findings"][name]["boxes"]] == want, (wide, name)
            assert finding["probability"] == pytest.approx(images[wide]["findings"][name]["probability"])
    for image in report["images"]:
        for finding in image["findings"].values():
            for b in finding["boxes"]:
                x0, y0, x1, y1 = b["box"]
                assert 0 <= x0 < x1 <= image["width"] and 0 <= y0 < y1 <= image["height"], image["path"]

    cams = np.load(out / "cams.npz")
    assert [Path(p).name for p in cams["paths"]] == [Path(i["path"]).name for i in report["images"]]
    assert list(cams["classes"]) == list(FINDINGS) and cams["0"].shape == (14, 16, 16)
    assert cams["0"].dtype == np.float16
    frames = {Path(p).name: f.tolist() for p, f in zip(cams["paths"], cams["frames"])}
    assert frames["wide.png"] == [64, 48, 64, 0, 8]  # width, height, side of the square, pad x, pad y
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(["plain.png", "deep.png", "rgb.png", "rgba.png", "palette.png", "photo.png",
                               "wide.png", "square.png", "wide2x.png", "square2x.png", "mono2.png", "sub/mono1.png"])
    picture = np.asarray(Image.open(out / "overlays" / "plain.png"))
    assert picture.ndim == 3 and picture.shape[0] >= 320  # small X-rays are enlarged to be readable


def test_predict_fails_only_when_nothing_can_be_read(run, tmp_path):
    folder, _ = run
    (tmp_path / "bad.dcm").write_text("no\n")
    result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "bad.dcm"), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and "none of the 1 X-ray files could be read" in result.output
    assert "bad.dcm" in (tmp_path / "out" / "problems.csv").read_text()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no PNG, JPEG or DICOM files in" in result.output
    result = CliRunner().invoke(main, ["predict", str(folder / "splits.json"), str(tmp_path / "bad.dcm"), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 1 and "splits.json: not a readable model file" in result.output
    result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "bad.dcm"), "--out", str(tmp_path / "o"),
                                       "--box-threshold", "1.5"])
    assert result.exit_code == 2 and "must be a finite number in [0, 1], got 1.5" in result.output
    for device, message, code in (("meta", "must be cpu, cuda or cuda:N, got 'meta'", 2),
                                  ("gpu", "must be cpu, cuda or cuda:N, got 'gpu'", 2),  # as written: usage errors
                                  ("cuda:7", "no CUDA GPU here" if not cuda_available() else "CUDA devices", 1)):
        result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "bad.dcm"), "--out",
                                           str(tmp_path / "o"), "--device", device])
        assert result.exit_code == code and message in result.output, (device, result.output)


def test_load_model_reads_model_files_run_folders_and_checkpoints(run, tmp_path):
    folder, xray = run
    want = dmfast.load_model(folder / "model.pt", "cpu").predict(xray, min_probability=0)[0]  # one X-ray
    got = dmfast.load_model(folder, "cpu").predict(torch.tensor(xray)[None], min_probability=0)[0]
    assert got.probabilities == want.probabilities
    torch.testing.assert_close(got.image_cams(), want.image_cams())
    assert want.image_cams().shape == (14, 16, 16) and want.heatmap("Mass", scale=0.5).shape == (32, 32)
    both = want.heatmaps(["Edema", "Mass"], scale=0.5)  # one resampling for several classes: the same maps
    assert torch.equal(both[1], want.heatmap("Mass", scale=0.5)) and torch.equal(both[0], want.heatmap("Edema", 0.5))
    checkpoint = dmfast.load_model(folder / "checkpoint.pt", "cpu")  # the same weights, from the training checkpoint
    assert checkpoint.predict(xray, min_probability=0)[0].probabilities == want.probabilities
    with pytest.raises(ModelFileError, match="a folder without model.pt"):
        dmfast.load_model(tmp_path, "cpu")
    with pytest.raises(ValueError, match="min_probability must be a finite number in"):
        dmfast.load_model(folder, "cpu").predict(xray, min_probability=2)


def test_read_dicom_applies_the_display_transforms(tmp_path, gen):
    stored = torch.randint(100, 1100, (12, 10), generator=gen).numpy().astype(np.uint16)
    stretched = read_dicom(write_dicom(tmp_path / "plain.dcm", stored))  # no window: the image's own range
    assert stretched.min() == 0 and stretched.max() == 255
    fraction = (stored - stored.min()) / float(stored.max() - stored.min())
    np.testing.assert_array_equal(stretched, np.round(fraction * 255))
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1")),
                                  np.round((1 - fraction) * 255))  # inverted before rounding
    windowed = read_dicom(write_dicom(tmp_path / "w.dcm", stored, RescaleSlope=2, RescaleIntercept=-100,
                                      WindowCenter=[1000, 5], WindowWidth=[800, 1]))  # the first of two windows
    want = np.clip(((2.0 * stored - 100) - 999.5) / 799 + 0.5, 0, 1)
    np.testing.assert_array_equal(windowed, np.round(want * 255).astype(np.uint8))
    rgb = np.stack([stored // 8, stored // 8, stored // 8], -1).astype(np.uint8)
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB")), rgb[..., 0])
    signed = write_dicom(tmp_path / "signed.dcm", (stored.astype(np.int16) - 600), PixelRepresentation=1,
                         RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-1324, WindowWidth=1000)
    want = np.clip(((stored - 600.0 - 1024) - (-1324.5)) / 999 + 0.5, 0, 1)
    np.testing.assert_array_equal(read_dicom(signed), np.round(want * 255).astype(np.uint8))
    empty = write_dicom(tmp_path / "empty.dcm", stored, WindowCenter="", WindowWidth="")  # as some devices write
    np.testing.assert_array_equal(read_dicom(empty), stretched)


def _with_voi_lut(path, table, bits: int) -> Path:
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table) % 65536, 0, bits])  # LUT Descriptor: entries, first value, bits
    item.add_new(0x00283006, "US", [int(v) for v in table])  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    return path


def test_voi_lut_wins_over_the_window_and_indexes_long_tables(tmp_path, gen):
    stored = torch.randint(0, 4096, (9, 7), generator=gen).numpy().astype(np.uint16)
    table = np.arange(4096) // 16  # 4096 entries of 8 bits: a table longer than its output range
    path = _with_voi_lut(write_dicom(tmp_path / "lut.dcm", stored, WindowCenter=1, WindowWidth=1), table, 8)
    np.testing.assert_array_equal(read_dicom(path), np.round(table[stored] / 255 * 255).astype(np.uint8))
    inverted = _with_voi_lut(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1"), table, 8)
    np.testing.assert_array_equal(read_dicom(inverted), 255 - table[stored].astype(np.uint8))


def test_compressed_dicom_decodes_or_names_the_missing_decoder(tmp_path):
    import pydicom
    from pydicom.uid import RLELossless

    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = write_dicom(tmp_path / "rle.dcm", pixels, WindowCenter=128, WindowWidth=256)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)  # pydicom's own codec
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom(path), pixels)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG lossless, with RLE bytes: undecodable
    ds.save_as(path)
    with pytest.raises(DicomError, match=r"rle.dcm: cannot decode its pixel data .*dmfast\[dicom\]"):
        read_dicom(path)


def test_window_matches_pydicom(gen):
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    values = torch.randint(0, 4096, (64,), generator=gen).numpy()
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        ds = Dataset()
        ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 12, 0
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000, 1500, function
        np.testing.assert_allclose(window(values, 2000, 1500, function), apply_windowing(values, ds) / 4095,
                                   atol=1e-12, err_msg=function)


def test_dicom_that_is_not_one_image_is_a_named_problem(tmp_path):
    frames = write_dicom(tmp_path / "cine.dcm", np.zeros((3 * 8, 8), np.uint8), NumberOfFrames=3, Rows=8)
    with pytest.raises(DicomError, match="cine.dcm: a multi-frame DICOM \\(3 frames\\)"):
        read_dicom(frames)
    report = write_dicom(tmp_path / "report.dcm", np.zeros((4, 4), np.uint8))
    import pydicom

    ds = pydicom.dcmread(report)
    del ds.PixelData
    ds.save_as(report)
    with pytest.raises(DicomError, match="report.dcm: a DICOM .* without pixel data"):
        read_dicom(report)
    with pytest.raises(ImageError, match="report.dcm: a DICOM"):  # through the one image reader
        load_gray(report)
    with pytest.raises(DicomError, match="w.dcm: window width 0 must be >= 1 for LINEAR"):
        read_dicom(write_dicom(tmp_path / "w.dcm", np.zeros((4, 4), np.uint8), WindowCenter=1, WindowWidth=0))
    odd = write_dicom(tmp_path / "odd.dcm", np.zeros((4, 4), np.uint8), NumberOfFrames="2")
    odd.write_bytes(odd.read_bytes().replace(b"\x28\x00\x08\x00IS\x02\x002 ", b"\x28\x00\x08\x00IS\x02\x00x "))
    with pytest.raises(DicomError, match="odd.dcm: cannot show its pixel data"), \
            pytest.warns(UserWarning, match="Invalid value for VR IS"):  # pydicom's own notice of the bad value
        read_dicom(odd)


def test_list_xrays_searches_folders_and_takes_named_files_as_they_are(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.jpeg", "a/b/z.DCM", "a/readme.txt", "a/.hidden.png", "odd.name"):
        (tmp_path / name).write_bytes(b"")
    write_dicom(tmp_path / "a" / "b" / "1.2.840.113619.2.55", np.zeros((4, 4), np.uint8))  # named by its UID
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")  # followed, each folder once
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "a" / "out").mkdir()
    (tmp_path / "a" / "out" / "overlay.png").write_bytes(b"")  # the output folder inside an input: left out
    files, roots, problems = list_xrays([tmp_path / "a", tmp_path / "odd.name", tmp_path / "a" / "x.png"],
                                        exclude=[tmp_path / "a" / "out"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "a/b/1.2.840.113619.2.55", "a/b/y.jpeg", "a/b/z.DCM", "a/x.png", "odd.name"]  # x.png once
    assert roots[-1] == tmp_path / "odd.name"
    assert sorted((Path(p).name, reason) for p, reason in problems) == [
        ("gone.png", "a broken link"), ("readme.txt", "not a PNG, JPEG or DICOM file")]
    assert output_names(files, roots) == ["b/1.2.840.113619.2", "b/y", "b/z", "x", "odd"]
    names = [Path("p/x-2.png"), Path("p/x.jpg"), Path("p/X.png")]
    assert output_names(names, names) == ["x-2", "x", "X-3"]  # never the same file name, whatever the case
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        list_xrays([tmp_path / "nowhere"])


def test_load_gray_refuses_other_formats_and_oversized_images(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    PILImage.new("L", (64, 64)).save(tmp_path / "bitmap.png", format="BMP")  # a BMP named .png
    with pytest.raises(ImageError, match="bitmap.png: not a PNG, JPEG or DICOM file"):
        load_gray(tmp_path / "bitmap.png")
    PILImage.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="big.png: too large to decode safely"):
        load_gray(tmp_path / "big.png")


def test_the_readme_example_runs(run, tmp_path, monkeypatch):
    """The Python block of the README's "Use a trained model" section, run where model.pt and the X-rays are."""
    folder, xray = run
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use a trained model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "model.pt").write_bytes((folder / "model.pt").read_bytes())
    Image.fromarray(xray).save(tmp_path / "chest.png")
    write_dicom(tmp_path / "chest.dcm", xray)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["results"], list) and len(namespace["results"]) == 3


def test_predict_writes_every_box_as_coco_and_the_challenges_submissions(run, tmp_path):
    """Every box of every class (box floor 0) in predictions.json and predictions.coco.json, the reported findings'
    boxes in VinBigData's and RSNA's submission files, in each image's own pixels."""
    from pycocotools.coco import COCO

    folder, xray = run
    (tmp_path / "in").mkdir()
    Image.fromarray(xray).save(tmp_path / "in" / "0005d3cc.png")
    Image.fromarray(np.ascontiguousarray(xray[:, : xray.shape[1] // 2])).save(tmp_path / "in" / "patient-2.png")
    for challenge in ("vindr", "rsna"):
        out = tmp_path / challenge
        result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "in"), "--out", str(out),
                                           "--min-probability", "0", "--submission", challenge])
        assert result.exit_code == 0, result.output
        images = json.loads((out / "predictions.json").read_text())["images"]
        for image in images:
            assert {b["class"] for b in image["boxes"]} == set(FINDINGS)  # floor 0: every class has a box
            scores = [b["score"] for b in image["boxes"]]
            assert scores == sorted(scores, reverse=True)
            assert all(0 <= b["box"][0] < b["box"][2] <= image["width"] for b in image["boxes"])
            assert all(b["score"] <= b["probability"] + 1e-12 for b in image["boxes"])
        coco = COCO(str(out / "predictions.coco.json"))
        assert len(coco.getAnnIds()) == \
            sum(len(i["boxes"]) for i in images)
        assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(i["path"] for i in images)
        rows = {r[0]: r[1] for r in csv.reader(open(out / "submission.csv"))}
        assert set(rows) == {"image_id" if challenge == "vindr" else "patientId", "0005d3cc", "patient-2"}
        narrow = next(i for i in images if i["path"].endswith("patient-2.png"))
        values = rows["patient-2"].split()
        if challenge == "vindr":  # class conf x0 y0 x1 y1, VinBigData's ids
            assert len(values) % 6 == 0 and values and all(0 <= int(v) <= 14 for v in values[::6])
            assert all(int(v) <= narrow["width"] for v in values[4::6])
        else:  # conf x y width height, Pneumonia only
            pneumonia = narrow["findings"]["Pneumonia"]["boxes"]
            assert len(values) == 5 * len(pneumonia) and float(values[0]) == pytest.approx(pneumonia[0]["score"],
                                                                                           abs=1e-6)
    (tmp_path / "in" / "sub").mkdir()
    Image.fromarray(xray).save(tmp_path / "in" / "sub" / "0005d3cc.png")
    result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path / "in"), "--out", str(tmp_path / "x"),
                                       "--submission", "vindr"])
    assert result.exit_code == 1 and "have one image id, '0005d3cc'" in result.output


def test_bf16_inference_agrees_with_float32(run):
    """--precision bf16 (the backbone under autocast, channels_last; the head in float32): probabilities within
    0.03 and 95% of the CAM boxes at IoU >= 0.9 with float32's (the median at 1), on the same images. fp16 needs a
    GPU."""
    from dmfast.metrics import box_overlap

    folder, _ = run
    images = sorted((folder.parent / "phantom").rglob("images/*.png"))[:16]
    pixels = torch.from_numpy(np.stack([load_gray(p) for p in images]))[:, None]
    exact, low = dmfast.load_model(folder, "cpu")(pixels), dmfast.load_model(folder, "cpu", "bf16")(pixels)
    assert low.probabilities.dtype == low.cams.dtype == torch.float32
    assert (low.probabilities - exact.probabilities).abs().max() < 0.03
    boxes = [dmfast.ops.cam_boxes(p.cams.flatten(0, 1), (64, 64), 0.5, 1)[0][:, 0] for p in (exact, low)]
    overlap = np.diag(box_overlap(boxes[0].numpy(), boxes[1].numpy()))
    # a map with two near-equal peaks may box the other one: rare, never the rule
    assert np.mean(overlap >= 0.9) >= 0.95 and np.median(overlap) == 1.0, np.sort(overlap)[:10]
    if not cuda_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            dmfast.load_model(folder, "cpu", "fp16")
    result = CliRunner().invoke(main, ["predict", str(folder), str(images[0]), "--out", str(folder.parent / "bf16"),
                                       "--precision", "bf16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = next((folder.parent / "phantom").rglob("Data_Entry_2017.csv")).parent
    finer = train.run(TrainConfig(data=str(data), out=str(folder.parent / "run16"), arch="resnet18", size=64,
                                  cam_stride=16, batch=8, epochs=1, max_steps=2, lr=1e-3, split="patients",
                                  val_fraction=0.2)).parent  # 4 x 4 CAMs: enough for masks
    masks = {}
    for precision in ("fp32", "bf16"):  # the disease masks from bf16 CAMs: nearly the same pixels
        result = CliRunner().invoke(main, ["masks", str(data), "--checkpoint", str(finer), "--out",
                                           str(folder.parent / f"masks-{precision}"), "--precision", precision])
        assert result.exit_code == 0, result.output
        masks[precision] = torch.load(folder.parent / f"masks-{precision}" / "masks.pt", weights_only=True)["masks"]
    assert (masks["fp32"] == masks["bf16"]).float().mean() >= 0.95


def test_compiled_and_auto_precision_inference_through_the_cli(run, monkeypatch):
    """predict --compile gives eager's probabilities and boxes (graph capture tested with backend aot_eager), and
    precision auto on a CPU said to have native bf16 (DMFAST_CPU_BF16=1) runs the bf16 path."""
    from dmfast import models

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")
    folder, _ = run
    images = sorted((folder.parent / "phantom").rglob("images/*.png"))[:6]
    pixels = torch.from_numpy(np.stack([load_gray(p) for p in images]))[:, None]
    eager, compiled = dmfast.load_model(folder, "cpu"), dmfast.load_model(folder, "cpu", compile=True)
    assert eager.precision == "fp32" and eager.network is eager.model and compiled.network is not compiled.model
    torch.testing.assert_close(compiled(pixels).probabilities, eager(pixels).probabilities, rtol=0, atol=1e-5)
    outputs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = CliRunner().invoke(main, ["predict", str(folder), *map(str, images), "--out",
                                           str(folder.parent / f"predict-{name}"), "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = json.loads((folder.parent / f"predict-{name}" / "predictions.json").read_text())
    for a, b in zip(outputs["eager"]["images"], outputs["compiled"]["images"]):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    monkeypatch.setenv("DMFAST_CPU_BF16", "1")
    auto = dmfast.load_model(folder, "cpu")
    assert auto.precision == "bf16" and auto.low_precision == torch.bfloat16


def test_a_full_disk_during_predict_names_the_output_folder(run, tmp_path, monkeypatch):
    """The per-image records go to an unnamed spool file in --out: a full disk there is an error naming --out,
    and no output file is left half written."""
    import errno
    import io
    import os
    import tempfile

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder, _ = run
    image = sorted((folder.parent / "phantom").rglob("images/*.png"))[0]
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *args, **kwargs: Full())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(folder), str(image), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1
    assert f"{out}: No space left on device (writing the records of the run)" in " ".join(result.output.split())
    assert not out.exists()  # nothing written: the folder the run made for its outputs went with it


def test_inputs_other_than_uint8_convert_by_the_readers_rule_or_are_refused(run):
    """uint16 (its significant bits), floats in [0, 1], colour [H, W, 3] and [B, S, S] give the uint8 image's
    probabilities; a float image outside [0, 1], another size, or an image too small are refused saying what is
    expected."""
    folder, xray = run
    model = dmfast.load_model(folder, "cpu", "fp32")
    want = model.predict(xray, min_probability=0)[0].probabilities
    twelve = ((xray.astype(np.int64) * 4095 + 127) // 255).astype(np.uint16)  # 12-bit data stored as it is
    colour = np.repeat(xray[..., None], 3, -1)
    for given in (xray.astype(np.float32) / 255, twelve, colour, torch.from_numpy(xray.astype(np.float64) / 255),
                  xray[..., None]):  # [H, W, 1]: one grey image, not H images
        got = model.predict(given, min_probability=0)[0].probabilities
        for name in want:
            assert abs(got[name] - want[name]) <= 1e-3, (given.dtype, name, got[name], want[name])
    square = torch.from_numpy(xray).view(1, 1, *xray.shape)
    assert tuple(square.shape[2:]) == (model.size, model.size)  # the phantom X-ray is at the model's size
    base = model(square).probabilities
    torch.testing.assert_close(model(square.float() / 255).probabilities, base, atol=1e-3, rtol=0)
    torch.testing.assert_close(model(square[:, 0]).probabilities, base)  # [B, S, S]
    with pytest.raises(ValueError, match="float pixels from 0 to 255; floats must lie in \\[0, 1\\]"):
        model.predict(xray.astype(np.float32), min_probability=0)
    with pytest.raises(ValueError, match=f"pixels of shape \\(1, 1, 32, 32\\); this model takes \\[B, 1, "
                                         f"{model.size}, {model.size}\\]"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image 0: 1 x 1 pixels, too small to be an X-ray"):
        model.predict(np.zeros((1, 1), np.uint8))
    with pytest.raises(ValueError, match="image 0: int64 \\(2, 64, 64, 7\\); expected uint8"):
        model.predict([np.zeros((2, 64, 64, 7), np.int64)])


def test_classes_are_named_in_any_case_or_a_releases_spelling(run):
    folder, xray = run
    model = dmfast.load_model(folder, "cpu", "fp32")
    assert model.classes[0] == "Atelectasis" and len(model.classes) == 14
    result = model.predict(xray, min_probability=0)[0]
    for name in ("cardiomegaly", "Infiltrate", "pleural effusion", "Pleural Thickening", "PLEURAL_THICKENING"):
        assert result.heatmap(name).shape == (xray.shape[0], xray.shape[1])
    torch.testing.assert_close(result.heatmap("infiltrate"), result.heatmap("Infiltration"))
    with pytest.raises(ValueError, match="unknown finding 'Tumour'; the findings are Atelectasis, Cardiomegaly"):
        result.heatmap("Tumour")
    assert "load_model" in dir(dmfast) and "load_model" in dmfast.__all__


def test_the_ood_score_separates_xrays_from_what_they_are_not_and_predict_flags_them(run, tmp_path, gen):
    """The model file keeps its training images' feature statistics; the score separates held-out phantom X-rays
    from blank, grey, noise, inverted, rotated and smooth-texture inputs (AUROC on 16 + 16 images each), and
    predict marks the inputs beyond the calibrated threshold in its CSV and JSON."""
    from dmfast.data.cache import ImageCache
    from dmfast.metrics import roc_auc

    folder, _ = run
    model = dmfast.load_model(folder, "cpu", "fp32")
    assert model.ood is not None and model.ood["calibration"] == "validation" and model.ood["threshold"] > 0
    cache = ImageCache(model.config.cache)
    held_out = [n for n in model.splits.test if n in cache][:16]  # neither trained on nor calibrated with
    xrays = cache.batch(held_out)
    kinds = {"blank": torch.zeros_like(xrays), "grey": torch.full_like(xrays, 128),
             "noise": torch.randint(0, 256, xrays.shape, generator=gen, dtype=torch.uint8),
             "inverted": 255 - xrays, "rotated": xrays.rot90(1, (2, 3)).contiguous(),
             "texture": (F.interpolate(torch.rand(len(xrays), 1, 8, 8, generator=gen), size=xrays.shape[-1],
                                       mode="bicubic").clamp(0, 1) * 255).to(torch.uint8)}
    inside = model(xrays).ood.numpy()
    separated = {}
    for kind, pixels in kinds.items():
        outside = model(pixels).ood.numpy()
        labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))].astype(int)[:, None]
        separated[kind] = float(roc_auc(labels, np.r_[inside, outside][:, None]).mean)
    assert sum(auroc >= 0.95 for auroc in separated.values()) >= 4, separated
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    flagged = ("blank", "grey", "inverted")  # far beyond the threshold, and not drawn from the seeded generator
    for kind in flagged:
        Image.fromarray(kinds[kind][0, 0].numpy()).save(inputs / f"{kind}.png")
    result = CliRunner().invoke(main, ["predict", str(folder), str(inputs), "--out", str(tmp_path / "out"),
                                       "--overlays"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).stem: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert all(rows[kind]["out_of_distribution"] == "1" for kind in flagged), rows
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert all(r["out_of_distribution"] is True and r["ood_score"] > model.ood["threshold"] for r in records)
