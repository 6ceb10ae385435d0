import os
import socket

import pytest
import torch

from dmfast.train import TrainConfig, load_checkpoint, train

from .conftest import phantom_with_cache


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_with_cache(tmp_path_factory, "phantom", count=96, size=64, seed=3)


def config(phantom, out, **overrides):
    data, cache = phantom
    base = dict(data=str(data), out=str(out), cache=str(cache), arch="resnet18", size=64, batch=8, epochs=2,
                max_steps=2, lr=1e-3, split="patients", val_fraction=0.2)
    return TrainConfig(**{**base, **overrides})


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(phantom, tmp_path):
    straight = load_checkpoint(train(config(phantom, tmp_path / "a")))
    train(config(phantom, tmp_path / "b", epochs=1))
    resumed = load_checkpoint(train(config(phantom, tmp_path / "b"), resume=True))
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"mean_auroc"' in lines[-1]
    assert straight["splits"]["train"] and not set(straight["splits"]["train"]) & set(straight["splits"]["val"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_step_matches_one_process(phantom, tmp_path):
    # Frozen BatchNorm: with batch statistics each rank would normalise its half batch differently.
    two = config(phantom, tmp_path / "ddp", epochs=1, max_steps=1, freeze_bn=True)
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), two), nprocs=2, start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = load_checkpoint(train(config(phantom, tmp_path / "single", epochs=1, max_steps=1, freeze_bn=True)))
    finally:
        torch.set_num_threads(threads)
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    # Adam's first step is lr * g / (|g| + eps): elements whose gradient is within rounding of eps may move by a
    # fraction of lr; everything else must agree to rounding.
    close, total = 0, 0
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=1e-2 * two.lr, msg=key)
        close += int(((ddp["model"][key].double() - value.double()).abs() <= 1e-7).sum())
        total += value.numel()
    assert close >= 0.999 * total
