"""Sampling wall time against the number of AR steps S, with and without the KV cache.

The `S` preset (12 layers x 384 wide, 6 heads, 4 class tokens; random weights: timing only) at
64 tokens (16x16x4 latents, patch 2) and 256 tokens (32x32x4, the paper's ablation input). For
each size, in one run: S=1, 2, 4, 8, L with the cache, and S=4 without it. Every AR step gets the
same number of diffusion steps, as in the paper, so S=4 runs 4x as many model calls as S=1, each on
a quarter of the tokens against the cached prefix. Each configuration is timed --repeats times,
interleaved, and the fastest run is kept (other jobs on the machine only ever add time). Prints one
Markdown table.

    python benchmarks/sampling.py [--batch 16] [--steps 20] [--tokens 64,256] [--preset S] [--threads N]

The batch matters on a CPU: S=4 splits every model call into four calls on a quarter of the rows,
and at batch 4 x 16 tokens the matmuls are too small to run at full speed (see docs/sampling.md
for both batch sizes).

On a CPU shared with other jobs, use --threads 1: oversubscribed OpenMP threads make the many
small model calls of large S erratic (10-30x slower), which measures the machine, not the sampler.
"""
from __future__ import annotations

import argparse
import time

import torch

from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.sampling import sample

SIZES = {64: 16, 256: 32}  # tokens -> latent side (patch 2, 4 channels)


def timed(model, labels, **kw) -> float:
    t0 = time.perf_counter()
    sample(model, labels, **kw)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="S")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="diffusion steps per AR step")
    p.add_argument("--tokens", default="64,256")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is kept")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset}, batch {a.batch}, "
          f"{a.steps} DDPM steps per AR step, random order, no CFG, best of {a.repeats}", flush=True)
    rows = []
    for num_tokens in (int(v) for v in a.tokens.split(",")):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(a.preset, image_size=SIZES[num_tokens], in_channels=4, patch_size=2,
                                      num_classes=1000)
        model = CausalFusion(cfg).eval()
        labels = torch.arange(a.batch) % cfg.num_classes
        kw = dict(steps=a.steps, order="random", seed=0)
        timed(model, labels, **{**kw, "steps": 2})  # warm-up
        configs = [(f"S={s}", dict(ar_steps=s)) for s in (1, 2, 4, 8, num_tokens)]
        configs.append(("S=4 no cache", dict(ar_steps=4, cache=False)))
        best = {name: float("inf") for name, _ in configs}
        for r in range(a.repeats):
            for name, extra in configs:
                best[name] = min(best[name], timed(model, labels, **kw, **extra))
            print(f"  {num_tokens} tokens, round {r + 1}: " + ", ".join(f"{n} {v:.2f}s" for n, v in best.items()), flush=True)
        t = {s: best[f"S={s}"] for s in (1, 2, 4, 8, num_tokens)}
        t_nc = best["S=4 no cache"]
        rows.append((num_tokens, t, t_nc))
    print()
    print("| tokens | S=1 (cache) | S=2 | S=4 | S=8 | S=L | S=4 no cache / S=4 cache |")
    print("|---|---|---|---|---|---|---|")
    for num_tokens, t, t_nc in rows:
        rel = " | ".join(f"{t[s] / t[1]:.2f}x" for s in (2, 4, 8, num_tokens))
        print(f"| {num_tokens} | {t[1]:.1f} s | {rel} | {t_nc / t[4]:.2f}x |")


if __name__ == "__main__":
    main()
