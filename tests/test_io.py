"""The streamed writers that keep predict and eval flat in memory: the same bytes/values as the whole-list
writers, and atomic (a failure part-way leaves neither the file nor a temporary)."""

import json
import math

import pytest

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
