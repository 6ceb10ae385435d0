"""The image cache (``dmfast prepare``): every image decoded and brought once to the working size (padded to a
centred square, never squashed: :func:`dmfast.data.images.to_square`), stored in one memory-mapped uint8 array
with an index, so training reads batches with random access and no decoding.

Layout of a cache folder: ``images.u8`` (``[N, size, size]`` uint8), ``done.u8`` (one byte per image, set once its
pixels are flushed: an interrupted ``prepare`` resumes from there) and ``index.json`` (size, image names, each
source file's byte size and mtime, images that could not be decoded, and ``complete``, written atomically last, so
a half-written cache is never taken for a complete one). Opening a cache checks the sources' sizes and mtimes and
refuses a stale cache.
"""

import errno
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..limits import DEFAULT_SIZE, SIZE, Range
from ..io import atomic_write_json, check_outputs, kill_point, progress, writing
from .dataset import DataError, Problems
from .formats import open_dataset
from .images import ImageError, load_gray, to_square

# 2: non-square images padded to a square (1 squashed them); 3: 16-bit PNGs by their significant bits (2: / 257)
CACHE_VERSION = 3
WORKERS = Range(1, 1024)  # decoding processes


def default_cache_dir(data_dir, size: int) -> Path:
    """``<data_dir>/cache-<size>`` when the data folder is writable, else under ``~/.cache/dmfast``."""
    data_dir = Path(data_dir).resolve()
    if os.access(data_dir, os.W_OK):
        return data_dir / f"cache-{size}"
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "dmfast" / f"{data_dir.name}-{digest}-{size}"


def _source_stamp(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _decode(task):
    index, path, size = task
    try:
        return index, to_square(load_gray(path), size).pixels.tobytes(), None
    except ImageError as error:
        return index, None, str(error)


class ImageCache:
    """A complete image cache, opened read-only."""

    def __init__(self, folder, check_sources: bool = True, data_dir=None):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.is_file():
            raise DataError(f"{self.folder}: no image cache here (run `dmfast prepare DATA_DIR`)")
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{index_file}: not a readable cache index ({error}); run `dmfast prepare` again") from None
        if not isinstance(index, dict):
            raise DataError(f"{index_file}: not a cache index (expected a JSON object); run `dmfast prepare` again")
        if index.get("version") != CACHE_VERSION:
            raise DataError(f"{self.folder}: cache format {index.get('version')} is not {CACHE_VERSION}; prepare it again")
        if not index.get("complete"):
            raise DataError(f"{self.folder}: the cache is incomplete (interrupted, or images that could not be "
                            "decoded); run `dmfast prepare` to resume it (with --skip-problems to leave such images "
                            "out)")
        self.size = int(index["size"])
        self.names = list(index["names"])
        self.bad = dict(index.get("bad", {}))
        self.data_dir = Path(data_dir or index["data_dir"])
        self.sources = index["sources"]
        self.paths = index["paths"]  # each image's file relative to the data folder (every cache of this version)
        self.rows = {name: i for i, name in enumerate(self.names) if name not in self.bad}
        self.array = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r",
                               shape=(len(self.names), self.size, self.size))
        if check_sources:
            stale = self.stale_sources()
            if stale:
                shown = ", ".join(stale[:5]) + (f", ... ({len(stale) - 5} more)" if len(stale) > 5 else "")
                raise DataError(f"{self.folder}: the cache is stale: {len(stale)} source images changed or vanished "
                                f"since it was built ({shown}); run `dmfast prepare` again")

    def stale_sources(self) -> list:
        paths = {name: self.data_dir / relative for name, relative in zip(self.names, self.paths)}
        paths = {name: path for name, path in paths.items() if path.is_file()}
        stale = []
        for name, stamp in zip(self.names, self.sources):
            path = paths.get(name)
            if path is None or _source_stamp(path) != stamp:
                stale.append(name)
        return stale

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, name) -> bool:
        return name in self.rows

    def batch(self, names) -> torch.Tensor:
        """uint8 ``[len(names), 1, size, size]`` (normalise on the batch with
        :func:`dmfast.data.images.to_model_input`)."""
        missing = [n for n in names if n not in self.rows]
        if missing:
            raise KeyError(f"{self.folder}: not in the cache: {missing[:5]}")
        rows = np.fromiter((self.rows[n] for n in names), dtype=np.int64, count=len(names))
        order = np.argsort(rows, kind="stable")  # read the memory map in order
        out = np.empty((len(rows), self.size, self.size), np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out).unsqueeze(1)


