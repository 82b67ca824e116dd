"""Atomic file writes: every file the library writes goes through a temporary file and
``os.replace``, so an interrupted run never leaves a truncated checkpoint, index, report or image
behind, and a failed write leaves the old file as it was."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: dict | list, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))
