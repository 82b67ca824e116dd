"""Progress output off a terminal and the shape of sample grids."""
from __future__ import annotations

import io

from causalfusion.images import grid_columns
from causalfusion.progress import LineProgress, progress_bar


def test_line_progress_writes_whole_lines_without_carriage_returns():
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="train", interval=0.0, stream=out)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and max(len(line) for line in text.splitlines()) < 100
    assert text.splitlines()[-1] == "train: 1000/1000 it (loss=0.1)"


def test_line_progress_is_quiet_between_intervals():
    out = io.StringIO()
    bar = LineProgress(total=10, desc="s", interval=3600.0, stream=out, leave=False)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


def test_progress_bar_off_a_terminal_is_plain(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=3, desc="x"), LineProgress)


def test_grids_are_near_square():
    assert grid_columns(10, 1) == 4          # 10 classes x 1 image: not a 1-column strip
    assert grid_columns(100, 10) == 10       # one row per class where that is square enough
    assert grid_columns(200, 20) == 20       # 10 rows of 20
    assert grid_columns(8, 8) == 3           # one prompt x 8 images: not a 1-row strip
    for n in range(1, 60):
        cols = grid_columns(n)
        rows = -(-n // cols)
        assert abs(cols - rows) <= 1
