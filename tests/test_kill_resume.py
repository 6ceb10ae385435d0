"""kill -9 at exact points (``DMFAST_KILL_AT``, :func:`dmfast.io.kill_point`), then resume: the image cache comes
out byte-identical to an uninterrupted build, and training bit-identical to an uninterrupted run, with no
temporary file left behind."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmfast import checkpoints
from dmfast.testing import phantom_with_cache

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--arch", "resnet18", "--size", "64", "--batch", "8", "--epochs", "3", "--max-steps", "2", "--lr", "1e-3",
         "--split", "patients", "--val-fraction", "0.2"]


def dmfast(*args, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DMFAST_KILL_AT"}
    if kill_at:
        env["DMFAST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def killed(result) -> bool:
    return result.returncode == -signal.SIGKILL


def digest(folder: Path) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("images.u8", "done.u8")} | \
        {"index": {k: v for k, v in json.loads((folder / "index.json").read_text()).items() if k != "data_dir"}}


def temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_with_cache(tmp_path_factory.mktemp("kill"), count=72, size=64, seed=4)


def test_prepare_resumes_after_kills_to_the_same_cache(phantom, tmp_path):
    data, straight = phantom
    cache = tmp_path / "cache"
    args = ["prepare", data, "--cache", cache, "--size", "64", "--workers", "1"]
    # Killed writing the first index, after chunks (pixels written, not yet marked done), writing the last index.
    for point in ("rename:index.json:1", "prepare-chunk:1", "prepare-chunk:2", "rename:index.json:1"):
        result = dmfast(*args, kill_at=point)
        assert killed(result), (point, result.stderr[-2000:])
    assert dmfast(*args).returncode == 0
    assert digest(cache) == digest(straight) and not temporaries(cache)


def test_train_resumes_after_kills_bit_identical(phantom, tmp_path):
    data, cache = phantom
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert dmfast("train", data, "--out", straight, "--cache", cache, *TRAIN).returncode == 0
    first = dmfast("train", data, "--out", run, "--cache", cache, *TRAIN, kill_at="rename:checkpoint.pt:2")
    assert killed(first) and temporaries(run)  # killed while writing epoch 2's checkpoint: its temporary stays
    for point in ("rename:metrics.jsonl:1", "rename:model.pt:1", None):
        result = dmfast("train", data, "--out", run, "--cache", cache, *TRAIN, "--resume", kill_at=point)
        assert killed(result) if point else result.returncode == 0, (point, result.stderr[-2000:])
    want, got = (checkpoints.load(folder / "checkpoint.pt", checkpoints.CLASSIFIER) for folder in (straight, run))
    assert got["epoch"] == want["epoch"] == 2
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    lines = [[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
             for folder in (straight, run)]
    assert [(m["epoch"], m["loss"], m["mean_auroc"]) for m in lines[0]] == \
        [(m["epoch"], m["loss"], m["mean_auroc"]) for m in lines[1]]
    assert (run / "model.pt").is_file() and not temporaries(run)


def test_a_kill_before_the_first_checkpoint_is_named_when_resumed(phantom, tmp_path):
    data, cache = phantom
    run = tmp_path / "run"
    assert killed(dmfast("train", data, "--out", run, "--cache", cache, *TRAIN, kill_at="rename:checkpoint.pt:1"))
    assert (run / "best.pt").is_file() and not (run / "checkpoint.pt").exists()
    result = dmfast("train", data, "--out", run, "--cache", cache, *TRAIN, "--resume")
    assert result.returncode == 1
    assert f"--resume: {run} holds no checkpoint.pt: its run stopped while writing its first checkpoint" in \
        result.stderr and f"--init {run / 'best.pt'}" in result.stderr, result.stderr
