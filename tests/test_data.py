import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmfast import phantom
from dmfast.data.cache import ImageCache, prepare
from dmfast.data.dataset import FINDINGS, DataError
from dmfast.data.formats import open_dataset
from dmfast.data.images import ImageError, load_gray, to_model_input
from dmfast.data.splits import Splits, kfold_by_patient, make_splits
from dmfast.testing import shared_data

SAMPLE = shared_data("chestxray14-sample")
needs_sample = pytest.mark.skipif(not (SAMPLE / "Data_Entry_2017.csv").exists(),
                                  reason=f"ChestX-ray14 sample not found at {SAMPLE}")


@needs_sample
def test_reader_on_the_real_sample():
    dataset = open_dataset(SAMPLE)
    with open(SAMPLE / "Data_Entry_2017.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(dataset.records) == len(rows) == 1029
    expected = np.zeros(len(FINDINGS), int)
    for row in rows:
        for token in row["Finding Labels"].split("|"):
            if token != "No Finding":
                expected[FINDINGS.index(token)] += 1
    assert dataset.labels().sum(0).tolist() == expected.tolist()
    assert len(dataset.boxes) == 485 and len({b.image for b in dataset.boxes}) == 436
    assert {b.image for b in dataset.boxes} <= dataset.test
    boxes = dataset.boxes_xyxy()
    with open(SAMPLE / "BBox_List_2017.csv") as f:
        reader = csv.reader(f)
        next(reader)  # the release's header
        first = next(reader)
    finding, x0, y0, x1, y1 = boxes[first[0]][0]
    x, y, w, h = (float(v) for v in first[2:6])
    assert FINDINGS[finding] == {"Infiltrate": "Infiltration"}.get(first[1], first[1])
    np.testing.assert_allclose([x0, y0, x1, y1], [x / 2, y / 2, (x + w) / 2, (y + h) / 2])  # 1024 -> 512 px
    splits = make_splits(dataset, val_fraction=0.1, seed=3, box_folds=5)
    patient = lambda names: {int(n.split("_")[0]) for n in names}  # noqa: E731
    assert not patient(splits.train) & patient(splits.val) and not patient(splits.train) & patient(splits.test)
    assert not patient(splits.val) & patient(splits.test)
    assert sum(len(f) for f in splits.folds) == 436
    assert all(not patient(a) & patient(b) for i, a in enumerate(splits.folds) for b in splits.folds[i + 1:])
    assert make_splits(dataset, val_fraction=0.1, seed=3, box_folds=5) == splits


def write_release(root: Path, rows, boxes=(), size=64, images=None):
    """A small ChestX-ray14-format folder; ``images`` maps name -> PIL image (default: gray squares)."""
    (root / "images").mkdir(parents=True)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        for row in rows:
            f.write(row + "\n")
    with open(root / "BBox_List_2017.csv", "w") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        for row in boxes:
            f.write(row + "\n")
    names = [r.split(",")[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join(names) + "\n")
    (root / "test_list.txt").write_text("")
    for name in names:
        image = (images or {}).get(name, Image.fromarray(np.full((size, size), 100, np.uint8)))
        if image is not None:
            image.save(root / "images" / name)


def entry(name, labels="No Finding", patient=1):
    return f"{name},{labels},0,{patient},50,M,PA,2500,2048,0.14,0.14"


def test_reader_reports_missing_files_unknown_labels_and_bad_rows(tmp_path):
    rows = [entry("00000001_000.png"), entry("00000002_000.png", "Mass", 2), entry("00000003_000.png", "Tumour", 3),
            "00000004_000.png,Mass,0,not-a-number,50,M,PA,1,1,1,1", "00000005_000.png"]
    write_release(tmp_path, rows, boxes=["00000002_000.png,Mass,10,20,100,50", "00000002_000.png,Mass,x,1,1,1"],
                  images={"00000001_000.png": None})
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path)
    message = str(error.value)
    assert "missing: 00000001_000.png" in message and "Tumour" in message
    assert "Patient ID 'not-a-number'" in message and "too few columns" in message and "non-numeric box" in message
    dataset = open_dataset(tmp_path, skip_problems=True)
    assert dataset.images == ["00000002_000.png"] and dataset.problems.count() == 5
    assert dataset.boxes_xyxy()["00000002_000.png"] == [(4, 10 / 16, 20 / 16, 110 / 16, 70 / 16)]


def test_images_in_release_subfolders_and_odd_formats(tmp_path):
    rgba = Image.fromarray(np.dstack([np.full((32, 32), v, np.uint8) for v in (200, 100, 50, 255)]), "RGBA")
    sixteen = Image.fromarray(np.full((40, 32), 65535 // 2, np.uint16))
    names = ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
    write_release(tmp_path, [entry(n, patient=i) for i, n in enumerate(names)],
                  images={names[0]: rgba, names[1]: sixteen, names[2]: None})
    sub = tmp_path / "images_002" / "images"
    sub.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(sub / names[2])
    dataset = open_dataset(tmp_path)
    assert dataset.paths[names[2]] == sub / names[2]
    gray = load_gray(dataset.paths[names[0]])
    assert gray.dtype == np.uint8 and gray.shape == (32, 32)
    assert abs(int(gray[0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1
    half = load_gray(dataset.paths[names[1]], size=20)
    assert half.shape == (20, 20) and abs(int(half[5, 5]) - 127) <= 1


def _sixteen_bit_png(path, values: np.ndarray, sbit: int | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return path


def test_sixteen_bit_pngs_use_their_significant_bits(tmp_path):
    ramp = np.round(np.linspace(0, 4080, 64 * 48)).reshape(48, 64)  # a 12-bit detector's values, stored as they are
    twelve = load_gray(_sixteen_bit_png(tmp_path / "twelve.png", ramp))
    np.testing.assert_array_equal(twelve, np.round(np.round(ramp) * 255 / 4095).astype(np.uint8))
    assert twelve.max() == 254  # was 16 when scaled by the 16-bit container (4080 / 257)
    ten = load_gray(_sixteen_bit_png(tmp_path / "ten.png", ramp // 8, sbit=10))  # 0-510 of 10 bits: sBIT says
    np.testing.assert_array_equal(ten, np.round((np.round(ramp) // 8) * 255 / 1023).astype(np.uint8))
    shifted = np.round(ramp) * 16  # scaled to 16 bits as the PNG standard asks, sBIT 12 recording the source
    full = load_gray(_sixteen_bit_png(tmp_path / "shifted.png", shifted, sbit=12))
    np.testing.assert_array_equal(full, np.round(shifted * 255 / 65535).astype(np.uint8))
    dim = load_gray(_sixteen_bit_png(tmp_path / "dim.png", np.full((32, 32), 200)))  # fits 8 bits: as 8-bit
    assert (dim == 200).all()
    full = load_gray(_sixteen_bit_png(tmp_path / "full.png", np.full((32, 32), 3000), sbit=16))  # sBIT says 16 bits
    assert (full == round(3000 * 255 / 65535)).all()


def test_image_arrays_of_any_tensor_kind_convert_or_are_refused_in_one_line():
    from dmfast.data.images import gray_of

    values = torch.linspace(0, 1, 40 * 36).view(40, 36)
    want = gray_of(values.numpy())
    for given in (values.to(torch.bfloat16), values.half(), values.requires_grad_(), values[..., None]):
        got = gray_of(given)
        assert got.shape == (40, 36) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="float pixels from 0 to 2; floats must lie in"):
        gray_of(values.detach() * 2)


@pytest.mark.parametrize("shape", [(1, 1), (31, 400), (400, 16)])
def test_images_too_small_to_be_xrays_are_errors(tmp_path, shape):
    from dmfast.testing import write_dicom

    png = tmp_path / "small.png"
    Image.fromarray(np.full(shape, 128, np.uint8)).save(png)
    dicom = write_dicom(tmp_path / "small.dcm", np.full(shape, 300, np.uint16))
    for path in (png, dicom):
        with pytest.raises(ImageError, match=rf"{path.name}: {shape[1]} x {shape[0]} pixels, too small to be an "
                                             "X-ray \\(a side of at least 32 px\\)"):
            load_gray(path, size=64)


def test_truncated_png_is_an_error_that_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match="broken.png: cannot decode"):
        load_gray(path)
    with pytest.raises(ImageError, match="file not found"):
        load_gray(tmp_path / "nope.png")


def test_cache_round_trip_resume_stale_and_bad_images(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"{i:08d}_000.png" for i in range(1, 41)]
    images = {n: Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)) for n in names}
    data = tmp_path / "data"
    write_release(data, [entry(n, patient=i) for i, n in enumerate(names)], images=images)
    cache_dir = tmp_path / "cache"
    prepare(data, cache_dir, size=32, workers=2, limit_chunks=1)  # interrupted after one chunk
    with pytest.raises(DataError, match="incomplete"):
        ImageCache(cache_dir)
    done = np.fromfile(cache_dir / "done.u8", np.uint8)
    assert 0 < done.sum() < len(names)
    prepare(data, cache_dir, size=32, workers=2)  # resumes
    cache = ImageCache(cache_dir)
    batch = cache.batch(names[::-3])
    expected = np.stack([load_gray(data / "images" / n, size=32) for n in names[::-3]])
    assert batch.shape == (len(expected), 1, 32, 32) and torch.equal(batch[:, 0], torch.from_numpy(expected))
    assert to_model_input(batch).min() >= -1 and to_model_input(batch).max() <= 1
    os.utime(data / "images" / names[5], ns=(1, 1))
    with pytest.raises(DataError, match=f"stale: 1 source images changed .*{names[5]}"):
        ImageCache(cache_dir)
    prepare(data, cache_dir, size=32, workers=1)  # rebuilt
    assert len(ImageCache(cache_dir)) == len(names)
    (data / "images" / names[7]).write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"could not be decoded: .*{names[7]}"):
        prepare(data, cache_dir, size=32, workers=1)
    prepare(data, cache_dir, size=32, workers=1, skip_problems=True)
    cache = ImageCache(cache_dir)
    assert names[7] not in cache and len(cache) == len(names) - 1


def test_splits_are_patient_disjoint_and_saved(tmp_path):
    images = [f"{p:08d}_{k:03d}.png" for p in range(1, 60) for k in range(p % 3 + 1)]
    folds = kfold_by_patient(images, 4, seed=1)
    assert sorted(sum(folds, [])) == sorted(images)
    owner = {int(n[:8]): i for i, f in enumerate(folds) for n in f}
    assert all(owner[int(n[:8])] == i for i, f in enumerate(folds) for n in f)
    splits = Splits(images[:10], images[10:20], images[20:], 1, 0.1, folds)
    assert Splits.load(splits.save(tmp_path / "splits.json")) == splits


def test_phantom_is_deterministic_and_reads_back(tmp_path):
    a = phantom.synthesize(tmp_path / "a", count=12, size=64, seed=5)
    b = phantom.synthesize(tmp_path / "b", count=12, size=64, seed=5)
    for name in ("Data_Entry_2017.csv", "BBox_List_2017.csv", "phantom_transforms.csv", "test_list.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for image in sorted((a / "images").iterdir()):
        assert image.read_bytes() == (b / "images" / image.name).read_bytes()
    dataset = open_dataset(a)
    assert len(dataset.records) == 12 and not dataset.problems
    positives = dataset.labels().sum()
    assert len(dataset.boxes) == positives  # one box per positive finding
    for image, boxes in dataset.boxes_xyxy().items():
        for _, x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert dataset.train_val.isdisjoint(dataset.test)


@pytest.mark.parametrize("finding", FINDINGS)
def test_phantom_boxes_lie_on_the_planted_findings(finding):
    size = 128
    rng = np.random.default_rng(7)
    with_finding, boxes = phantom.draw_image(size, [finding], np.random.default_rng(7))
    without, _ = phantom.draw_image(size, [], np.random.default_rng(7))
    # Same anatomy seed; compare the finding's own drawing on a blank canvas where the anatomy differs.
    if finding == "Cardiomegaly":
        change = (with_finding - without).abs()
    else:
        canvas = phantom.Canvas(size, rng)
        box = phantom._FINDINGS[finding](canvas, 1)
        boxes = {finding: box}
        change = canvas.image.abs()
    x0, y0, x1, y1 = boxes[finding]
    lin = (torch.arange(size) + 0.5) / size * 2 - 1
    inside = ((lin[None] >= x0) & (lin[None] <= x1) & (lin[:, None] >= y0) & (lin[:, None] <= y1)).float()
    strong = (change > 0.5 * change.max()).float()
    assert (strong * inside).sum() >= 0.9 * strong.sum(), finding


def test_phantom_warp_moves_boxes_with_the_image():
    theta = phantom.Misalignment(1.1, 0.9, 0.05, -0.05, 0.1).theta()
    box = (-0.2, -0.1, 0.1, 0.3)
    moved = phantom.warp_box(box, theta)
    # the moved box's centre maps back onto the original centre
    centre = torch.tensor([(moved[0] + moved[2]) / 2, (moved[1] + moved[3]) / 2, 1.0])
    back = theta.double() @ centre.double()
    np.testing.assert_allclose(back.numpy(), [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], atol=0.02)


def test_boxes_come_from_the_release_space_or_the_images_own(tmp_path):
    from dmfast.phantom import synthesize

    dataset = open_dataset(synthesize(tmp_path / "ph", count=12, size=64, seed=4))
    box = dataset.boxes[0]
    x, y, w, h = box.xywh
    release = [b for b in dataset.boxes_xyxy()[box.image] if b[0] == box.finding][0]
    assert release[1:] == pytest.approx([v * 64 / 1024 for v in (x, y, x + w, y + h)])  # 1024 px -> the 64 px PNG
    own = [b for b in dataset.boxes_xyxy(space="image")[box.image] if b[0] == box.finding][0]
    assert own[1:] == pytest.approx([x, y, x + w, y + h])  # already in the PNG's pixels
    resized = [b for b in dataset.boxes_xyxy({box.image: (32, 16)}, space="image")[box.image]
               if b[0] == box.finding][0]
    assert resized[1:] == pytest.approx([x / 2, y / 4, (x + w) / 2, (y + h) / 4])
    with pytest.raises(ValueError, match="box space must be one of release, image"):
        dataset.boxes_xyxy(space="pixels")


def test_prepare_pads_non_square_images_and_their_boxes_follow(tmp_path):
    (tmp_path / "images").mkdir()
    wide = np.zeros((48, 64), np.uint8)
    wide[5:21, 10:30] = 255  # a bright finding at x 10..30, y 5..21 of a 64 x 48 X-ray
    Image.fromarray(wide).save(tmp_path / "images" / "00000001_000.png")
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    (tmp_path / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                                 "00000001_000.png,Mass,10,5,20,16\n")
    cache = ImageCache(prepare(tmp_path, tmp_path / "cache", size=32, workers=1))
    pixels = cache.batch(["00000001_000.png"])[0, 0].numpy()
    assert pixels[:3].max() == 0 and pixels[-3:].max() == 0  # 8 rows of padding above and below, halved
    dataset = open_dataset(tmp_path)
    [(finding, x0, y0, x1, y1)] = dataset.boxes_in_square(["00000001_000.png"], 32, space="image")["00000001_000.png"]
    assert finding == 4 and (x0, y0, x1, y1) == pytest.approx((5, 6.5, 15, 14.5))  # (x + pad) * 32 / 64
    assert pixels[8:13, 6:14].min() > 200 and pixels[20:, :].max() < 60  # the finding is where its box says


def test_a_full_disk_stops_prepare_before_any_decoding_and_names_the_space(tmp_path, monkeypatch):
    """The cache's files get their disk space before they are mapped: with none left, prepare says which folder,
    how much it needs and how much is free, and leaves no cache file a later run could take for its pixels (never a
    SIGBUS while writing them). Where the file system cannot reserve space, the zeros are written out instead."""
    import errno

    data = phantom.synthesize(tmp_path / "ph", count=12, size=64, seed=1)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DataError, match=r"cache: no space for the image cache's images.u8: 12,288 bytes needed, .* free"):
        prepare(data, tmp_path / "cache", size=32)
    assert not (tmp_path / "cache" / "images.u8").exists()

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    cache = ImageCache(prepare(data, tmp_path / "cache", size=32))
    assert (tmp_path / "cache" / "images.u8").stat().st_size == 12 * 32 * 32 and len(cache) == 12
    assert cache.batch(cache.names[:2]).float().std() > 0  # decoded after the reservation
