"""A full disk, for real: each stage writing onto a small tmpfs ends in a one-line error naming the path (never a
SIGBUS or a traceback), and leaves nothing a rerun takes for a finished output. Mounting needs root (CI runs as root
on these machines); elsewhere the tests skip, saying why."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmfast.testing import phantom_with_cache

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--arch", "resnet18", "--size", "64", "--cam-stride", "16", "--batch", "8", "--epochs", "1",
         "--max-steps", "1", "--split", "patients", "--val-fraction", "0.2"]


def dmfast(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMFAST_KILL", "DMFAST_PAUSE"))}
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system up to ``leave`` bytes free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-disk")
    data, cache = phantom_with_cache(root, count=40, size=64, seed=3)
    result = dmfast("train", data, "--out", root / "run", "--cache", cache, *TRAIN)
    assert result.returncode == 0, result.stderr
    return data, cache, root / "run"


def refused(result, *fragments) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)  # not 135 (SIGBUS) or a crash
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "unexpected" not in message and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if os.environ.get("DMFAST_SHOW_ANSWERS"):
        print(f"\n{message}")
    return message


def test_prepare_and_a_later_train_on_a_full_disk(world, small_disk):
    data, _, _ = world
    cache = small_disk / "cache"
    refused(dmfast("prepare", data, "--size", "384", "--cache", cache), f"{cache}: no space for the image cache's",
            "5.9 MB needed")  # 40 images of 384 x 384
    assert not (cache / "images.u8").exists()
    again = dmfast("train", data, "--out", small_disk / "run", "--cache", cache, *TRAIN[:2], "--size", "384")
    refused(again, f"{cache}: no space")  # the cache is incomplete: rebuilt, and refused again, never mapped
    assert not (small_disk / "run").exists()


def _temporaries(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


def test_train_on_a_full_disk_names_its_file_and_leaves_no_finished_run(world, small_disk):
    data, cache, _ = world
    out = small_disk / "run"
    refused(dmfast("train", data, "--out", out, "--cache", cache, *TRAIN), str(out), "No space left on device")
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists() and not _temporaries(out)
    rerun = dmfast("train", data, "--out", out, "--cache", cache, *TRAIN, "--resume")  # nothing to resume
    refused(rerun, f"--resume: {out} holds no checkpoint.pt: the run finished no epoch", "--overwrite")


@pytest.mark.parametrize("stage", ["predict", "eval"])
def test_predict_and_eval_on_a_full_disk_name_the_path(world, small_disk, stage):
    data, cache, run = world
    out = small_disk / "out"
    fill(small_disk, 48 * 1024)
    args = ["predict", run, data / "images", "--out", out, "--overlays"] if stage == "predict" else \
        ["eval", data, "--out", out, "--cache", cache, "--checkpoint", f"m={run}", "--bootstrap", "0"]
    refused(dmfast(*args), str(small_disk), "No space left on device")
    finished = {"predict": "predictions.json", "eval": "eval.json"}[stage]
    assert not (out / finished).exists()
    assert not _temporaries(out)
