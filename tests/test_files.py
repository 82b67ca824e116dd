"""Atomic writes: a failed write leaves the old file and no temporary behind; NewFiles takes back
only what a failed run wrote."""
from __future__ import annotations

import json

import pytest

from causalfusion.files import NewFiles, atomic_path, write_json


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


def test_new_files_takes_back_only_the_runs_own_entries(tmp_path):
    """In a directory the run did not create, only the names a run writes go, and only those that
    were not there: a file another program added meanwhile (``--out .``) and older files stay."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "log.csv").write_text("an older log")
    undo = NewFiles(tmp_path, ("config.json", "log.csv", "tb"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events").write_text("")
    (tmp_path / "editor.swp").write_text("another program's")
    undo.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor.swp", "log.csv", "notes.txt"]
    assert (tmp_path / "log.csv").read_text() == "an older log"


def test_new_files_removes_a_directory_it_created_with_its_new_parents(tmp_path):
    undo = NewFiles(tmp_path / "a" / "b", ("config.json",))
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "config.json").write_text("{}")
    undo.remove()
    assert list(tmp_path.iterdir()) == []


def test_new_files_keeps_what_another_run_wrote_in_a_parent_both_created(tmp_path):
    """Two runs started together into a new folder (a sweep: --out sweep/a, --out sweep/b) both see
    sweep/ missing; when one fails early it takes back its own directory and the parents that are
    left empty, never the other run's files beside it."""
    undo = NewFiles(tmp_path / "sweep" / "a", ("config.json",))
    (tmp_path / "sweep" / "a").mkdir(parents=True)
    (tmp_path / "sweep" / "a" / "config.json").write_text("{}")
    (tmp_path / "sweep" / "b").mkdir()
    (tmp_path / "sweep" / "b" / "state.json").write_text("{}")  # the other run's checkpoint
    undo.remove()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["sweep", "sweep/b", "sweep/b/state.json"]
