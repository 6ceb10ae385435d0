"""Files and the terminal: atomic writes (bytes, strict JSON, torch objects), PNG images, progress bars and tables."""

import contextlib
import errno
import glob
import io
import json
import math
import os
import re
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import SettingsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_ARRIVALS: dict = {}


def kill_point(site: str) -> None:
    """Fault injection for the kill-and-resume and concurrency tests: with ``DMFAST_KILL_AT=SITE:N`` in the
    environment, the process kills itself (SIGKILL, as ``kill -9``) at its Nth arrival at ``site``; with
    ``DMFAST_PAUSE_AT=SITE:N`` and ``DMFAST_PAUSE_FILE=PATH`` it creates PATH there and waits (up to 10 minutes)
    until PATH is removed. Sites: ``rename:NAME`` (a write of file NAME, before its rename) and ``prepare-chunk``
    (a chunk of images written, not yet marked done)."""
    for variable in ("DMFAST_KILL_AT", "DMFAST_PAUSE_AT"):
        name, _, count = os.environ.get(variable, "").rpartition(":")
        if name != site:
            continue
        _ARRIVALS[variable, site] = _ARRIVALS.get((variable, site), 0) + 1
        if str(_ARRIVALS[variable, site]) != count:
            continue
        if variable == "DMFAST_KILL_AT":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        signal_file = Path(os.environ["DMFAST_PAUSE_FILE"])
        signal_file.touch()
        deadline = time.monotonic() + 600
        while signal_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a write's errors that name its path


@contextlib.contextmanager
def naming(path, doing: str):
    """A full or read-only disk in the block is an error naming ``path`` (the file, or the folder of an unnamed
    one) and what was ``doing``: the OS names neither for a write that fails."""
    try:
        yield
    except OSError as error:
        if error.errno in FULL_OR_READ_ONLY and error.filename is None:
            raise OSError(error.errno, f"{error.strerror} ({doing})", str(path)) from error
        raise


@contextlib.contextmanager
def atomic_file(path, durable: bool = True):
    """A binary file to write ``path`` through: a temporary file in the same folder, renamed onto ``path`` when the
    block ends (removed if it fails), so readers never see a half-written file. ``durable`` also flushes it to disk
    before the rename (checkpoints, indexes) and first removes temporaries that killed writes of ``path`` left
    (:func:`remove_stale_temporaries`); bulk files that can be regenerated skip both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:  # checkpoints and indexes; bulk files (images, overlays) skip the folder scan
        remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    with naming(path, "writing it"):
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            kill_point(f"rename:{path.name}")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path) -> list:
    """Remove the temporary files of writes of ``path`` (:func:`atomic_file`) whose writer is gone (killed
    mid-write: an interrupted checkpoint can leave tens of MB); returns what was removed. A writer still running
    (its process ID is in the name) keeps its file."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


WRITER_LOCK = ".dmfast-writer.lock"  # in a folder being written: who writes it (pid, stage, since when)
_HELD: dict = {}  # folders this process holds (resolved path -> depth): a stage nested in another reuses its hold
_TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.[^.]+\.tmp")  # atomic_file's temporary of NAME: .NAME.<pid>.<random>.tmp


def _writable(folder: Path) -> list:
    """Check that ``folder`` is a folder that can be written, or can be created as one; returns the folders that
    creating it would make, outermost first."""
    existing, missing = folder, []
    while not existing.exists() and existing != existing.parent:
        missing.insert(0, existing)
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"output folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"output folder {folder}: {existing} is not writable")
    return missing


