"""The digits demo: train a small CausalFusion on scikit-learn's digits on CPU, sample, check.

Sized to finish in a few minutes on 2 cores (see README for the measured time and accuracy).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .ar_plan import ARPlanConfig
from .digits_check import class_agreement
from .images import save_grid
from .models import ModelConfig
from .one_step_sampler import sample_one_step
from .trainer import TrainConfig, Trainer

# The demo model: 16 tokens of 2x2 pixels, 4 class tokens, paper defaults for the AR plan.
DEMO_MODEL = dict(image_size=8, in_channels=1, patch_size=2, num_classes=10)
DEMO_TRAIN = dict(data="digits", steps=1200, batch_size=64, lr=5e-4, warmup=100, ema_decay=0.999,
                  precision="bf16", log_every=50, ckpt_every=400, sample_every=600, sample_steps=50)


def demo_configs(out: str, steps: int | None = None, **overrides) -> tuple[ModelConfig, ARPlanConfig, TrainConfig]:
    train = {**DEMO_TRAIN, "out": out, **overrides}
    if steps is not None:
        train["steps"] = steps
    return ModelConfig.from_preset("tiny", **DEMO_MODEL), ARPlanConfig(), TrainConfig(**train)


def check_samples(model, out: Path, per_class: int = 20, steps: int = 100, cfg: float = 1.0, seed: int = 0) -> tuple[float, Path]:
    """Sample ``per_class`` digits of each class, save the grid, return the classifier agreement."""
    labels = torch.arange(10).repeat_interleave(per_class)
    images = sample_one_step(model, labels, steps=steps, cfg=cfg, seed=seed, progress=True)
    path = out / "demo_grid.png"
    save_grid(images.view(10, per_class, *images.shape[1:])[:, :10].flatten(0, 1), path, nrow=10, scale=4)
    return class_agreement(images, labels), path


def run_demo(out: str = "runs/demo", steps: int | None = None, resume: bool = False, **overrides) -> dict:
    """Train (or resume) the demo run in ``out``; write grids; return paths and the accuracy.
    Resumed without ``steps``, the run goes on to the step count it was started with."""
    if resume and steps is None:
        from .checkpoint import read_run_config

        steps = read_run_config(out).get("train", {}).get("steps")
    model_cfg, plan_cfg, train_cfg = demo_configs(out, steps, **overrides)
    trainer = Trainer(model_cfg, plan_cfg, train_cfg, resume=resume)
    trainer.train()
    acc, grid = check_samples(trainer.ema.eval(), Path(out))
    return {"out": out, "grid": str(grid), "accuracy": acc, "step": trainer.step}
