"""The streamed writers that keep predict and eval flat in memory (the same bytes/values as the whole-list writers,
and atomic: a failure part-way leaves neither the file nor a temporary), and the parallel deflate of the figures."""

import io
import json
import math
import os
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from dmfast import io as dio
from dmfast.io import atomic_write_csv, atomic_write_json_streamed, csv_text


def test_streamed_csv_equals_the_whole_text(tmp_path):
    rows = [["a,b", 1, 2.5], ['quote "x"', "é", ""], ["line\nbreak", -0.0, 1e-30]]
    path = atomic_write_csv(tmp_path / "t.csv", ["name", "x", "y"], (r for r in rows))
    assert path.read_bytes() == csv_text(["name", "x", "y"], rows).encode()


def test_streamed_json_reads_as_the_object_it_stands_for(tmp_path):
    value = {"model": "m", "numbers": [1, float("nan")], "images": ({"path": f"p{i}", "p": i / 3} for i in range(3)),
             "empty": iter(()), "tail": {"inf": math.inf}}
    read = json.loads(atomic_write_json_streamed(tmp_path / "t.json", value).read_text())
    assert read == {"model": "m", "numbers": [1, None], "images": [{"path": f"p{i}", "p": i / 3} for i in range(3)],
                    "empty": [], "tail": {"inf": None}}
    assert list(read) == ["model", "numbers", "images", "empty", "tail"]  # the order given


def test_a_stream_failing_part_way_leaves_nothing(tmp_path):
    def rows():
        yield [1]
        raise RuntimeError("read error")

    with pytest.raises(RuntimeError, match="read error"):
        atomic_write_csv(tmp_path / "t.csv", ["x"], rows())
    with pytest.raises(RuntimeError, match="read error"):
        atomic_write_json_streamed(tmp_path / "t.json", {"rows": rows()})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("deflater", ["isal", "zlib"])
@pytest.mark.parametrize("extra", [0, 1, 12345])
def test_parallel_deflate_is_one_zlib_stream(monkeypatch, extra, deflater):
    """Above PNG_SLICE bytes the data is deflated in slices on several threads (by ISA-L, or zlib without it): zlib
    (and so every PNG reader) reads the joined stream back as the data, with its Adler-32."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # as on a 2-core machine
    if deflater == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)  # as where isal is not installed: the import fails
    assert dio._deflater().__name__ == ("isal.isal_zlib" if deflater == "isal" else "zlib")
    assert zlib.decompress(dio.zlib_stream(b"short")) == b"short"
    for level in (0, 6, 9):  # levels ISA-L does not have: zlib's, stored or harder
        assert zlib.decompress(dio.zlib_stream(b"x" * 3000, level)) == b"x" * 3000
    assert len(dio.zlib_stream(bytes(3000), 0)) > 3000  # 0 stores
    data = np.random.default_rng(extra).integers(0, 6, 3 * dio.PNG_SLICE + extra, dtype=np.uint8)
    stream = dio.zlib_stream(data.tobytes())
    assert zlib.decompress(stream) == data.tobytes()
    image = np.random.default_rng(1).integers(0, 256, (700, 800, 3), dtype=np.uint8)  # 1.7 MB of rows: 2 slices
    read = np.array(Image.open(io.BytesIO(dio.png_bytes(image))))
    assert np.array_equal(read, image)


def test_a_write_on_a_full_or_read_only_disk_names_its_path(tmp_path, monkeypatch):
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as caught:
        dio.atomic_write_bytes(tmp_path / "eval.json", b"{}")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "eval.json")
    assert not list(tmp_path.iterdir())  # its temporary removed


def test_a_folder_has_one_writer_and_a_dead_writers_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "a" / "b"
    with dio.writing(out, "dmfast eval"):
        record = json.loads((out / dio.WRITER_LOCK).read_text())
        assert record["pid"] == os.getpid() and record["what"] == "dmfast eval"
        with dio.writing(out, "dmfast export"):  # a stage inside another on the same folder: the same hold
            (out / "model.pt").write_bytes(b"x")
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dmfast import io\n"
                                   f"with io.writing({str(tmp_path / 'c')!r}, 'dmfast train'):\n"
                                   "    print('held', flush=True); sys.stdin.read()"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"c is being written by process {holder.pid} \(dmfast train, since "):
            with dio.writing(tmp_path / "c", "dmfast eval"):
                pass
        holder.communicate("")
    assert not (out / dio.WRITER_LOCK).exists() and (out / "model.pt").is_file()
    assert not (tmp_path / "c").exists()  # made for the lock and left empty: removed
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / dio.WRITER_LOCK).write_text('{"pid": 999999, "what": "dmfast train", "since": "then"}')
    with dio.writing(tmp_path / "c", "dmfast eval"):  # the record of a writer that died: nobody holds its lock
        pass
    with pytest.raises(RuntimeError):
        with dio.writing(tmp_path / "d" / "e", "dmfast eval"):
            raise RuntimeError("refused before writing")
    assert not (tmp_path / "d").exists()  # the folders made for the lock went, as they stayed empty
