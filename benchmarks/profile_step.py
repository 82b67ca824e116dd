"""Where one S=1 bf16 training step goes, eager and compiled, against a plain pre-LN transformer.

The S preset (12 layers x 384 wide, 6 heads) at 256 tokens (32x32x4 latents, patch 2), batch 8,
bf16 autocast, AdamW; random weights (timing only). Three steps are profiled with torch.profiler
and their self CPU time summed by op group:

* CausalFusion, eager (the ``train`` default);
* CausalFusion, compiled (``train --compile``): inductor's fused kernels (LayerNorm, GELU, softmax,
  casts; forward and backward) land in "other", and the largest are listed by name;
* a plain pre-LN transformer of the same depth, width, heads and MLP on the same 260 tokens: no
  mask, no QK-norm, no embeddings or timestep MLP, a mean-square loss (the floor for this size),
  eager and compiled (``torch.compile``, the same inductor options): how far compiling gets on a
  transformer with nothing of CausalFusion's in it.

The matmul group (linear layers and the attention's two matmuls) is work that compiling leaves to
the same oneDNN kernels, so matmul / eager step bounds compiled / eager from below. Last, the two
attention implementations of ``causalfusion.attention`` alone, bf16 forward + backward, one layer.

    python benchmarks/profile_step.py [--steps 3]
"""
from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.attention import attend, explicit_attention
from causalfusion.compiling import INDUCTOR_OPTIONS, CompiledForward
from causalfusion.diffusion import Diffusion
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.objective import causalfusion_loss
from causalfusion.optimization import adamw

SHAPE = dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000)
GROUPS = {  # op-name fragments -> group (first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn", "aten::baddbmm"),
    "attention (fused kernel, softmax, mask)": ("scaled_dot_product", "softmax", "masked_fill"),
    "LayerNorm": ("layer_norm",),
    "GELU": ("gelu",),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::gather"),
    "elementwise (residuals, loss, AdamW)": ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::sum",
                                             "aten::mean", "aten::pow", "aten::fill_", "aten::zero_", "aten::lerp",
                                             "aten::addc", "aten::sqrt", "_foreach", "_fused_adamw"),
}


class PlainBlock(nn.Module):
    """Pre-LN block: x + attn(LN x), then x + MLP(LN x); the attention as CausalFusion's, without a mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attend(q, k, v, None).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


def group_times(prof) -> dict[str, float]:
    """Self CPU ms per op group (``GROUPS``; inductor's fused kernels and the rest are "other")."""
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        fused = "cpp_fused" in e.key
        group = next((g for g, keys in GROUPS.items() if not fused and any(k in e.key for k in keys)), "other")
        out[group] += e.self_cpu_time_total / 1e3
    return out


def fused_kernels(prof, steps: int) -> dict[str, float]:
    """ms per step of each of inductor's fused kernels, by name (the same name in several graphs summed)."""
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if "cpp_fused_" in e.key:
            name = re.sub(r"_\d+$", "", e.key.split("cpp_fused_", 1)[1]).strip("_")
            out[name] += e.self_cpu_time_total / 1e3 / steps
    return out


def measure(step, steps: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """(median wall s of ``steps`` unprofiled calls, mean self ms per group over ``steps`` profiled
    ones, ms per step of each fused kernel)."""
    for _ in range(2):
        step()  # warm-up (and compilation)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    with profile() as prof:
        for _ in range(steps):
            step()
    return sorted(walls)[steps // 2], {k: v / steps for k, v in group_times(prof).items()}, fused_kernels(prof, steps)


def causalfusion_step(cfg: ModelConfig, compiled: bool, x0: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = CausalFusion(cfg)
    opt, diffusion, plan = adamw(model.parameters(), lr=1e-4), Diffusion(), ARPlanConfig(fixed_steps=1)
    run = CompiledForward(model) if compiled else None

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = causalfusion_loss(model, diffusion, x0, y, plan, torch.Generator().manual_seed(0), run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def plain_step(cfg: ModelConfig, batch: int, compiled: bool):
    torch.manual_seed(0)
    model = nn.Sequential(*(PlainBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)),
                          nn.LayerNorm(cfg.hidden_size))
    opt = adamw(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.num_cond + cfg.num_tokens, cfg.hidden_size)
    forward = torch.compile(model, dynamic=False, options=INDUCTOR_OPTIONS) if compiled else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def attention_ms(fn, b: int, h: int, n: int, d: int, repeats: int = 20) -> float:
    """Median ms of one bf16 forward + backward of ``fn(q, k, v, None)`` at [b, h, n, d]."""
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        fn(q, k, v, None).float().sum().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[repeats // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed and profiled steps per model")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--kernels", type=int, default=6, help="largest fused kernels listed per compiled model")
    a = p.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = True  # name each fused kernel in the profile
    cfg = ModelConfig.from_preset("S", **SHAPE)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.batch, 4, 32, 32, generator=g).clamp(-1, 1)
    y = torch.randint(0, cfg.num_classes, (a.batch,), generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; S preset, {cfg.num_tokens} tokens, "
          f"batch {a.batch}, bf16, S=1")
    results = {"CausalFusion eager": measure(causalfusion_step(cfg, False, x0, y), a.steps),
               "CausalFusion compiled": measure(causalfusion_step(cfg, True, x0, y), a.steps),
               "plain transformer eager": measure(plain_step(cfg, a.batch, False), a.steps),
               "plain transformer compiled": measure(plain_step(cfg, a.batch, True), a.steps)}
    names = list(results)
    groups = list(GROUPS) + ["other"]
    print("\n| ms per step (profiled, self CPU) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for grp in groups:
        print(f"| {grp} | " + " | ".join(f"{results[n][1].get(grp, 0.0):.0f}" for n in names) + " |")
    print("| total (profiled) | " + " | ".join(f"{sum(results[n][1].values()):.0f}" for n in names) + " |")
    print("| wall s per step (unprofiled, median) | " + " | ".join(f"{results[n][0]:.3f}" for n in names) + " |")
    eager = results["CausalFusion eager"][1]
    floor = eager["matmul"] / sum(eager.values())
    print(f"\nmatmul share of the eager step: {floor:.0%} (a compiler that leaves matmuls as they are "
          f"cannot reach compiled/eager below {floor:.2f})")
    wall = {n: r[0] for n, r in results.items()}
    print(f"eager CausalFusion / plain transformer (wall): {wall['CausalFusion eager'] / wall['plain transformer eager']:.2f}")
    print(f"compiled / eager (wall): CausalFusion {wall['CausalFusion compiled'] / wall['CausalFusion eager']:.2f}, "
          f"plain transformer {wall['plain transformer compiled'] / wall['plain transformer eager']:.2f}")
    for name in ("CausalFusion compiled", "plain transformer compiled"):
        kernels = sorted(results[name][2].items(), key=lambda kv: -kv[1])
        print(f"\n{name}: fused kernels {sum(results[name][2].values()):.0f} ms per step; the largest:")
        for kernel, ms in kernels[:a.kernels]:
            print(f"  {ms:6.1f} ms  {kernel}")
    b, h, n, d = a.batch, cfg.num_heads, cfg.num_cond + cfg.num_tokens, cfg.hidden_size // cfg.num_heads
    fused = attention_ms(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), b, h, n, d)
    print(f"attention alone, bf16 forward + backward, [{b}, {h}, {n}, {d}]: fused kernel {fused:.1f} ms, "
          f"written out {attention_ms(explicit_attention, b, h, n, d):.1f} ms")


if __name__ == "__main__":
    main()
