"""Eager against compiled (``--compile``): training step and sampling time, measured in one run.

The S preset (12 layers x 384 wide, 6 heads) at 256 tokens (32x32x4 latents, patch 2; random
weights: timing only). Training: batch 8, fp32 and bf16, at S=1 and with the paper's γ=0.9 plan
(random S; the same plans for both modes). Sampling: S=1 and S=4 with the KV cache. Every eager
measurement is followed by its compiled one (alternating, so load from other jobs on the machine
hits both alike); the table gives the median time of each and the median of the per-pair ratios.
Compilation happens in a warm-up before timing and is reported on its own line. MFU is the
model's FLOPs (forward + backward, no padding; ``torch.utils.flop_counter``) per second against
this machine's matmul peak, measured here on a 2048³ matmul in the same precision.

    python benchmarks/compile.py [--steps 5] [--sample-steps 10] [--batch 8] [--sample-batch 8]
                                 [--precisions fp32,bf16] [--sample-precisions fp32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.compiling import CompiledForward, compile_seconds
from causalfusion.diffusion import Diffusion
from causalfusion.flop_count import count_flops
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.objective import causalfusion_loss
from causalfusion.sampling import sample
from causalfusion.trainer import adamw

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


class TrainSetting:
    """One model + optimizer, eager or compiled; ``step(seed)`` draws its AR plan from ``seed``."""

    def __init__(self, cfg: ModelConfig, plan: ARPlanConfig, precision: str, compiled: bool, x0, y):
        torch.manual_seed(0)
        self.model = CausalFusion(cfg)
        self.opt = adamw(self.model.parameters(), lr=1e-4)
        self.run_model = CompiledForward(self.model) if compiled else None
        self.plan, self.precision, self.x0, self.y = plan, precision, x0, y
        self.diffusion = Diffusion()

    def loss(self, seed: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss, _ = causalfusion_loss(self.model, self.diffusion, self.x0, self.y, self.plan,
                                        torch.Generator().manual_seed(seed), self.run_model)
        return loss

    def step(self, seed: int) -> float:
        t0 = time.perf_counter()
        loss = self.loss(seed)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


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
    p.add_argument("--sample-precisions", default="fp32", help="sampling precisions")
    p.add_argument("--sample-runs", type=int, default=3, help="timed sampling runs per setting and mode")
    p.add_argument("--ar-steps", default="1,4", help="sampling AR steps")
    a = p.parse_args()
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
            eager, comp = (TrainSetting(cfg, plan, prec, c, x0, y) for c in (False, True))
            c0 = compile_seconds()
            for i in range(a.steps):  # warm-up on the timed plans: every padded shape compiles here
                eager.step(i), comp.step(i)
            compile_s = compile_seconds() - c0
            flops = [count_flops(lambda: eager.loss(i).backward())["total"] for i in range(a.steps)]
            times = [(eager.step(i), comp.step(i), flops[i]) for i in range(a.steps)]
            e = statistics.median(t[0] for t in times)
            c = statistics.median(t[1] for t in times)
            ratio = statistics.median(t[1] / t[0] for t in times)
            mfu_e = statistics.median(t[2] / t[0] for t in times) / peaks[prec]
            mfu_c = statistics.median(t[2] / t[1] for t in times) / peaks[prec]
            print(f"| {prec} {name} | {e:.3f} | {c:.3f} | {ratio:.2f} | {mfu_e:.0%} | {mfu_c:.0%} | {compile_s:.0f} |",
                  flush=True)
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
