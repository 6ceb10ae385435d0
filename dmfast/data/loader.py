"""Training batches gathered ahead of the model: a background thread reads each batch's uint8 pixels from the
image cache (and its labels), pins them when they go to a CUDA device, and keeps a few batches queued, so reading
overlaps with the step that uses the batch before. The batches arrive on the device as uint8 (a quarter of the
float32 bytes, a twelfth of three float32 channels); normalisation happens there (``to_model_input``)."""

import queue
import threading
import time

import numpy as np
import torch

PREFETCH = 3  # batches queued ahead: enough to hide a slow read behind one step, little memory


class BatchLoader:
    """``for pixels, targets in BatchLoader(cache, batches, labels, device)``: ``pixels`` uint8 ``[B, 1, S, S]``
    and ``targets [B, C]`` (the ``labels`` of each name, stacked as they are; None without ``labels``) on
    ``device``, batch after batch of ``batches`` (lists of image names), in order. ``wait_seconds`` is the time the consumer spent waiting for a
    batch that was not ready yet (the part of the step time loading did not hide). An error while reading is
    raised in the consumer at the batch it concerns; leaving the loop early stops the thread."""

    def __init__(self, cache, batches: list, labels: dict | None, device, prefetch: int = PREFETCH):
        self.cache, self.batches, self.labels = cache, batches, labels
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.prefetch = max(1, prefetch)
        self.wait_seconds = 0.0

    def _read(self, names: list) -> tuple:
        pixels = self.cache.batch(names)
        targets = None if self.labels is None else torch.from_numpy(np.stack([self.labels[n] for n in names]))
        if self.pin:
            pixels = pixels.pin_memory()
            targets = None if targets is None else targets.pin_memory()
        return pixels, targets

    def __iter__(self):
        ready, stop = queue.Queue(self.prefetch), threading.Event()

        def produce():
            for names in self.batches:
                try:
                    item = (self._read(names), None)
                except BaseException as error:  # handed to the consumer, raised there
                    item = (None, error)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or item[1] is not None:
                    return

        thread = threading.Thread(target=produce, name="dmfast-batch-loader", daemon=True)
        thread.start()
        try:
            for _ in self.batches:
                started = time.perf_counter()
                item, error = ready.get()
                self.wait_seconds += time.perf_counter() - started
                if error is not None:
                    raise error
                pixels, targets = item
                yield (pixels.to(self.device, non_blocking=True),
                       None if targets is None else targets.to(self.device, non_blocking=True))
        finally:
            stop.set()
            thread.join()
