"""Wall time of the web app's sample and edit (``app_core``, no browser) on a run: 8 samples of all
classes and one edit with 4 variations (centre mask), S=1, 50 DDPM steps, three times each.

    OMP_NUM_THREADS=1 python benchmarks/app_latency.py [RUN]   # RUN: default runs/demo
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from causalfusion import app_core as core

run = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
am = core.load_app_model(run)
fields = dict(ar_steps=1, groups="", order="", sample_steps="50", cfg=1.0, cfg_interval="0,1000", seed=0)
with tempfile.TemporaryDirectory() as tmp:
    for _ in range(3):
        t = time.perf_counter()
        r = core.run_sample(am, classes="", n=8, gif=Path(tmp) / "s.gif", progress=False, **fields)
        t_sample = time.perf_counter() - t
        mask = core.build_mask(am, "center", 0.5, None)
        t = time.perf_counter()
        core.run_edit(am, r.images[0], mask, new_class=5, n=4, gif=Path(tmp) / "e.gif", progress=False, **fields)
        print(f"sample 8 images: {t_sample:.2f} s, edit 4 variations: {time.perf_counter() - t:.2f} s")
