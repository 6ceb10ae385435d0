"""Images per second of loading training batches of 32 at 512 px: from the image cache (``dmfast prepare``)
against decoding the PNGs every time.

    python -m benchmarks.data_loading [--data DIR] [--out results.json]

Uses ../shared/data/chestxray14-sample when present (else a 512 px phantom); the cache is built in a temporary
folder. The cache and PNG paths end in the float [-1, 1] batch the model takes, normalised on the host as training
did before; ``BatchLoader`` delivers the uint8 batches training now moves to the device and normalises there.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmfast.data.cache import ImageCache, prepare
from dmfast.data.formats import open_dataset
from dmfast.data.images import load_gray, to_model_input
from dmfast.data.loader import BatchLoader
from dmfast.testing import shared_data

from .common import environment, parse, parser, report

SAMPLE = shared_data("chestxray14-sample")


def images_per_second(load, names, batch, seconds) -> float:
    rng = np.random.default_rng(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chosen = [names[i] for i in rng.choice(len(names), batch, replace=False)]
        to_model_input(load(chosen))
        count += batch
    return count / (time.perf_counter() - start)


def loader_rate(cache, names, batch, seconds, most: int = 20000) -> float:
    """Images per second that :class:`BatchLoader` delivers (uint8, read ahead in its thread; training normalises
    them on the device) to a consumer that does nothing else: the most it can feed a model."""
    rng = np.random.default_rng(0)
    batches = [[names[i] for i in rng.choice(len(names), batch, replace=False)] for _ in range(most // batch)]
    labels = {n: np.zeros(14, dtype=np.int8) for n in names}
    count, start = 0, time.perf_counter()
    loader = iter(BatchLoader(cache, batches, labels, "cpu"))
    for pixels, _ in loader:
        count += len(pixels)
        if time.perf_counter() - start >= seconds:
            break
    rate = count / (time.perf_counter() - start)
    loader.close()
    return rate


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else SAMPLE
        if not (data / "Data_Entry_2017.csv").exists():
            from dmfast.phantom import synthesize

            data = synthesize(Path(tmp) / "phantom", count=256, size=args.size)
        dataset = open_dataset(data, skip_problems=True)
        cache = ImageCache(prepare(data, Path(tmp) / "cache", size=args.size))
        names = [n for n in dataset.images if n in cache]

        def decode(chosen):
            return torch.from_numpy(np.stack([load_gray(dataset.paths[n], args.size) for n in chosen])).unsqueeze(1)

        rates = {impl: images_per_second(fn, names, args.batch, args.min_run_time * 3)
                 for impl, fn in (("cache", cache.batch), ("decode PNGs", decode))}
        rates["BatchLoader (uint8)"] = loader_rate(cache, names, args.batch, args.min_run_time * 3)
    # report() ranks by time: use milliseconds per batch.
    cases = {f"batch of {args.batch} at {args.size}px": {k: args.batch / v * 1e3 for k, v in rates.items()}}
    for impl, rate in rates.items():
        print(f"{impl}: {rate:.0f} images/s")
    config = {"data": str(data), "batch": args.batch, "size": args.size, "images_per_second": rates}
    return report("data loading (ms per batch)", cases, "cache", environment("cpu", args.threads), config, args.out)


def parse_args(argv=None):
    p = parser(__doc__, rounds=1)
    p.add_argument("--data", default=None, help="a ChestX-ray14-format folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=512)
    return parse(p, "data_loading", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