class CacheSet:
    """Image caches of several data folders read as one (training on mixed releases): the first cache's images by
    their names, the others' as :meth:`key` ``(i, name)``."""

    def __init__(self, main: ImageCache, mixed: list):
        self.main, self.mixed = main, list(mixed)
        self.size, self.folder = main.size, main.folder

    @staticmethod
    def key(i: int, name: str) -> str:
        """The name of image ``name`` of the ``i``-th mixed folder (from 0)."""
        return f"mix{i + 1}:{name}"

    def _locate(self, name: str) -> tuple:
        prefix, _, rest = name.partition(":")
        if rest and prefix.startswith("mix") and prefix[3:].isdigit() and 1 <= int(prefix[3:]) <= len(self.mixed):
            return self.mixed[int(prefix[3:]) - 1], rest
        return self.main, name

    def __contains__(self, name) -> bool:
        cache, own = self._locate(name)
        return own in cache

    def __len__(self) -> int:
        return len(self.main) + sum(len(c) for c in self.mixed)

    def batch(self, names) -> torch.Tensor:
        """As :meth:`ImageCache.batch`, each image from its own cache."""
        out = torch.empty((len(names), 1, self.size, self.size), dtype=torch.uint8)
        groups = {}  # id(cache) -> (cache, rows of the batch, names in that cache)
        for i, name in enumerate(names):
            cache, own = self._locate(name)
            _, rows, owns = groups.setdefault(id(cache), (cache, [], []))
            rows.append(i)
            owns.append(own)
        for cache, rows, owns in groups.values():
            out[rows] = cache.batch(owns)
        return out


def prepare(data_dir, cache_dir=None, size: int = DEFAULT_SIZE, workers: int | None = None, skip_problems: bool = False,
            console: Console | None = None, limit_chunks: int | None = None, format: str | None = None) -> Path:
    """Build (or resume, or refresh) the cache of ``data_dir`` (a release of ``format``, default detected) at
    ``size``; returns the cache folder.

    ``limit_chunks`` stops after that many chunks of work without completing (used to test resuming)."""
    console = console or Console(stderr=True)
    size = SIZE.check(size, "size")
    workers = WORKERS.check(workers, "workers")
    dataset = open_dataset(data_dir, format, skip_problems=skip_problems, lists=False)
    report_left_out(dataset, console)
    folder = Path(cache_dir) if cache_dir else default_cache_dir(data_dir, size)
    image_folders = {p.resolve() for p in {path.parent for path in dataset.paths.values()}}
    if folder.resolve() in image_folders | {Path(data_dir).resolve()}:
        raise DataError(f"--cache {folder}: the data folder or its images folder; give a folder of its own")
    with writing(folder, "dmfast prepare"):
        check_outputs(folder, (), "image cache")
        return _build(folder, dataset, data_dir, size, workers, skip_problems, console, limit_chunks)


