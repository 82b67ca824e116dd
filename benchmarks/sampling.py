"""Sampling wall time against the number of AR steps S, with and without the KV cache.

The `S` preset (12 layers x 384 wide, 6 heads; 4 class tokens as in the paper's ablations, or 64
with --class-tokens 64 as in its system models; random weights: timing only) at
64 tokens (16x16x4 latents, patch 2) and 256 tokens (32x32x4, the paper's ablation input). For
each size, in one run: S=1, 2, 4, 8, L with the cache, and S=4 without it. Every AR step gets the
same number of diffusion steps, as in the paper, so S=4 runs 4x as many model calls as S=1, each on
a quarter of the tokens against the cached prefix. Each configuration is timed --repeats times,
interleaved, and the fastest run is kept (other jobs on the machine only ever add time). Under each
time row a FLOP row gives the same ratios for the work executed (``causalfusion.flop_count``,
counted on the real sampler, exact, and free of the machine's noise): a time ratio far from its
FLOP ratio is the hardware (small matmuls, per-call overhead), not the method. Prints one Markdown
table; ``--repeats 0`` prints only the FLOP rows (4 min for the default table, whatever --steps).

    python benchmarks/sampling.py [--batch 16] [--steps 20] [--tokens 64,256] [--preset S] [--threads N]
                                  [--ar-steps 1,2,4,8,L] [--no-cache-at 4] [--class-tokens 4|64]

``--ar-steps`` picks the columns (S=1 is always timed: it is the unit), ``--no-cache-at`` the S
whose uncached reference is timed (0: none). The paper samples with 250 DDPM steps per AR step;
the default of 20 keeps the full table under half an hour, and makes the S-1 commit passes of
S > 1 weigh 12.5x more than at 250 (they are (S-1)/(S*T) of the linear work).

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

from causalfusion.flop_count import sampling_flops
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
    p.add_argument("--class-tokens", type=int, default=4,
                   help="condition tokens: 4 (the paper's ablation setting) or 64 (its system setting, Tab. 10)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="diffusion steps per AR step")
    p.add_argument("--tokens", default="64,256", help="comma separated, each 64 or 256")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is kept (0: FLOPs only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--ar-steps", default="1,2,4,8,L", help="AR step counts to time (L: one token per step)")
    p.add_argument("--no-cache-at", type=int, default=4, help="S of the uncached reference (0: skip it)")
    a = p.parse_args()
    sizes = [int(v) for v in a.tokens.split(",")]
    if any(n not in SIZES for n in sizes):
        raise SystemExit(f"error: --tokens takes {' or '.join(map(str, SIZES))} (comma separated), got {a.tokens}")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset}, "
          f"{a.class_tokens} class tokens, batch {a.batch}, "
          f"{a.steps} DDPM steps per AR step, random order, no CFG, best of {a.repeats} (0: FLOPs only)", flush=True)
    rows = []
    for num_tokens in sizes:
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(a.preset, image_size=SIZES[num_tokens], in_channels=4, patch_size=2,
                                      num_classes=1000, class_tokens=a.class_tokens)
        model = CausalFusion(cfg).eval()
        labels = torch.arange(a.batch) % cfg.num_classes
        kw = dict(steps=a.steps, order="random", seed=0)
        if a.repeats:
            timed(model, labels, **{**kw, "steps": 2})  # warm-up
        columns = parse_ar_steps(a.ar_steps, num_tokens)
        configs = [(f"S={s}", dict(ar_steps=s)) for s in [1] + columns]
        if a.no_cache_at:
            configs.append(("no cache", dict(ar_steps=a.no_cache_at, cache=False)))
            if f"S={a.no_cache_at}" not in dict(configs):
                configs.insert(-1, (f"S={a.no_cache_at}", dict(ar_steps=a.no_cache_at)))
        best = {name: float("inf") for name, _ in configs}
        for r in range(a.repeats):
            for name, extra in configs:
                best[name] = min(best[name], timed(model, labels, **kw, **extra))
            print(f"  {num_tokens} tokens, round {r + 1}: " + ", ".join(f"{n} {v:.2f}s" for n, v in best.items()), flush=True)
        work = {name: sampling_flops(model, labels, **kw, **extra)["total"] for name, extra in configs}
        if a.repeats:
            rows.append((num_tokens, "time", f"{best['S=1']:.1f} s", columns, best))
        rows.append((num_tokens, "FLOPs", f"{work['S=1'] / 1e12:.2f} TFLOP", columns, work))
    print()
    names = [f"S={v.strip()}" for v in a.ar_steps.split(",") if v.strip() != "1"]  # L stays "S=L"
    nc = [f"S={a.no_cache_at} no cache / S={a.no_cache_at} cache"] if a.no_cache_at else []
    print("| " + " | ".join(["tokens", "measure", "S=1 (cache)"] + names + nc) + " |")
    print("|" + "---|" * (3 + len(names) + len(nc)))
    for num_tokens, measure, unit_value, columns, vals in rows:
        cells = [str(num_tokens), measure, unit_value] + [f"{vals[f'S={s}'] / vals['S=1']:.2f}x" for s in columns]
        if a.no_cache_at:
            cells.append(f"{vals['no cache'] / vals[f'S={a.no_cache_at}']:.2f}x")
        print("| " + " | ".join(cells) + " |")


def parse_ar_steps(text: str, num_tokens: int) -> list[int]:
    """'1,2,4,8,L' -> [2, 4, 8, num_tokens] (S=1 is the unit, always timed)."""
    out = []
    for v in text.split(","):
        s = num_tokens if v.strip() == "L" else int(v)
        if not 1 <= s <= num_tokens:
            raise SystemExit(f"error: AR steps must be in 1..{num_tokens} or L, got {v}")
        if s != 1:
            out.append(s)
    return out


if __name__ == "__main__":
    main()
