"""Atomic file writes: every file the library writes goes through a temporary file and
``os.replace``, so an interrupted run never leaves a truncated checkpoint, index, report or image
behind, and a failed write leaves the old file as it was. ``NewFiles`` takes back what a run that
failed early wrote into its output directory."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``, on an
    error it is removed. ``suffix`` keeps writers that insist on an extension happy (``.tmp.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{suffix}")  # the pid: ranks writing side by side
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # (an error while cleaning up must not replace the one that stopped the write)
            with suppress(OSError):
                tmp.unlink()


def fsync_dir(path: str | Path) -> None:
    """Make the renames in directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows: directories cannot be opened this way
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durable(path: str | Path, text: str) -> None:
    """``write_text`` that returns only once the new content (and its name) is on disk."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: dict | list, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def check_dir_path(path: str | Path, flag: str = "--out") -> None:
    """Refuse (ValueError naming ``flag`` and the path) a directory that cannot be made where it is
    asked for: an existing file, or a path under one. mkdir says only "[Errno 17] File exists" or
    "[Errno 20] Not a directory", and only once the work that writes there has begun."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    blocker = next((p for p in path.parents if p.exists()), None)  # the nearest existing ancestor
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"cannot create {flag} {path}: {blocker} is a file, not a directory")


class NewFiles:
    """What a directory held before a run started writing into it, so that a run which fails before
    it has anything worth keeping (a fresh training run before its first checkpoint, a latent cache
    before its first shard) can take back what it added: the directory itself if this run created it
    (and the parents it had to create, once they are empty), else only the top-level entries among
    ``names`` (the files and folders such a run writes; None: any) that were not there before. An
    existing directory is never swept wholesale: ``--out .`` may share it with files other programs
    write meanwhile."""

    def __init__(self, root: str | Path, names: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self.names = None if names is None else frozenset(names)
        # the outermost directory the run will create (None: root exists already)
        self.created: Path | None = None
        for p in (self.root, *self.root.parents):
            if p.exists():
                break
            self.created = p
        self.before: set[str] = set() if self.created else {p.name for p in self.root.iterdir()}

    def remove(self) -> None:
        """Delete what was added since ``__init__`` (best effort: a file another process holds open or
        a missing permission is left, as cleaning up must not hide the error that stopped the run)."""
        if self.created is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            # the new parents only while empty: runs started together into one new folder (a sweep's
            # --out sweep/a, --out sweep/b) all find it missing, and the run beside this one is not ours
            for p in self.root.parents:
                if p == self.created.parent:
                    break
                try:
                    p.rmdir()
                except OSError:  # not empty (or gone): it and everything above it stay
                    break
            return
        for p in self.root.iterdir():
            if p.name in self.before or (self.names is not None and p.name not in self.names):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with suppress(OSError):
                    p.unlink()
