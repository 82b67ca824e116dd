"""Progress bars: tqdm on a terminal, plain periodic lines otherwise.

tqdm redraws its bar with carriage returns; written to a file or a pipe (a log, CI), that is one
line of tens of kilobytes. When stderr is not a terminal, ``progress_bar`` returns a ``LineProgress``
that prints ``desc: n/total`` at most every ``interval`` seconds and once at the end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

LINE_INTERVAL_S = 30.0  # seconds between two plain progress lines


class LineProgress:
    """The subset of tqdm's interface the library uses (update, set_description, set_postfix, close),
    written as whole lines to ``stream``; the last line at ``close`` unless ``leave=False``."""

    def __init__(self, total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it",
                 interval: float = LINE_INTERVAL_S, stream=None, leave: bool = True, **_ignored):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.interval, self.stream = interval, stream if stream is not None else sys.stderr
        self.postfix, self._last, self._closed, self.leave = "", time.monotonic(), False, leave

    def _line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        post = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {self.n}{total} {self.unit}{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.leave:  # like tqdm's leave=False: a finished inner bar leaves no line
                print(self._line(), file=self.stream, flush=True)


class _Off:
    """A bar that shows nothing (``disable=True``)."""

    n = 0

    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def set_postfix(self, **values) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int | None = None, desc: str = "", disable: bool = False, **kw):
    """tqdm when stderr is a terminal, ``LineProgress`` when it is not, nothing when ``disable``."""
    if disable:
        return _Off()
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, **kw)
    return LineProgress(total=total, desc=desc, **kw)


def progress_iter(items: Iterable, total: int | None = None, desc: str = "", disable: bool = False) -> Iterator:
    """Iterate ``items`` under ``progress_bar``."""
    bar = progress_bar(total=total, desc=desc, disable=disable, leave=False)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
