"""One writer per output folder: two real ``dmfast`` processes into one folder, the first paused mid-write
(``DMFAST_PAUSE_AT``, :func:`dmfast.io.kill_point`): the second is refused at once, naming the first's process, and
the first finishes with its own outputs; a writer killed with ``kill -9`` leaves a lock the next run takes over."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmfast.io import WRITER_LOCK
from dmfast.testing import phantom_with_cache

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--arch", "resnet18", "--size", "64", "--cam-stride", "16", "--batch", "8", "--epochs", "1",
         "--max-steps", "1", "--split", "patients", "--val-fraction", "0.2"]


def command(*args) -> list:
    return [sys.executable, "-m", "cli.main", *map(str, args)]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMFAST_KILL", "DMFAST_PAUSE"))}
    return {**env, **extra}


class Paused:
    """A ``dmfast`` process stopped at ``site`` (``SITE:N``) until :meth:`go` lets it finish."""

    def __init__(self, tmp_path: Path, site: str, *args):
        self.flag = tmp_path / f"paused-{time.monotonic_ns()}"
        self.process = subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=environment(DMFAST_PAUSE_AT=site,
                                                                   DMFAST_PAUSE_FILE=str(self.flag)))
        deadline = time.monotonic() + 300
        while not self.flag.exists():
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, "the first writer never reached its pause"
            time.sleep(0.05)

    def go(self) -> subprocess.CompletedProcess:
        self.flag.unlink()
        output, _ = self.process.communicate(timeout=600)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, output)


def second(*args) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, env=environment(), timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-writer")
    data, cache = phantom_with_cache(root, count=40, size=64, seed=5)
    run = root / "run"
    result = second("train", data, "--out", run, "--cache", cache, *TRAIN)
    assert result.returncode == 0, result.stderr
    return data, cache, run


def _stages(world, out: Path) -> dict:
    data, cache, run = world
    return {"train": ("rename:checkpoint.pt:1", ["train", data, "--out", out, "--cache", cache, *TRAIN]),
            "eval": ("rename:eval.json:1", ["eval", data, "--out", out, "--cache", cache, "--checkpoint",
                                            f"m={run}", "--bootstrap", "0", "--overlays", "0"]),
            "predict": ("rename:predictions.csv:1", ["predict", run, data / "images", "--out", out]),
            "prepare": ("prepare-chunk:1", ["prepare", data, "--cache", out, "--size", "64", "--workers", "1"])}


@pytest.mark.parametrize("stage", ["train", "eval", "predict", "prepare"])
def test_a_second_writer_into_the_same_folder_is_refused_at_once(world, tmp_path, stage):
    out = tmp_path / "out"
    site, args = _stages(world, out)[stage]
    first = Paused(tmp_path, site, *args)
    refused = second(*args)
    assert refused.returncode == 1, refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {out} is being written by process {first.process.pid} (dmfast {stage}, "
                              "since "), message
    assert "Traceback" not in refused.stderr
    finished = first.go()
    assert finished.returncode == 0, finished.stdout
    assert not (out / WRITER_LOCK).exists()  # released with the run


def test_a_writer_killed_mid_run_leaves_a_lock_the_next_run_takes_over(world, tmp_path):
    out = tmp_path / "out"
    site, args = _stages(world, out)["eval"]
    first = Paused(tmp_path, site, *args)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    assert (out / WRITER_LOCK).exists()  # its record stays; the lock itself went with the process
    again = second(*args, "--overwrite")  # its partial outputs are replaced only when asked
    assert again.returncode == 0, again.stderr
    assert (out / "eval.json").is_file() and not (out / WRITER_LOCK).exists()
