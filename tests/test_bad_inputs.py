"""The bad-input suite: what a careless or unlucky user gives dmfast, each built here and run through the command
line (or the op), asserting the kind of answer: a usage error naming the option (exit 2), or ``error: ...`` naming
the file, row or setting (exit 1); never a traceback, a crash, a silently wrong result or an overwritten run."""

import os
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import dmfast
from cli.main import main
from dmfast import checkpoints, ops
from dmfast.testing import phantom_with_cache

SMALL_RUN = ["--arch", "resnet18", "--size", "64", "--cam-stride", "16", "--epochs", "1", "--max-steps", "1",
             "--batch", "8", "--split", "patients", "--val-fraction", "0.2"]


def invoke(*args) -> SimpleNamespace:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return SimpleNamespace(code=result.exit_code, output=result.output, exception=result.exception)


def expect(args, *fragments, code: int = 1) -> str:
    """Run the command line and check the answer: exit ``code``, no traceback or unforeseen error, every fragment
    in the message."""
    result = invoke(*args)
    assert result.code == code, result.output
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output and "error: unexpected" not in result.output, result.output
    if code:
        assert ("error: " if code == 1 else "Error: ") in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    if os.environ.get("DMFAST_SHOW_ANSWERS"):  # to read the messages: DMFAST_SHOW_ANSWERS=1 pytest -s ...
        print(f"\n$ dmfast {' '.join(map(str, args))}\n{result.output.strip()}")
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A phantom with its cache, a trained run, an alignment run, a masks file, and files of the wrong kinds."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data, cache = phantom_with_cache(root / "phantom", count=60, size=64, seed=11)
    for args in (["train", data, "--out", root / "run", "--cache", cache, *SMALL_RUN],
                 ["masks", data, "--out", root / "masks", "--pseudo", "--size", "64", "--cache", cache],
                 ["align", data, "--out", root / "align", "--cache", cache, "--size", "64", "--pool", "8", "--epochs",
                  "1", "--max-steps", "1", "--input-size", "32", "--anchor-images", "20", "--batch", "8", "--split",
                  "patients", "--val-fraction", "0.2"]):
        result = invoke(*args)
        assert result.code == 0, result.output
    files = root / "files"
    files.mkdir()
    checkpoint = root / "run" / "checkpoint.pt"
    made = {"empty": b"", "garbage": bytes(range(256)) * 8, "text": b"just some notes\n",
            "truncated": checkpoint.read_bytes()[:5000]}
    for name, content in made.items():
        (files / f"{name}.pt").write_bytes(content)
    torch.save([1, 2, 3], files / "list.pt")
    masks = checkpoints.load(root / "masks" / "masks.pt", checkpoints.MASKS)
    for name, values in (("huge", 1e30), ("negative", -5.0)):
        checkpoints.save(files / f"masks-{name}.pt", checkpoints.MASKS, {**masks, "masks": masks["masks"] * 0 + values})
    checkpoints.save(files / "masks-shape.pt", checkpoints.MASKS, {**masks, "masks": masks["masks"][:3]})
    checkpoints.save(files / "masks-grid.pt", checkpoints.MASKS, {**masks, "masks": torch.rand(14, 64, 32)})
    checkpoints.save(files / "masks-one.pt", checkpoints.MASKS, {**masks, "masks": torch.rand(14, 1, 1)})
    state = checkpoints.load(checkpoint, checkpoints.CLASSIFIER)
    checkpoints.save(files / "mismatched.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "arch": "resnet34"}})  # resnet18 weights
    checkpoints.save(files / "coarse.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "cam_stride": 32}})  # 2 x 2 CAMs at 64 px
    checkpoints.save(files / "settings.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "lr_decay": 5.0}})  # edited out of range
    checkpoints.save(files / "weights.pt", checkpoints.CLASSIFIER,
                     {**state, "model": {**state["model"], "fc.weight": state["model"]["fc.weight"][:3]}})
    checkpoints.save(files / "nan.pt", checkpoints.CLASSIFIER,
                     {**state, "model": {k: v * float("nan") if v.is_floating_point() else v
                                         for k, v in state["model"].items()}})
    checkpoints.save(files / "config-none.pt", checkpoints.CLASSIFIER, {**state, "config": None})
    checkpoints.save(files / "no-size.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {k: v for k, v in state["config"].items() if k != "size"}})
    model = torch.load(root / "run" / "model.pt", weights_only=True)
    for name, change in (("size-0", {"size": 0}), ("size-huge", {"size": 10**6}), ("size-text", {"size": "64"}),
                         ("classifier-none", {"classifier": None})):
        checkpoints.save(files / f"model-{name}.pt", checkpoints.MODEL,
                         {k: v for k, v in {**model, **change}.items() if k not in ("format", "version")})
    _edited_model_files(files, model, state, checkpoints.load(root / "align" / "alignment.pt", checkpoints.ALIGNMENT))
    checkpoints.save(files / "runs-code.pt", checkpoints.CLASSIFIER, {**state, "note": _RunsCode(files / "ran")})
    checkpoints.save(files / "elsewhere.pt", checkpoints.CLASSIFIER,
                     {**state, "config": {**state["config"], "data": str(root / "moved-away")}})
    (files / "test-names.txt").write_text("\n".join(state["splits"]["test"]) + "\n")
    kinds = {"checkpoint": checkpoint, "model": root / "run" / "model.pt", "masks": root / "masks" / "masks.pt",
             "alignment": root / "align" / "alignment.pt", "anchor": root / "align" / "anchor.pt"}
    return SimpleNamespace(root=root, data=data, cache=cache, files=files, kinds=kinds)


def _edited_model_files(files: Path, model: dict, state: dict, alignment: dict) -> None:
    """Trained-model files edited by hand after dmfast wrote them (``torch.save``: the seal left as it was), and
    files whose weights or masks are damaged (written by dmfast, so sealed)."""
    weights = model["classifier"]["state"]
    variances = next(k for k in weights if k.endswith("running_var"))
    edits = {"model-arch": {"classifier": {**model["classifier"], "arch": "resnet34"}},
             "model-stride": {"classifier": {**model["classifier"], "cam_stride": 32}},
             "model-size": {"size": 128},
             "model-missing": {"classifier": {**model["classifier"], "state": {
                 k: v for k, v in weights.items() if k != "fc.bias"}}}}
    for name, change in edits.items():
        torch.save({**model, **change}, files / f"{name}.pt")
    torch.save({**state, "config": {**state["config"], "cam_stride": 32, "size": 128}},
               files / "checkpoint-stride.pt")  # 8 x 8 CAMs: allowed, but not how its weights were trained
    unsealed = {k: v for k, v in model.items() if k != "seal"}  # a file of a dmfast before seals
    torch.save({**unsealed, "classifier": {**model["classifier"], "state": {
        k: v for k, v in weights.items() if k != "fc.bias"}}}, files / "model-unsealed-missing.pt")
    for name, value in (("nan-var", float("nan")), ("negative-var", -1.0)):
        checkpoints.save(files / f"model-{name}.pt", checkpoints.MODEL, {**model, "classifier": {
            **model["classifier"], "state": {**weights, variances: weights[variances] * 0 + value}}})
    checkpoints.save(files / "model-masks-grid.pt", checkpoints.MODEL, {**model, "classifier": {
        **model["classifier"], "state": {**weights, "masks": torch.rand(14, 64, 32)}}})
    checkpoints.save(files / "alignment-nan.pt", checkpoints.ALIGNMENT, {
        **alignment, "model": {k: v * float("nan") if v.is_floating_point() else v
                               for k, v in alignment["model"].items()}})


class _RunsCode:
    """Unpickled, it would run a shell command that leaves ``marker`` behind: what a hostile checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def file_of(world, name: str) -> Path:
    return world.kinds[name] if name in world.kinds else world.files / f"{name}.pt"


# --- command-line numbers and choices out of range: a usage error naming the option (exit 2) -------------------------

def _command(world, tmp_path, command: str) -> list:
    out = tmp_path / "out"
    return {"train": ["train", world.data, "--out", out, "--cache", world.cache],
            "align": ["align", world.data, "--out", out, "--cache", world.cache],
            "masks": ["masks", world.data, "--out", out, "--cache", world.cache, "--pseudo"],
            "eval": ["eval", world.data, "--checkpoint", f"m={world.kinds['checkpoint']}", "--out", out],
            "predict": ["predict", world.kinds["model"], world.data / "images", "--out", out],
            "synth": ["synth", out], "prepare": ["prepare", world.data, "--cache", out], "demo": ["demo", "--out", out],
            }[command]


RANGE_CASES = [
    ("train", "--batch", v) for v in ("0", "-16", "1.5", "nan")] + [
    ("train", "--epochs", "0"), ("train", "--max-steps", "0"), ("train", "--max-steps", "-1"),
    ("train", "--lr", "0"), ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--lr", "-1e-3"),
    ("train", "--lr-decay", "nan"), ("train", "--lr-decay", "0"), ("train", "--lr-decay", "1.5"),
    ("train", "--val-fraction", "-0.5"), ("train", "--val-fraction", "nan"), ("train", "--val-fraction", "1"),
    ("train", "--size", "0"), ("train", "--size", "16"), ("train", "--size", "100000"), ("train", "--seed", "-1"),
    ("train", "--cam-stride", "8"), ("train", "--arch", "resnet99"), ("train", "--optimizer", "rmsprop"),
    ("train", "--split", "random"), ("train", "--batch", "twelve"),
    ("align", "--pool", "0"), ("align", "--lr", "nan"), ("align", "--momentum", "1"), ("align", "--momentum", "-0.1"),
    ("align", "--clip", "0"), ("align", "--input-size", "0"), ("align", "--anchor-images", "0"),
    ("align", "--grid-images", "0"), ("align", "--perceptual-weight", "-1"), ("align", "--epochs", "0"),
    ("align", "--batch", "0"), ("align", "--optimizer", "lbfgs"),
    ("masks", "--confidence", "2"), ("masks", "--confidence", "nan"), ("masks", "--threshold", "-1"),
    ("masks", "--batch", "0"), ("masks", "--min-images", "0"), ("masks", "--size", "0"),
    ("masks", "--asymmetric", "Heart"),
    ("eval", "--batch", "0"), ("eval", "--max-boxes", "0"), ("eval", "--max-boxes", str(2**40)),
    ("eval", "--box-threshold", "2"), ("eval", "--box-threshold", "nan"), ("eval", "--box-threshold", "abc"),
    ("eval", "--box-threshold", "0.5,-0.1"), ("eval", "--bootstrap", "-1"), ("eval", "--overlays", "-1"),
    ("eval", "--seed", "-1"), ("eval", "--box-space", "pixels"), ("eval", "--split", "none"),
    ("predict", "--batch", "0"), ("predict", "--min-probability", "2"), ("predict", "--min-probability", "nan"),
    ("predict", "--max-boxes", "0"), ("predict", "--box-threshold", "1.5"), ("predict", "--device", "tpu"),
    ("predict", "--device", "cuda:x"), ("eval", "--cam", "scorecam"), ("train", "--arch", "timm:"),
    ("synth", "--count", "0"), ("synth", "--count", "-5"), ("synth", "--size", "0"), ("synth", "--no-finding", "2"),
    ("synth", "--no-finding", "nan"), ("synth", "--seed", "-1"),
    ("prepare", "--size", "0"), ("prepare", "--size", "16"), ("prepare", "--workers", "0"),
    ("demo", "--count", "0"), ("demo", "--size", "32"), ("demo", "--val-fraction", "0"), ("demo", "--epochs", "0"),
    ("demo", "--attention-epochs", "0"), ("demo", "--batch", "0"), ("demo", "--lr", "nan"),
    ("demo", "--predict-images", "-1"), ("demo", "--max-steps", "0"),
]


@pytest.mark.parametrize("command, flag, value", RANGE_CASES, ids=[" ".join(c) for c in RANGE_CASES])
def test_out_of_range_options_are_usage_errors(world, tmp_path, command, flag, value):
    expect([*_command(world, tmp_path, command), flag, value], flag, code=2)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --- settings that cannot work together: refused before the work starts --------------------------------------------

def test_align_pool_must_divide_the_size(world, tmp_path):
    expect([*_command(world, tmp_path, "align"), "--size", "64", "--pool", "7"], "pool 7 must divide")


def test_align_refuses_too_few_pooled_cells(world, tmp_path):
    expect([*_command(world, tmp_path, "align"), "--size", "64", "--pool", "16"], "4 x 4 cells", "at most 8")
    assert not (tmp_path / "out").exists()


def test_masks_refuse_cams_too_coarse(world, tmp_path):
    expect(["masks", world.data, "--out", tmp_path / "out", "--cache", world.cache, "--checkpoint",
            world.files / "coarse.pt"], "2 x 2", "--cam-stride 16")


# --- files of the wrong kind: an error naming the file ---------------------------------------------------------------

# each edited or damaged model file, and the words its error must hold
EDITED_MODELS = {"model-arch": "classifier arch", "model-stride": "classifier cam_stride", "model-size": "its size",
                 "model-missing": "classifier weights", "model-unsealed-missing": "fc.bias",
                 "model-nan-var": "NaN or infinite", "model-negative-var": "negative BatchNorm variances",
                 "model-masks-grid": "64 x 32"}
EDITED = {**EDITED_MODELS, "checkpoint-stride": "config cam_stride", "alignment-nan": "NaN or infinite",
          "masks-grid": "masks of 64 x 32 per class", "masks-one": "masks of 1 x 1 per class"}
FILE_CASES = [("train", "--init", k) for k in ("empty", "garbage", "text", "list", "truncated", "masks", "alignment",
                                                "mismatched", "weights", "nan", "runs-code")] + \
    [("train", "--aligned", k) for k in ("empty", "garbage", "checkpoint", "masks")] + \
    [("train", "--masks", k) for k in ("empty", "garbage", "checkpoint", "masks-huge", "masks-negative",
                                       "masks-shape", "masks-grid", "masks-one")] + \
    [("train", "--weights", k) for k in ("empty", "garbage", "text", "list", "checkpoint", "masks")] + \
    [("align", "--perceptual", k) for k in ("empty", "garbage", "masks", "alignment")] + \
    [("masks", "--checkpoint", k) for k in ("empty", "garbage", "masks", "alignment", "settings", "runs-code")] + \
    [("masks", "--anchor", k) for k in ("empty", "garbage", "checkpoint")] + \
    [("eval", "--checkpoint", k) for k in ("empty", "garbage", "masks", "alignment", "settings", "weights", "nan",
                                           "config-none", "no-size", "runs-code")] + \
    [("eval", "--masks", k) for k in ("garbage", "checkpoint", "masks-grid", "masks-one")] + \
    [("predict", "MODEL", k) for k in ("empty", "garbage", "text", "masks", "model-size-0", "model-size-huge",
                                       "model-size-text", "model-classifier-none", "runs-code", *EDITED_MODELS)] + \
    [("eval", "--checkpoint", k) for k in (*EDITED_MODELS, "checkpoint-stride")] + \
    [("export", "SOURCE", k) for k in (*EDITED_MODELS, "checkpoint-stride")] + \
    [("train", "--init", k) for k in ("model-stride", "model-nan-var", "checkpoint-stride")] + \
    [("train", "--aligned", "alignment-nan"), ("align", "--perceptual", "model-negative-var")] + \
    [("export", "SOURCE", k) for k in ("empty", "garbage", "masks", "settings", "weights", "config-none", "no-size",
                                       "runs-code")]


@pytest.mark.parametrize("command, where, kind", FILE_CASES, ids=[" ".join(c) for c in FILE_CASES])
def test_files_of_the_wrong_kind_are_named(world, tmp_path, command, where, kind):
    path, out = file_of(world, kind), tmp_path / "out"
    if command == "train":
        args = ["train", world.data, "--out", out, "--cache", world.cache, *SMALL_RUN, where, path] + \
            (["--arch", "resnet34"] if kind == "mismatched" else [])  # its config's arch, another arch's weights
    elif command == "align":
        args = ["align", world.data, "--out", out, "--cache", world.cache, "--size", "64", "--pool", "8", "--epochs",
                "1", "--max-steps", "1", "--input-size", "32", "--batch", "8", "--split", "patients", where, path]
    elif command == "masks":
        args = ["masks", world.data, "--out", out, "--cache", world.cache, where, path] + \
            (["--pseudo", "--size", "64"] if where == "--anchor" else [])
    elif command == "eval":
        args = ["eval", world.data, "--out", out, "--cache", world.cache, "--checkpoint",
                f"m={path if where == '--checkpoint' else world.kinds['checkpoint']}"] + \
            (["--masks", f"x={path}"] if where == "--masks" else [])
    elif command == "predict":
        args = ["predict", path, world.data / "images", "--out", out]
    else:
        args = ["export", path, "--out", out / "model.pt"]
    expect(args, str(path), *(["objects besides tensors"] if kind == "runs-code" else []),
           *([EDITED[kind]] if kind in EDITED else []))
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    assert not (world.files / "ran").exists()  # never unpickled with its code


# --- data problems: counted and named (file and line), left out only with --skip-problems ---------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (a decompression bomb's header) with one tiny IDAT."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _mutated(world, tmp_path, mutate) -> Path:
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    mutate(data)
    return data


def _rewrite(path: Path, change) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(change(lines)) + "\n")


def _entry(data):
    return data / "Data_Entry_2017.csv"


def _boxes(data):
    return data / "BBox_List_2017.csv"


def _first_image(data) -> str:
    return _entry(data).read_text().splitlines()[1].split(",")[0]


def _box_row(data, x, y, w, h) -> None:
    lines = _boxes(data).read_text().splitlines()
    image = lines[1].split(",")[0] if len(lines) > 1 else _first_image(data)
    _boxes(data).write_text("\n".join(lines + [f"{image},Mass,{x},{y},{w},{h},,,"]) + "\n")


DATA_CASES = {
    "non-UTF-8 byte": (lambda d: _entry(d).write_bytes(_entry(d).read_bytes().replace(b"\n", b"\n\xff", 3)[:]),
                       "prepare", ["Data_Entry_2017.csv:2", "not UTF-8"]),
    "duplicated row": (lambda d: _rewrite(_entry(d), lambda ls: ls + [ls[1]]), "prepare",
                       ["1 duplicated rows", "Data_Entry_2017.csv:"]),
    "contradictory row": (lambda d: _rewrite(_entry(d), lambda ls: ls + [ls[1].replace(ls[1].split(",")[1],
                                                                                         "Hernia", 1)]),
                          "prepare", ["1 contradictory rows"]),
    "header lacks columns": (lambda d: _rewrite(_entry(d), lambda ls: ["Image,Labels"] + ls[1:]), "prepare",
                             ["header lacks the columns"]),
    "empty Data_Entry": (lambda d: _entry(d).write_text(""), "prepare", ["empty file"]),
    "no Data_Entry": (lambda d: _entry(d).unlink(), "prepare", ["no Data_Entry_2017.csv"]),
    "unknown label": (lambda d: _rewrite(_entry(d), lambda ls: [ls[0], ls[1].replace(ls[1].split(",")[1], "Flu", 1),
                                                                *ls[2:]]), "prepare", ["unknown labels", "Flu"]),
    "bad patient ID": (lambda d: _rewrite(_entry(d), lambda ls: [ls[0], ",".join(
        v if i != 3 else "abc" for i, v in enumerate(ls[1].split(","))), *ls[2:]]), "prepare", ["Patient ID 'abc'"]),
    "missing image": (lambda d: (d / "images" / _first_image(d)).unlink(), "prepare", ["but missing"]),
    "negative box": (lambda d: _box_row(d, -40, 10, 100, 100), "prepare", ["boxes outside the image"]),
    "box past the edge": (lambda d: _box_row(d, 1000, 10, 100, 100), "eval", ["boxes outside the image"]),
    "duplicated box": (lambda d: _rewrite(_boxes(d), lambda ls: ls + [ls[1]]), "prepare", ["duplicated box rows"]),
    "box unknown label": (lambda d: _rewrite(_boxes(d), lambda ls: ls + [ls[1].replace(ls[1].split(",")[1], "Flu")]),
                          "prepare", ["box rows with unknown labels"]),
    "box not numeric": (lambda d: _box_row(d, "x", 1, 2, 3), "prepare", ["malformed box rows", "non-numeric"]),
    "box of zero width": (lambda d: _box_row(d, 10, 10, 0, 30), "prepare", ["malformed box rows"]),
    "image in both lists": (lambda d: (d / "test_list.txt").write_text(
        (d / "test_list.txt").read_text() + _first_image(d) + "\n") if _first_image(d) not in (
        d / "test_list.txt").read_text() else (d / "train_val_list.txt").write_text(
        (d / "train_val_list.txt").read_text() + _first_image(d) + "\n"), "train",
        ["images in both train_val_list.txt and test_list.txt"]),
    "image in neither list": (lambda d: [_rewrite(d / f, lambda ls: [x for x in ls if x != _first_image(d)])
                                         for f in ("train_val_list.txt", "test_list.txt")], "train",
                              ["images in neither train_val_list.txt nor test_list.txt"]),
    "non-UTF-8 list": (lambda d: (d / "test_list.txt").write_bytes(b"a.png\n\xfe\xff\n"), "train",
                       ["test_list.txt:2", "not UTF-8"]),
    "truncated PNG": (lambda d: (d / "images" / _first_image(d)).write_bytes(
        (d / "images" / _first_image(d)).read_bytes()[:60]), "prepare", ["could not be decoded"]),
    "decompression bomb": (lambda d: (d / "images" / _first_image(d)).write_bytes(_png_header(100000, 100000)),
                           "prepare", ["could not be decoded"]),
    "text named .png": (lambda d: (d / "images" / _first_image(d)).write_text("not an image"), "prepare",
                        ["could not be decoded"]),
    "empty box file": (lambda d: _boxes(d).write_text(""), "prepare", ["BBox_List_2017.csv: empty file"]),
    "box file a folder": (lambda d: (_boxes(d).unlink(), _boxes(d).mkdir()), "prepare",
                          ["BBox_List_2017.csv: not a file"]),
    "header only": (lambda d: _rewrite(_entry(d), lambda ls: ls[:1]), "prepare", ["lists no images"]),
    "image not listed": (lambda d: shutil.copy(d / "images" / _first_image(d), d / "images" / "00099999_000.png"),
                         "prepare", ["images not listed in Data_Entry_2017.csv", "00099999_000.png"]),
    "dangling link": (lambda d: ((d / "images" / _first_image(d)).unlink(),
                                 (d / "images" / _first_image(d)).symlink_to(d / "nowhere.png")), "prepare",
                      ["but missing"]),
    "negative patient ID": (lambda d: _rewrite(_entry(d), lambda ls: [ls[0], ",".join(
        v if i != 3 else "-4" for i, v in enumerate(ls[1].split(","))), *ls[2:]]), "prepare", ["Patient ID '-4'"]),
    "test list a folder": (lambda d: ((d / "test_list.txt").unlink(), (d / "test_list.txt").mkdir()), "train",
                           ["test_list.txt: cannot be read"]),
    "cache in the data folder": (lambda d: None, "prepare-into-data", ["its images folder"]),
    "1 x 1 PNG": (lambda d: _tiny_png(d / "images" / _first_image(d)), "prepare",
                  ["could not be decoded", "1 x 1 pixels, too small to be an X-ray"]),
}


def _tiny_png(path: Path) -> None:
    from PIL import Image

    Image.new("L", (1, 1), 200).save(path, format="PNG")


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_data_problems_are_reported_by_name(world, tmp_path, case):
    mutate, command, fragments = DATA_CASES[case]
    data = _mutated(world, tmp_path, mutate)
    cache = tmp_path / "cache"
    if command.startswith("prepare"):
        cache = data / "images" if command == "prepare-into-data" else cache
        args = ["prepare", data, "--cache", cache, "--size", "64", "--workers", "1"]
    elif command == "train":
        args = ["train", data, "--out", tmp_path / "out", "--cache", cache, *SMALL_RUN[:-4]]
    else:
        args = ["eval", data, "--checkpoint", f"m={world.kinds['checkpoint']}", "--out", tmp_path / "out", "--cache",
                cache, "--split", "all", "--allow-overlap"]
    expect(args, *fragments)
    assert not (tmp_path / "out").exists()


def test_split_lists_are_checked_only_where_a_split_uses_them(world, tmp_path):
    from dmfast.data.formats import open_dataset

    data = _mutated(world, tmp_path, DATA_CASES["image in both lists"][0])
    expect(["prepare", data, "--cache", tmp_path / "cache", "--size", "64", "--workers", "1"], code=0)
    assert not open_dataset(data, lists=False).problems
    expect(["train", data, "--out", tmp_path / "run", "--cache", tmp_path / "cache", *SMALL_RUN[:-4]],
           "images in both train_val_list.txt and test_list.txt")


def test_skip_problems_leaves_the_bad_rows_out(world, tmp_path):
    data = _mutated(world, tmp_path, lambda d: (_rewrite(_entry(d), lambda ls: ls + [ls[1], ls[2].replace(
        ls[2].split(",")[1], "Hernia", 1)]), _box_row(d, -40, 10, 100, 100)))
    output = expect(["prepare", data, "--cache", tmp_path / "cache", "--size", "64", "--workers", "1",
                     "--skip-problems"], "duplicated", "contradictory", "outside", code=0)
    from dmfast.data.formats import open_dataset

    dataset = open_dataset(data, skip_problems=True)
    second = _entry(data).read_text().splitlines()[2].split(",")[0]
    assert second not in dataset.images and len(dataset.images) == len(set(dataset.images)) == 59, output


def test_listed_images_the_folder_lacks_are_counted_not_refused(world, tmp_path):
    from dmfast.data.formats import open_dataset
    from dmfast.data.splits import make_splits, summary

    data = _mutated(world, tmp_path, lambda d: (d / "test_list.txt").write_text(
        (d / "test_list.txt").read_text() + "99999999_000.png\n99999999_001.png\n"))
    dataset = open_dataset(data)
    assert "the lists name 2 more images this folder does not have" in summary(dataset, make_splits(dataset),
                                                                               "official")
    (data / "test_list.txt").unlink()  # one list alone: what it leaves out is said
    dataset = open_dataset(data)
    said = summary(dataset, make_splits(dataset), "official")
    assert "no test images" in said and f"{len(dataset.images) - len(dataset.train_val)} images are in neither" in said


def test_a_folder_given_as_data_or_a_file_as_folder(world, tmp_path):
    (tmp_path / "plain").write_text("x")
    expect(["prepare", tmp_path / "plain"], "DATA_DIR", code=2)
    expect(["prepare", world.data, "--cache", tmp_path / "plain" / "cache"], "is a file, not a folder")
    expect(["train", world.data, "--out", tmp_path / "plain" / "run", "--cache", world.cache, *SMALL_RUN],
           "is a file, not a folder")
    expect(["eval", world.data, "--checkpoint", f"m={world.kinds['checkpoint']}", "--out", tmp_path / "o",
            "--images", tmp_path / "plain"], "--images", "not images of")
    (tmp_path / "blank").write_text("\n")
    expect(["eval", world.data, "--checkpoint", f"m={world.kinds['checkpoint']}", "--out", tmp_path / "o",
            "--images", tmp_path / "blank", "--cache", world.cache], "no image names")


def test_predict_lists_images_too_small_to_be_xrays(world, tmp_path):
    from dmfast.testing import write_dicom

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(world.data / "images" / _first_image(world.data), inputs / "chest.png")
    _tiny_png(inputs / "dot.png")
    write_dicom(inputs / "dot.dcm", torch.full((1, 1), 300, dtype=torch.int16).numpy().astype("uint16"))
    expect(["predict", world.kinds["model"], inputs, "--out", tmp_path / "out"], "2 files left out",
                    code=0)
    problems = (tmp_path / "out" / "problems.csv").read_text()
    assert problems.count("1 x 1 pixels, too small to be an X-ray (a side of at least 32 px)") == 2, problems
    assert "dot.png" in problems and "dot.dcm" in problems


def test_empty_and_truncated_files_are_named_for_what_they_are(world, tmp_path):
    from dmfast.testing import write_dicom

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(world.data / "images" / _first_image(world.data), inputs / "chest.png")
    (inputs / "empty.png").write_bytes(b"")
    whole = write_dicom(tmp_path / "whole.dcm", torch.full((64, 64), 300, dtype=torch.int32).numpy().astype("uint16"))
    (inputs / "cut.dcm").write_bytes(whole.read_bytes()[:-2000])  # uncompressed, its pixel data cut short
    output = expect(["predict", world.kinds["model"], inputs, "--out", tmp_path / "out"], code=0)
    problems = (tmp_path / "out" / "problems.csv").read_text()
    assert "empty.png,an empty file" in problems, problems
    cut = next(line for line in problems.splitlines() if "cut.dcm" in line)
    assert "truncated or damaged" in cut and "pip install" not in cut, cut
    assert "2 files left out: 2 of the 3 X-ray files could not be read, 0 other files" in " ".join(output.split())


def test_synth_help_names_only_its_own_arguments():
    help_text = invoke("synth", "--help").output
    assert "OUT_DIR" in help_text and "--out " not in help_text and "in --out" not in help_text


# --- runs are never overwritten or appended to ----------------------------------------------------------------------

def test_runs_are_never_overwritten_without_asking(world, tmp_path):
    run = world.root / "run"
    before = (run / "checkpoint.pt").read_bytes(), (run / "metrics.jsonl").read_text()
    train = ["train", world.data, "--out", run, "--cache", world.cache, *SMALL_RUN]
    expect(train, "already holds", "--overwrite", "--resume")
    expect([*train, "--resume", "--overwrite"], "give one of them")
    expect([*train, "--resume", "--arch", "resnet34"], "arch", "resnet18")
    assert ((run / "checkpoint.pt").read_bytes(), (run / "metrics.jsonl").read_text()) == before
    expect(["train", world.data, "--out", tmp_path / "none", "--cache", world.cache, "--resume"],
           f"--resume: {tmp_path / 'none'}: no such run folder")
    expect(["align", world.data, "--out", world.root / "align", "--cache", world.cache, "--size", "64", "--pool", "8"],
           "already holds", "alignment.pt")
    expect(["masks", world.data, "--out", world.root / "masks", "--pseudo", "--cache", world.cache], "already holds")
    expect(["export", run, "--out", run / "model.pt"], "already holds")
    expect(["synth", world.data], "already holds", "Data_Entry_2017.csv")
    for folder, command, name in ((tmp_path / "p", ["predict", world.kinds["model"], world.data / "images"],
                                   "predictions.csv"),
                                  (tmp_path / "e", ["eval", world.data, "--checkpoint",
                                                    f"m={world.kinds['checkpoint']}"], "eval.json"),
                                  (tmp_path / "d", ["demo"], "demo.json")):
        folder.mkdir()
        (folder / name).write_text("earlier\n")
        expect([*command, "--out", folder], "already holds", name)
        assert (folder / name).read_text() == "earlier\n"


def test_resume_keeps_the_runs_settings_and_epochs(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.root / "run", run)
    train = ["train", world.data, "--out", run, "--cache", world.cache, "--resume"]
    expect([*train, "--size", "512"], "size = 64")  # a default value given explicitly still counts
    expect([*train, "--epochs", "2", "--max-steps", "1", "--batch", "16"], "batch = 8")
    expect(train, code=0)  # no --epochs: the run's own (1, done), not the default 5
    assert checkpoints.load(run / "checkpoint.pt", checkpoints.CLASSIFIER)["config"]["epochs"] == 1
    expect([*train, "--epochs", "2"], code=0)
    expect([*train, "--epochs", "1"], "has trained 2 epochs already")


def test_export_never_replaces_a_training_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.root / "run", run)
    for target in ("checkpoint.pt", "best.pt"):
        expect(["export", run, "--out", run / target, "--overwrite"], "training checkpoint")
    assert checkpoints.load(run / "checkpoint.pt", checkpoints.CLASSIFIER)


def test_eval_refuses_a_name_given_twice_and_images_with_a_split(world, tmp_path):
    checkpoint = world.kinds["checkpoint"]
    expect(["eval", world.data, "--checkpoint", f"m={checkpoint}", "--checkpoint", f"m={checkpoint}", "--out",
            tmp_path / "e", "--cache", world.cache], "given twice: m")
    expect(["eval", world.data, "--checkpoint", f"m={checkpoint}", "--out", tmp_path / "e", "--images",
            world.files / "test-names.txt", "--split", "all"], "not both", code=2)


def test_patient_split_follows_the_patient_id_column(world, tmp_path):
    from dmfast.data.formats import open_dataset
    from dmfast.data.splits import make_splits

    def renumber(d):  # patients unrelated to the file names: 7 patients, every name prefix split among them
        _rewrite(_entry(d), lambda ls: [ls[0]] + [",".join(v if i != 3 else str(n % 7) for i, v in
                                                           enumerate(line.split(","))) for n, line in enumerate(ls[1:])])
    dataset = open_dataset(_mutated(world, tmp_path, renumber))
    splits = make_splits(dataset, 0.3, seed=2, split="patients")
    patient = {r.image: r.patient for r in dataset.records}
    sides = [{patient[n] for n in names} for names in (splits.train, splits.val, splits.test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2]), sides


def test_a_copied_data_folder_keeps_its_own_default_cache(world, tmp_path):
    data = _mutated(world, tmp_path, lambda d: None)
    expect(["prepare", data, "--size", "64", "--workers", "1"], code=0)
    shutil.copytree(data, tmp_path / "copy", symlinks=True)
    expect(["prepare", tmp_path / "copy", "--size", "64", "--workers", "1"], code=0)
    from dmfast.data.cache import open_or_prepare

    assert len(open_or_prepare(tmp_path / "copy", size=64)) == 60


def test_overwrite_replaces_and_removes_stale_temporaries(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world.root / "run", out)
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"x" * 1000)  # left by a write killed mid-way
    (out / "notes.txt").write_text("mine")
    expect(["train", world.data, "--out", out, "--cache", world.cache, *SMALL_RUN, "--overwrite"], code=0)
    assert not (out / ".checkpoint.pt.abc.tmp").exists() and (out / "notes.txt").read_text() == "mine"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_predict_removes_temporaries_of_a_killed_predict_whatever_it_writes(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cams.npz.999999.k2j4_x9a.tmp").write_bytes(b"x" * 1000)  # a predict --cams killed at its rename
    (out / ".notes.txt.tmp").write_text("mine")  # not a temporary of dmfast's: kept
    expect(["predict", world.kinds["model"], world.data / "images" / _first_image(world.data), "--out", out], code=0)
    assert not (out / ".cams.npz.999999.k2j4_x9a.tmp").exists() and (out / ".notes.txt.tmp").read_text() == "mine"


def test_predict_into_its_input_folder_says_so(world, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(world.data / "images", inputs)
    for out in (inputs, tmp_path):
        expect(["predict", world.kinds["model"], inputs, "--out", out],
               f"--out {out}: the input folder {inputs} is --out or inside it")


def test_library_warnings_are_one_line_notes_naming_the_file(world, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the 64 x 64 phantom passes Pillow's bomb limit
    image = world.data / "images" / _first_image(world.data)
    output = expect(["predict", world.kinds["model"], image, "--out", tmp_path / "out"], code=0)
    note = next(line for line in output.splitlines() if line.startswith("note: "))
    assert note == (f"note: {image}: Image size (4096 pixels) exceeds limit of 3000 pixels, could be decompression "
                    "bomb DOS attack. (PIL)"), output
    assert "Warning" not in output


def test_a_bad_anchor_is_refused_before_a_cache_is_built(world, tmp_path):
    cache = tmp_path / "cache"
    expect(["masks", world.data, "--out", tmp_path / "out", "--pseudo", "--anchor", world.files / "garbage.pt",
            "--cache", cache], f"{world.files / 'garbage.pt'}: not a readable anchor")
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_eval_refuses_training_images_unless_allowed(world, tmp_path):
    args = ["eval", world.data, "--checkpoint", f"m={world.kinds['checkpoint']}", "--out", tmp_path / "e", "--cache",
            world.cache, "--split", "all", "--bootstrap", "0", "--overlays", "0"]
    expect(args, "share a name", "--allow-overlap")
    expect([*args, "--allow-overlap"], "warning", code=0)


def test_unknown_patient_overlap_is_a_warning_or_with_strict_an_error(world, tmp_path):
    args = ["eval", world.data, "--checkpoint", f"m={world.files / 'elsewhere.pt'}", "--cache", world.cache,
            "--images", world.files / "test-names.txt", "--bootstrap", "0", "--overlays", "0"]
    expect([*args, "--out", tmp_path / "a"], "an unknown number", code=0)
    expect([*args, "--out", tmp_path / "b", "--strict"], "an unknown number", "(--strict)")


def test_another_folders_cache_is_never_used_or_rebuilt(world, tmp_path):
    data = _mutated(world, tmp_path, lambda d: None)  # the same images, another folder
    before = (world.cache / "index.json").read_text()
    expect(["prepare", data, "--cache", world.cache, "--size", "64"], "holds the images of", "another --cache")
    expect(["train", data, "--out", tmp_path / "run", "--cache", world.cache, *SMALL_RUN], "holds the images of")
    assert (world.cache / "index.json").read_text() == before


def test_train_skip_problems_finishes_a_cache_left_incomplete(world, tmp_path):
    data = _mutated(world, tmp_path, DATA_CASES["truncated PNG"][0])
    cache = tmp_path / "cache"
    expect(["prepare", data, "--cache", cache, "--size", "64", "--workers", "1"], "could not be decoded")
    expect(["train", data, "--out", tmp_path / "run", "--cache", cache, *SMALL_RUN], "incomplete", "--skip-problems")
    expect(["train", data, "--out", tmp_path / "run", "--cache", cache, *SMALL_RUN, "--skip-problems"], code=0)
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.parametrize("kind", [RuntimeError, ValueError, KeyError])
def test_an_unforeseen_error_saves_its_traceback(monkeypatch, tmp_path, kind):
    """Anything but dmfast's errors (and the system's OSError) is a bug, wherever it is raised: a ValueError from
    dmfast's own code too (no guessing from the traceback)."""
    import dmfast.phantom

    def broken(*args, **kwargs):
        raise kind("something nobody foresaw")

    broken.__code__ = broken.__code__.replace(co_filename=dmfast.phantom.__file__)  # as if raised in dmfast
    monkeypatch.setattr(dmfast.phantom, "synthesize", broken)
    monkeypatch.setattr("cli.main.synthesize", broken)
    result = invoke("synth", tmp_path / "x")
    assert result.code == 1 and "Traceback" not in result.output
    assert f"unexpected {kind.__name__}: " in result.output and "something nobody foresaw" in result.output
    saved = Path(result.output.split("the traceback is in ")[1].split(")")[0])
    assert "Traceback" in saved.read_text() and "something nobody foresaw" in saved.read_text()


@pytest.mark.parametrize("kind", [dmfast.errors.SettingsError, dmfast.errors.DataError, dmfast.errors.ImageError,
                                  dmfast.errors.DicomError, dmfast.errors.ModelFileError])
def test_dmfast_errors_are_one_line_wherever_raised(monkeypatch, tmp_path, kind):
    """Every kind of dmfast.Error is about the input: ``error: ...`` and exit 1, raised from any module."""
    assert issubclass(kind, dmfast.Error)

    def refused(*args, **kwargs):
        raise kind("x.png: what is wrong with it")

    monkeypatch.setattr("cli.main.synthesize", refused)
    result = invoke("synth", tmp_path / "x")
    assert result.code == 1 and result.output.strip() == "error: x.png: what is wrong with it"


# --- ops: every argument error names the argument ------------------------------------------------------------------

def _images(shape=(2, 1, 16, 16), dtype=torch.float32):
    return torch.rand(shape, dtype=dtype)


IDENTITY = torch.eye(2, 3).expand(2, 2, 3).contiguous()
OP_CASES = {
    "affine_smooth images 3-d": (lambda: ops.affine_smooth(_images()[0], IDENTITY, 4), "images must be [B, C, H, W]"),
    "affine_smooth theta shape": (lambda: ops.affine_smooth(_images(), IDENTITY[:, :, :2], 4), "theta must be"),
    "affine_smooth batch": (lambda: ops.affine_smooth(_images((3, 1, 16, 16)), IDENTITY, 4), "batch sizes"),
    "affine_smooth pool 0": (lambda: ops.affine_smooth(_images(), IDENTITY, 0), "pool must be in [1, 65536]"),
    "affine_smooth pool 7": (lambda: ops.affine_smooth(_images(), IDENTITY, 7), "divisible by pool=7"),
    "affine_smooth pool float": (lambda: ops.affine_smooth(_images(), IDENTITY, 4.0), "pool must be an int"),
    "affine_smooth int images": (lambda: ops.affine_smooth(_images().long(), IDENTITY, 4), "images must be float"),
    "affine_smooth theta dtype": (lambda: ops.affine_smooth(_images(), IDENTITY.double(), 4), "theta dtype"),
    "affine_smooth empty": (lambda: ops.affine_smooth(_images((2, 0, 16, 16)), IDENTITY, 4), "C, H and W > 0"),
    "affine_smooth half on CPU": (lambda: ops.affine_smooth(_images().half(), IDENTITY, 4), "on CPU"),
    "cam_boxes size of one": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32,), 0.5), "size must be (H, W)"),
    "cam_boxes size of three": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32, 3), 0.5), "size must be (H, W)"),
    "cam_boxes size float": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32.5, 32), 0.5), "size must be (H, W)"),
    "cam_boxes size zero": (lambda: ops.cam_boxes(_images((2, 8, 8)), (0, 32), 0.5), "size must be (H, W)"),
    "cam_boxes huge max_boxes": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), 0.5, 2**40), "max_boxes"),
    "cam_boxes max_boxes 0": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), 0.5, 0), "max_boxes"),
    "cam_boxes max_boxes float": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), 0.5, 2.5), "max_boxes"),
    "cam_boxes threshold 2": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), 2.0), "thresholds"),
    "cam_boxes threshold nan": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), float("nan")), "thresholds"),
    "cam_boxes threshold text": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), "high"), "threshold"),
    "cam_boxes no thresholds": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), []), "at least one threshold"),
    "cam_boxes 1-d maps": (lambda: ops.cam_boxes(_images((8,)), (32, 32), 0.5), "cams must be"),
    "cam_boxes int maps": (lambda: ops.cam_boxes(_images((2, 8, 8)).long(), (32, 32), 0.5), "cams must be float"),
    "cam_boxes score": (lambda: ops.cam_boxes(_images((2, 8, 8)), (32, 32), 0.5, 1, "median"), "score must be"),
    "cam_boxes not maps": (lambda: ops.cam_boxes("maps", (32, 32), 0.5),
                           "cams must be a tensor or a numpy array"),
    "mask_attention shapes": (lambda: ops.mask_attention(_images((2, 4, 8, 8)), _images((2, 3, 8, 8))), "broadcast"),
    "mask_attention dtype": (lambda: ops.mask_attention(_images((2, 4, 8, 8)), _images((1, 1, 8, 8)).double()),
                             "masks has dtype"),
    "mask_attention 3-d": (lambda: ops.mask_attention(_images((4, 8, 8)), _images((1, 8, 8))), "features must be"),
    "attention_cam weight": (lambda: ops.attention_cam(_images((2, 4, 8, 8)), _images((3, 5)), _images((3,))),
                             "weight must be [C, K]"),
    "attention_cam bias": (lambda: ops.attention_cam(_images((2, 4, 8, 8)), _images((3, 4)), _images((2,))),
                           "bias must be [C]"),
    "attention_cam masks": (lambda: ops.attention_cam(_images((2, 4, 8, 8)), _images((3, 4)), _images((3,)),
                                                      _images((2, 8, 8))), "masks must be"),
    "cam_boxes size beyond 2^16": (lambda: ops.cam_boxes(_images((2, 8, 8)), (2**31, 2**31), 0.5), "in [1, 65536]"),
    "cam_boxes size beyond int64": (lambda: ops.cam_boxes(_images((2, 8, 8)), (2**63, 4), 0.5), "in [1, 65536]"),
    "cam_boxes many thresholds": (lambda: ops.cam_boxes(_images((2, 8, 8)), (8, 8), [0.5] * 100000), "at most 256"),
    "affine_smooth huge pool": (lambda: ops.affine_smooth(_images(), IDENTITY, 2**70), "pool must be in"),
    "affine_smooth images None": (lambda: ops.affine_smooth(None, IDENTITY, 4), "images must be a tensor"),
    "affine_smooth theta list": (lambda: ops.affine_smooth(_images(), IDENTITY.tolist(), 4), "theta must be a tensor"),
    "affine_inverse singular": (lambda: ops.affine_inverse(torch.zeros(1, 2, 3)), "singular"),
    "affine_inverse shape": (lambda: ops.affine_inverse(torch.zeros(1, 3, 3)), "[..., 2, 3]"),
    "attention_cam dtype": (lambda: ops.attention_cam(_images((2, 4, 8, 8)), _images((3, 4)).double(),
                                                      _images((3,)).double()), "weight has dtype"),
}


@pytest.mark.parametrize("case", OP_CASES, ids=list(OP_CASES))
def test_op_argument_errors_name_the_argument(case):
    call, fragment = OP_CASES[case]
    with pytest.raises((RuntimeError, ValueError, TypeError)) as error:
        call()
    assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e7, 1e38, -3e38])
def test_theta_outside_the_domain_is_a_nan_result_never_a_crash(value):
    theta = IDENTITY.clone()
    theta[1, 1, 0] = value
    out = ops.affine_smooth(_images(), theta, 4)
    assert out[1].isnan().all() and out[0].isfinite().all()
