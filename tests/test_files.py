"""Atomic writes: a failed write leaves the old file and no temporary behind."""
from __future__ import annotations

import json

import pytest

from causalfusion.files import atomic_path, write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"step": 2, "trunc')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_success_replaces_and_suffix_is_kept(tmp_path):
    path = tmp_path / "x.npz"
    with atomic_path(path, ".tmp.npz") as tmp:
        assert tmp.name.endswith(".tmp.npz") and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_replace_is_atomic(tmp_path):
    """The new file is renamed over the old one (a new inode), never written into it: a reader that
    opened the old file keeps reading the old bytes, whole."""
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    before = path.stat().st_ino
    with open(path) as old:
        write_json(path, {"step": 2})
        assert json.loads(old.read()) == {"step": 1}
    assert path.stat().st_ino != before and json.loads(path.read_text()) == {"step": 2}


def test_write_json_creates_the_missing_directory(tmp_path):
    write_json(tmp_path / "new" / "dir" / "rows.json", [1, 2])
    assert json.loads((tmp_path / "new" / "dir" / "rows.json").read_text()) == [1, 2]
