"""The training batch loader: the cache's batches in order on the device, read ahead of the consumer, errors raised
at their batch, and no thread left behind."""

import threading
import time

import numpy as np
import pytest
import torch

from dmfast.data.loader import BatchLoader


class FakeCache:
    """uint8 images whose pixels are their index; records which batches were read."""

    size = 4

    def __init__(self, names):
        self.index = {n: i for i, n in enumerate(names)}
        self.read = []

    def batch(self, names):
        self.read.append(list(names))
        missing = [n for n in names if n not in self.index]
        if missing:
            raise KeyError(f"not in the cache: {missing}")
        values = torch.tensor([self.index[n] for n in names], dtype=torch.uint8)
        return values[:, None, None, None].expand(-1, 1, self.size, self.size).clone()


def _loader_threads() -> int:
    return sum(t.name == "dmfast-batch-loader" for t in threading.enumerate())


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_batches_arrive_in_order_with_their_labels():
    names = [f"im{i}" for i in range(10)]
    labels = {n: np.array([i % 2, -1, 1], dtype=np.int8) for i, n in enumerate(names)}
    batches = [names[0:4], names[4:8], names[8:10], names[3:5]]
    loader = BatchLoader(FakeCache(names), batches, labels, "cpu")
    got = list(loader)
    assert len(got) == 4
    for (pixels, targets), chosen in zip(got, batches):
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(chosen), 1, 4, 4)
        assert pixels[:, 0, 0, 0].tolist() == [int(n[2:]) for n in chosen]
        assert torch.equal(targets, torch.from_numpy(np.stack([labels[n] for n in chosen])))
    assert loader.wait_seconds >= 0 and _wait_for(lambda: _loader_threads() == 0)


def test_batches_are_read_ahead_of_the_consumer():
    names = [f"im{i}" for i in range(20)]
    cache = FakeCache(names)
    loader = iter(BatchLoader(cache, [[n] for n in names], {n: np.zeros(2) for n in names}, "cpu", prefetch=3))
    next(loader)  # while the consumer holds batch 0, the thread fills the queue: three more batches read
    assert _wait_for(lambda: len(cache.read) == 1 + 3 + 1)  # and one more waiting for a place in the queue
    loader.close()  # leaving early stops the thread
    assert _wait_for(lambda: _loader_threads() == 0)
    assert len(cache.read) == 5


def test_a_read_error_is_raised_at_its_batch():
    names = ["a", "b", "c"]
    loader = BatchLoader(FakeCache(names), [["a"], ["b"], ["gone"], ["c"]], {n: np.zeros(1) for n in names + ["gone"]},
                         "cpu")
    seen = []
    with pytest.raises(KeyError, match="gone"):
        for pixels, _ in loader:
            seen.append(int(pixels[0, 0, 0, 0]))
    assert seen == [0, 1]
    assert _wait_for(lambda: _loader_threads() == 0)