@contextlib.contextmanager
def writing(folder, what: str):
    """Hold ``folder`` as its one writer for the block: an exclusive ``flock`` on its :data:`WRITER_LOCK` file
    (created with the folder if need be). A second writer, in this or any process, is refused at once with an error
    naming the process that holds it and since when; the lock of a process that died went with it (the kernel
    releases it), so its file is taken over. On leaving, the lock file goes, and the folders the block created are
    removed when they stayed empty (a stage refused before writing leaves nothing). ``what`` names the stage."""
    import fcntl

    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:  # a stage run by another stage on the same folder (train writing its model file)
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    created = _writable(folder)
    with naming(folder, "create"):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / WRITER_LOCK
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(handle, 4096).decode(errors="replace")
            os.close(handle)
            _remove_empty(created)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks on this file system
                raise OSError(error.errno, f"cannot lock it against a second writer ({error.strerror})",
                              str(folder)) from None
            raise SettingsError(f"{folder} is being written by {_holder(holder)}; wait for it to end, or choose "
                                "another folder") from None
        try:
            if os.path.samestat(os.fstat(handle), os.stat(path)):
                break
        except FileNotFoundError:  # its last holder removed it between our open and our lock: take the new one
            pass
        os.close(handle)
    _HELD[key] = 1
    try:
        for tmp in folder.glob(".*.tmp"):  # of writes killed part-way: the lock says no writer is left to finish them
            target = _TEMPORARY.fullmatch(tmp.name)
            if target:
                remove_stale_temporaries(folder / target.group(1))
        with contextlib.suppress(OSError):  # the record is for the message of a second writer: best effort
            os.ftruncate(handle, 0)
            os.write(handle, json.dumps({"pid": os.getpid(), "what": what,
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield folder
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)
        os.close(handle)  # releases the lock
        _remove_empty(created)


def _holder(record: str) -> str:
    """Who holds a writer lock, from its file's record."""
    try:
        holder = json.loads(record)
        return f"process {holder['pid']} ({holder['what']}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):  # written this instant: the record is not there yet
        return "another process"


def _remove_empty(folders: list) -> None:
    for created in reversed(folders):
        try:
            created.rmdir()
        except OSError:  # not empty: something was written there
            return


def check_outputs(folder, names, what: str, overwrite: bool = False, resume: bool | None = None) -> list:
    """Check, before any work, that ``folder`` can take a stage's outputs ``names``: a folder (or creatable as one)
    that can be written, holding none of them unless ``overwrite`` (or ``resume``, for a stage that can continue
    its run: True continues it). Returns the outputs found (for :func:`clear_outputs`); never writes. ``what``
    names the stage in messages. Run it inside :func:`writing`, so that no other writer comes between the check and
    the writes."""
    folder = Path(folder)
    if overwrite and resume:
        raise SettingsError("--resume continues a run and --overwrite replaces it: give one of them")
    _writable(folder)
    found = [name for name in names if (folder / name).exists()] if folder.is_dir() else []
    if found and not (overwrite or resume):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise SettingsError(f"{folder} already holds the outputs of an earlier {what} ({shown}); pass --overwrite to "
                            f"replace them{'' if resume is None else ' or --resume to continue it'}, or "
                            "choose another folder")
    return found if overwrite else []


def clear_outputs(folder, found) -> Path:
    """Create ``folder`` and remove the earlier outputs ``found`` (:func:`check_outputs` with overwrite)."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in found:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    return folder


def atomic_write_bytes(path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path, durable) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_npz(path):
    """A compressed ``.npz`` (read with ``numpy.load``) written one array at a time, so that it never needs all of
    them in memory: yields ``add(name, array)``; the file appears when the block ends."""
    import zipfile

    import numpy as np

    with atomic_file(path, durable=False) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        def add(name: str, array) -> None:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

        yield add


def csv_text(header: list, rows) -> str:
    """CSV of ``header`` and ``rows`` (floats written in full)."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(path, header: list, rows) -> Path:
    """:func:`csv_text` written atomically a row at a time: ``rows`` may be a generator, never all in memory."""
    import csv

    with atomic_file(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # atomic_file closes the file itself
    return Path(path)


def atomic_write_json_streamed(path, value: dict) -> Path:
    """A JSON object written atomically whose iterator values (generators) are written as lists an item at a time,
    so that a file of every image of a release never needs them all in memory; one item per line."""
    from collections.abc import Iterator

    with atomic_file(path) as f:
        f.write(b"{")
        for k, (key, item) in enumerate(value.items()):
            f.write(f"{', ' if k else ''}{json.dumps(str(key))}: ".encode())
            if isinstance(item, Iterator):
                f.write(b"[")
                for i, element in enumerate(item):
                    f.write(((",\n" if i else "\n") + json_text(element)).encode())
                f.write(b"\n]")
            else:
                f.write(json_text(item).encode())
        f.write(b"}\n")
    return Path(path)


def finite(value):
    """``value`` with every NaN or infinite float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, indent: int | None = None) -> str:
    """Strict JSON: NaN and infinities become ``null`` (bare ``NaN`` is not JSON and strict readers reject it)."""
    try:  # most values have none: the walk that replaces them costs more than the encoding
        return json.dumps(value, indent=indent, allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), indent=indent, allow_nan=False)


def atomic_write_json(path, value, indent: int | None = 1) -> Path:
    """:func:`json_text` of ``value`` written atomically, with a final newline."""
    return atomic_write_bytes(path, (json_text(value, indent) + "\n").encode())


def atomic_torch_save(path, obj) -> Path:
    """``torch.save`` through :func:`atomic_write_bytes` (checkpoints, masks, anchors: never half written)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` intra-op threads (restored after): small tensors gain nothing from more, and
    thread barriers cost a lot when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def versions(*packages: str) -> dict:
    """The versions an output is stamped with: dmfast, torch, Python, numpy, and each of ``packages`` (None where
    it is not installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"dmfast": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "numpy": np.__version__, **{package: installed(package) for package in packages}}


def to_uint8(image: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Map values in [low, high] to uint8, clamping outside."""
    scaled = (image.detach().float().cpu() - low) / (high - low)
    return (scaled.clamp(0, 1) * 255).round().to(torch.uint8)


PNG_LEVEL = 1  # deflate level of the figures: with the "Up" filter, smaller files than PIL's level 1, much sooner
PNG_SLICE = 1 << 20  # bytes of a large figure's rows deflated apart, in parallel (see zlib_stream)
_deflaters = None  # the threads that deflate the slices (both deflaters release the GIL while they compress)


def _deflater(level: int = PNG_LEVEL):
    """ISA-L's deflate (the ``isal`` package) where installed, for ``level`` 1-3 (its levels), else zlib: the same
    format, 3-4x faster at level 1 and a few percent smaller on the figures (a 14-panel 512-px overlay: 34 ms against
    123 ms on one core)."""
    if not 1 <= level <= 3:  # zlib's 0 stores, 4-9 compress harder: ISA-L has neither
        return zlib
    try:
        from isal import isal_zlib

        return isal_zlib
    except ImportError:  # a platform without isal's wheels: zlib writes the same streams, slower
        return zlib


def zlib_stream(data, level: int = PNG_LEVEL) -> bytes:
    """:func:`zlib_parts` joined."""
    return b"".join(zlib_parts(data, level))


def zlib_parts(data, level: int = PNG_LEVEL) -> list:
    """``zlib.compress(data, level)``'s stream as parts to join or write in order, faster on several cores: above
    :data:`PNG_SLICE` bytes the data is cut into slices deflated in threads, each ending on a byte boundary (a sync
    flush, the last one final), between a zlib header and the Adler-32 of the whole, as pigz does: one stream any
    inflater reads. Each slice starts without the previous one's window, which costs a few bytes per megabyte."""
    global _deflaters
    deflater = _deflater(level)
    view = memoryview(data).cast("B")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if len(view) <= PNG_SLICE or cores < 2:
        return [deflater.compress(view, level)]
    if _deflaters is None:
        from concurrent.futures import ThreadPoolExecutor

        _deflaters = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="dmfast-deflate")
    starts = range(0, len(view), PNG_SLICE)

    def deflate(start: int) -> bytes:
        raw = deflater.compressobj(level, deflater.DEFLATED, -15)  # raw deflate: the zlib wrapper is written once
        last = start + PNG_SLICE >= len(view)
        return raw.compress(view[start:start + PNG_SLICE]) + raw.flush(
            deflater.Z_FINISH if last else deflater.Z_SYNC_FLUSH)

    # header (deflate, 32 KiB window), the slices, the Adler-32 of the whole: left unjoined (figures are megabytes)
    return [b"\x78\x01", *_deflaters.map(deflate, starts), struct.pack(">I", deflater.adler32(view))]


def png_bytes(array: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """:func:`png_parts` joined."""
    return b"".join(png_parts(array, level))


def png_parts(array: np.ndarray, level: int = PNG_LEVEL) -> list:
    """A uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) array as the parts of a PNG file, in order. Every row uses
    PNG's "Up" filter (the difference to the row above, vectorised), deflated at ``level`` (:func:`zlib_parts`, on
    every core): PIL's per-row adaptive filter costs more than the compression on large figures, and gains little on
    them."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up"
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG's filter arithmetic

    crc32 = _deflater().crc32

    def chunk(kind: bytes, body: list) -> list:
        crc = crc32(kind)
        for part in body:
            crc = crc32(part, crc)
        return [struct.pack(">I", sum(map(len, body))), kind, *body, struct.pack(">I", crc)]

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return [b"\x89PNG\r\n\x1a\n", *chunk(b"IHDR", [header]), *chunk(b"IDAT", zlib_parts(filtered, level)),
            *chunk(b"IEND", [])]


def save_png(path, image: torch.Tensor, durable: bool = True) -> Path:
    """Save a uint8 image ``[H, W]`` or ``[C, H, W]`` (C = 1 or 3) as PNG (:func:`png_parts`), atomically (see
    :func:`atomic_file` for ``durable``)."""
    if image.dtype != torch.uint8:
        raise SettingsError(f"save_png: expected a uint8 image, got {image.dtype}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise SettingsError(f"save_png: expected [H, W] or [C, H, W] with C in (1, 3), got {tuple(image.shape)}")
    if 0 in image.shape:
        raise SettingsError(f"save_png: an empty image {tuple(image.shape)}")
    array = image.permute(1, 2, 0).contiguous().numpy()
    with atomic_file(path, durable) as f:
        f.writelines(png_parts(array[:, :, 0] if array.shape[2] == 1 else array))
    return Path(path)


LOSS_AND_RATE = "loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s"  # the training stages' fields
PROGRESS_SECONDS = 0.5  # how often the training stages read their loss back from the device for the progress bar


def progress(label: str, console, *fields: str, **kwargs) -> Progress:
    """A rich progress bar: ``label``, the bar, done/total, ``fields`` (rich format strings over the task's fields),
    time remaining."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
                    TimeRemainingColumn(), console=console, **kwargs)


def print_table(console, title: str, header: list, rows: list, justify: list | None = None) -> None:
    """A rich table; by default the first column is left-aligned and the others right-aligned."""
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify=justify[i] if justify else "left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