def _build(folder: Path, dataset, data_dir, size: int, workers: int | None, skip_problems: bool, console,
           limit_chunks: int | None) -> Path:
    """Build, resume or refresh the cache ``folder`` of ``dataset`` (see :func:`prepare`), holding it."""
    names = dataset.images
    sources = [_source_stamp(dataset.paths[n]) for n in names]
    root = Path(data_dir).resolve()
    relative = [os.path.relpath(os.path.abspath(dataset.paths[n]), os.path.abspath(data_dir)) for n in names]
    index = {"version": CACHE_VERSION, "size": size, "data_dir": str(root), "names": names,
             "sources": sources, "paths": relative, "bad": {}, "complete": False}
    index_file, images_file, done_file = folder / "index.json", folder / "images.u8", folder / "done.u8"
    previous = _index_of(folder) or None  # missing or damaged: the cache is built afresh
    _check_owner(folder, previous or {}, data_dir)
    same = previous is not None and all(previous.get(k) == index[k] for k in ("version", "size", "names", "sources")) \
        and previous.get("paths", relative) == relative  # older caches kept no paths
    if same and previous.get("complete"):
        console.print(f"cache {folder} is up to date ({len(names)} images at {size}px)")
        return folder
    shape = (len(names), size, size)
    fresh = not same or not images_file.is_file() or not done_file.is_file()
    if fresh:
        atomic_write_json(index_file, index, indent=None)  # marks any older content invalid
    else:
        index["bad"] = previous.get("bad", {})
    # the space is reserved before anything is mapped (a resumed cache's missing blocks too): a full disk is this
    # error, never a SIGBUS while the mapped pixels are written
    reserve_space(images_file, math.prod(shape), fresh)
    reserve_space(done_file, len(names), fresh)
    images = np.memmap(images_file, dtype=np.uint8, mode="r+", shape=shape)
    done = np.memmap(done_file, dtype=np.uint8, mode="r+", shape=(len(names),))
    todo = [i for i in range(len(names)) if not done[i]]
    bad = Problems()
    workers = workers or os.cpu_count() or 1
    chunk = max(16, min(512, len(todo) // (workers * 4) + 1))
    context = multiprocessing.get_context("fork")
    with progress("prepare", console, "{task.fields[rate]}") as bar, context.Pool(workers) as pool:
        task = bar.add_task("prepare", total=len(names), completed=len(names) - len(todo), rate="")
        started = time.perf_counter()
        for start in range(0, len(todo), chunk):
            if limit_chunks is not None and start // chunk >= limit_chunks:
                return folder
            batch = todo[start:start + chunk]
            results = pool.map(_decode, [(i, dataset.paths[names[i]], size) for i in batch])
            for i, pixels, error in results:
                if error is None:
                    images[i] = np.frombuffer(pixels, np.uint8).reshape(size, size)
                else:
                    index["bad"][names[i]] = error
            images.flush()
            kill_point("prepare-chunk")
            for i, _, _ in results:
                done[i] = 1
            done.flush()
            elapsed = time.perf_counter() - started
            bar.update(task, advance=len(batch), rate=f"{(start + len(batch)) / max(elapsed, 1e-9):.0f} images/s")
    if index["bad"]:
        for error in index["bad"].values():
            bad.add("images that could not be decoded", error)
        atomic_write_json(index_file, index, indent=None)
        if not skip_problems:
            raise DataError(f"{data_dir}: {bad.report()}\n(the cache stays incomplete; pass --skip-problems to leave "
                            "these images out)")
        console.print(f"[yellow]left out:[/yellow]\n{bad.report()}")
    index["complete"] = True
    atomic_write_json(index_file, index, indent=None)
    console.print(f"cache {folder}: {len(names) - len(index['bad'])} images at {size}px")
    return folder


def reserve_space(path: Path, size: int, fresh: bool) -> None:
    """Give ``path`` ``size`` bytes of disk space (``fresh``: as a new file of zeros; else the existing content kept,
    its missing blocks allocated). A full disk raises a :class:`DataError` naming the folder, the space needed and
    the space free, and leaves no new file behind."""
    with open(path, "wb" if fresh else "r+b") as f:
        try:
            try:
                if not hasattr(os, "posix_fallocate"):  # not on every OS: written out below
                    raise OSError(errno.EOPNOTSUPP, "posix_fallocate is not available")
                if size:
                    os.posix_fallocate(f.fileno(), 0, size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.seek(0, os.SEEK_END)  # a file system without it: the zeros written out
                while f.tell() < size:
                    f.write(bytes(min(1 << 24, size - f.tell())))
                f.flush()
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            f.close()
            if fresh:
                path.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            raise DataError(f"{path.parent}: no space for the image cache's {path.name}: {_amount(size)} needed, "
                            f"{_amount(free)} free (free some, or give --cache on another disk)") from None


def _amount(size: int) -> str:
    return next((f"{size / unit:,.1f} {name}" for unit, name in ((1e9, "GB"), (1e6, "MB")) if size >= unit),
                f"{size:,} bytes")


def report_left_out(dataset, console: Console) -> None:
    """Print what ``dataset`` left out: the problems skipped and its reader's notes."""
    problems = dataset.problems
    if problems:
        console.print(f"[yellow]left out of {dataset.root}:[/yellow]\n{problems.report()}")
    if problems.notes:
        console.print(f"left out of {dataset.root} on purpose:\n{Problems(notes=problems.notes).report(notes=True)}")


def _index_of(folder: Path) -> dict:
    """The index of the cache in ``folder``, or {} when it is missing or damaged (the cache is then rebuilt)."""
    index = folder / "index.json"
    try:
        found = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _check_owner(folder: Path, index: dict, data_dir) -> None:
    """A cache holds the images of one data folder: another folder's cache is never used or written over."""
    owner, data_dir = index.get("data_dir"), Path(data_dir).resolve()
    inside = data_dir in Path(folder).resolve().parents  # the default cache-SIZE of a copied or moved folder
    if owner is not None and Path(owner) != data_dir and not inside:
        raise DataError(f"cache {folder} holds the images of {owner}, not of {data_dir}: give "
                        "another --cache (or remove that one)")


def open_or_prepare(data_dir, cache_dir=None, size: int = DEFAULT_SIZE, skip_problems: bool = False,
                    console: Console | None = None, format: str | None = None) -> ImageCache:
    """The image cache of ``data_dir`` (a release of ``format``) at ``size`` px (``cache_dir``, or the default
    folder), built first if it is missing. A cache of another size is refused by name."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir(data_dir, size)
    found = _index_of(folder)
    if found.get("size", size) != size:
        raise DataError(f"cache {folder} holds {found['size']} px images; {size} px are needed")
    _check_owner(folder, found, data_dir)
    if found.get("version") != CACHE_VERSION or not found.get("complete"):  # missing, damaged, older or unfinished
        prepare(data_dir, folder, size=size, skip_problems=skip_problems, console=console, format=format)
    return ImageCache(folder, data_dir=data_dir)  # of this size: checked above, or just built


def open_cache(config, size: int | None = None, console: Console | None = None) -> ImageCache:
    """:func:`open_or_prepare` of a stage's :class:`~dmfast.config.DataConfig` (its folder, cache, skipping and
    format) at ``size`` px (default: the config's ``size``), as :func:`~dmfast.data.formats.open_data` opens its
    dataset."""
    return open_or_prepare(config.data, config.cache, config.size if size is None else size, config.skip_problems,
                           console, config.format)
