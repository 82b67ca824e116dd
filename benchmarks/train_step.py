"""Step time of CausalFusion (γ=0.9, random AR steps) relative to In-context DiT (S=1).

Both train on the same batch with the same model; only the AR plan differs. CausalFusion's
sequence also holds the clean tokens of all but the last AR step (C + L - |k_S| + L tokens instead
of C + L), so its step costs more. Prints one table; ratios are measured in this one run.

    python benchmarks/train_step.py [--steps 8] [--presets tiny,S]
"""
from __future__ import annotations

import argparse
import time

import torch

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.diffusion import Diffusion
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.objective import causalfusion_loss
from causalfusion.optimization import adamw

# tiny: the digits demo (8x8x1, patch 2 -> 16 tokens); S: the paper's ablation input
# (ImageNet 256 -> SD-VAE 32x32x4 latents, patch 2 -> 256 tokens).
SETUPS = {
    "tiny": (dict(image_size=8, in_channels=1, patch_size=2, num_classes=10), 64),
    "S": (dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000), 8),
}


def time_steps(model, opt, x0, y, plan_cfg, precision, steps, seed=0) -> float:
    diffusion, gen = Diffusion(), torch.Generator().manual_seed(seed)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = causalfusion_loss(model, diffusion, x0, y, plan_cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up)")
    ap.add_argument("--presets", default="tiny,S")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | tokens | batch | precision | In-context DiT s/step | CausalFusion s/step | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in a.presets.split(","):
        shape, batch = SETUPS[name]
        cfg = ModelConfig.from_preset(name, **shape)
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).clamp(-1, 1)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
        for precision in ("fp32", "bf16"):
            res = {}
            for label, plan in (("dit", ARPlanConfig(fixed_steps=1)), ("cf", ARPlanConfig(gamma=0.9))):
                torch.manual_seed(0)
                model = CausalFusion(cfg)
                opt = adamw(model.parameters(), lr=1e-4)  # the trainer's optimiser
                res[label] = time_steps(model, opt, x0, y, plan, precision, a.steps)
            print(f"| {name} | {cfg.num_tokens} | {batch} | {precision} | {res['dit']:.3f} | {res['cf']:.3f} | "
                  f"{res['cf'] / res['dit']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
