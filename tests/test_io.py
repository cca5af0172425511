"""Atomic writes: nothing half-written under the final name, and the umask's file mode (shared clusters)."""

import os
import stat

import pandas as pd
import pytest

from s3prl_stimulus import io
from s3prl_stimulus.cli import main


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_the_process_umask(umask):
    assert io.current_umask() == umask
    assert io.current_umask() == umask  # reading it did not change it


def test_every_atomic_writer_gives_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    io.write_text_atomic(tmp_path / "a.txt", "x")
    io.write_json_atomic(tmp_path / "b.json", {"x": 1})
    io.write_csv_atomic(tmp_path / "c.csv", pd.DataFrame({"x": [1]}))
    with io.atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"\0")
    for name in ("a.txt", "b.json", "c.csv", "d.bin"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.csv", "d.bin"]


def test_a_failed_write_leaves_nothing(tmp_path, umask):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_label_files_are_readable_by_the_group_under_umask_022(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["labels", "--out", str(tmp_path / "labels"), "--stimuli", "voice", "--folds", "1"]) == 0
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "labels").rglob("*") if p.is_file()]
    assert written and {mode(p) for p in written} == {0o644}
