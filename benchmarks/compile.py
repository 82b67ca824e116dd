"""Eager against compiled (``--compile``): training step and sampling time, measured in one run.

The S preset (12 layers x 384 wide, 6 heads) at 256 tokens (32x32x4 latents, patch 2; random
weights: timing only). Training: batch 8, fp32 and bf16, at S=1 and with the paper's γ=0.9 plan,
eager (``train``) and compiled (``train --compile``; the clean prefix padded to a bucket,
``shape_buckets``). A warm-up step on every bucket compiles all graphs first, with inductor's
on-disk caches off (the "compile s" column is a cold compile); the timed steps then draw fresh AR
plans, as training does. Sampling: S=1 and S=4 with the KV cache. The two modes are measured
alternately (load from other jobs on the machine hits both alike); tables give medians of times
and of per-step ratios. MFU is the model's FLOPs (forward + backward, no padding;
``torch.utils.flop_counter``) per second against this machine's matmul peak, measured here on a
2048³ matmul in the same precision.

    python benchmarks/compile.py [--steps 5] [--sample-steps 10] [--batch 8] [--sample-batch 8]
                                 [--precisions fp32,bf16] [--sample-precisions fp32,bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.compiling import CompiledForward, compile_seconds
from causalfusion.diffusion import Diffusion
from causalfusion.flop_count import count_flops
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.objective import draw_plan_and_noise, noised_loss
from causalfusion.sampling import sample
from causalfusion.shape_buckets import CLEAN_BUCKET
from causalfusion.optimization import adamw

SHAPE = dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(precision: str, repeats: int = 5, size: int = 2048) -> float:
    """Best FLOP/s of a size³ matmul in this precision."""
    a, b = (torch.randn(size, size).to(DTYPES[precision]) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


MODES = ("eager", "compiled")


class TrainSetting:
    """One model + optimizer in one of ``MODES``; ``step(seed)`` draws its AR plan from ``seed``."""

    def __init__(self, cfg: ModelConfig, plan: ARPlanConfig, precision: str, mode: str, x0, y):
        torch.manual_seed(0)
        self.model = CausalFusion(cfg)
        self.opt = adamw(self.model.parameters(), lr=1e-4)
        self.run_model = CompiledForward(self.model) if mode == "compiled" else None
        self.plan, self.precision, self.x0, self.y = plan, precision, x0, y
        self.diffusion = Diffusion()

    def loss(self, seed: int, group_sizes: list[int] | None = None) -> torch.Tensor:
        """The loss of the plan drawn from ``seed`` (its split replaced by ``group_sizes`` if given)."""
        cfg = self.model.cfg
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            plan, noise = draw_plan_and_noise(self.plan, len(self.x0), cfg, self.diffusion.num_timesteps,
                                              torch.Generator().manual_seed(seed))
            sizes = group_sizes or plan.group_sizes
            return noised_loss(self.model, self.diffusion, self.x0, self.y, plan.order, plan.t, noise, sizes,
                               plan.weights, self.run_model)

    def step(self, seed: int, group_sizes: list[int] | None = None) -> float:
        t0 = time.perf_counter()
        loss = self.loss(seed, group_sizes)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def bucket_splits(num_tokens: int, plan: ARPlanConfig) -> list[list[int] | None]:
    """One split per padded clean-prefix length a plan can draw (S=1: its own)."""
    if plan.fixed_steps == 1:
        return [None]
    return [[n, num_tokens - n] for n in range(CLEAN_BUCKET, num_tokens, CLEAN_BUCKET)] + [[num_tokens - 1, 1], None]


def alternate(eager, compiled, runs: int) -> tuple[float, float, float]:
    """(median eager s, median compiled s, median of per-pair compiled/eager) over ``runs`` pairs;
    ``eager(i)``/``compiled(i)`` time run i."""
    pairs = [(eager(i), compiled(i)) for i in range(runs)]
    e, c = zip(*pairs)
    return statistics.median(e), statistics.median(c), statistics.median(b / a for a, b in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setting and mode")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--precisions", default="fp32,bf16", help="training precisions")
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling run")
    p.add_argument("--sample-steps", type=int, default=10, help="diffusion steps per AR step")
    p.add_argument("--sample-precisions", default="fp32,bf16", help="sampling precisions")
    p.add_argument("--sample-runs", type=int, default=3, help="timed sampling runs per setting and mode")
    p.add_argument("--ar-steps", default="1,4", help="sampling AR steps")
    a = p.parse_args()
    torch._inductor.config.force_disable_caches = True  # compile s: a cold compile, not a cache hit
    cfg = ModelConfig.from_preset("S", **SHAPE)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.batch, 4, 32, 32, generator=g).clamp(-1, 1)
    y = torch.randint(0, cfg.num_classes, (a.batch,), generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; S preset, {cfg.num_tokens} tokens")
    peaks = {prec: matmul_peak(prec) for prec in sorted(set(a.precisions.split(",") + a.sample_precisions.split(",")))}
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print("\n| training step | eager s | compiled s | compiled/eager | MFU eager | MFU compiled | compile s |")
    print("|---|---|---|---|---|---|---|")
    plans = {"S=1": ARPlanConfig(fixed_steps=1), "γ=0.9": ARPlanConfig(gamma=0.9)}
    for prec in a.precisions.split(","):
        for name, plan in plans.items():
            settings = {m: TrainSetting(cfg, plan, prec, m, x0, y) for m in MODES}
            c0 = compile_seconds()
            for sizes in bucket_splits(cfg.num_tokens, plan):  # every bucket's graph (and kernels) once
                for s in settings.values():
                    s.step(0, sizes)
            compile_s = compile_seconds() - c0
            seeds = [1000 + i for i in range(a.steps)]  # fresh plans, as a run draws them
            flops = {i: count_flops(lambda: settings["eager"].loss(i).backward())["total"] for i in seeds}
            times = [{m: settings[m].step(i) for m in MODES} for i in seeds]
            med = {m: statistics.median(t[m] for t in times) for m in MODES}
            ratio = {m: statistics.median(t[m] / t["eager"] for t in times) for m in MODES}
            mfu = {m: statistics.median(flops[i] / t[m] for i, t in zip(seeds, times)) / peaks[prec] for m in MODES}
            print(f"| {prec} {name} | {med['eager']:.3f} | {med['compiled']:.3f} | {ratio['compiled']:.2f} | "
                  f"{mfu['eager']:.0%} | {mfu['compiled']:.0%} | {compile_s:.0f} |", flush=True)
    print("\n| sampling | eager s | compiled s | compiled/eager | MFU eager | MFU compiled | compile s |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    model = CausalFusion(cfg).eval()
    labels = torch.arange(a.sample_batch) % cfg.num_classes
    for prec in a.sample_precisions.split(","):
        for s in (int(v) for v in a.ar_steps.split(",")):
            kw = dict(ar_steps=s, steps=a.sample_steps, precision=prec, order="random")

            def run(compiled: bool) -> float:
                t0 = time.perf_counter()
                sample(model, labels, compile=compiled, **kw)
                return time.perf_counter() - t0

            c0 = compile_seconds()
            run(False), run(True)
            compile_s = compile_seconds() - c0
            flops = count_flops(lambda: sample(model, labels, **kw))["total"]
            e, c, ratio = alternate(lambda i: run(False), lambda i: run(True), a.sample_runs)
            print(f"| {prec} S={s}, {a.sample_batch} images x {a.sample_steps} steps | {e:.2f} | {c:.2f} | {ratio:.2f} | "
                  f"{flops / e / peaks[prec]:.0%} | {flops / c / peaks[prec]:.0%} | {compile_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
