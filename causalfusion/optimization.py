"""The optimisation step every trainer here shares (Trainer, DistributedTrainer, multimodal MMTrainer):
the paper's AdamW, linear lr warm-up, gradient clipping, the EMA, and the divergence checks."""
from __future__ import annotations

import math

import torch


def adamw(params, lr: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """The paper's optimiser (Tab. 9/10): AdamW with betas (0.9, 0.95) and no weight decay (the
    release's train.py also sets eps 1e-15). ``fused``: one kernel updates every tensor; the default
    on a CPU is a Python loop of several kernels per tensor."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=0.0, fused=True)


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return lr * min(1.0, (step + 1) / max(warmup, 1))


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay with a warm-up, min(decay, (1+step)/(10+step)): a short run's EMA would
    otherwise still be mostly its random initialisation (0.999^1000 = 37% of it). The release
    uses the plain decay (``warmup=False``); over the paper's ~150k steps the two end alike."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)  # one kernel per dtype, not per tensor


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def apply_gradients(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float,
                    ema_decay: float, step: int = 0) -> float:
    """After backward: clip the global grad norm, take the optimizer step, move the EMA; the pre-clip
    norm. A NaN or inf norm stops before the step (FloatingPointError naming ``step``): clipping would
    scale an inf gradient to NaN weights."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(gnorm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
        gnorm = gnorm.full_tensor()
    norm = float(gnorm)
    if not math.isfinite(norm):
        raise FloatingPointError(f"gradient norm is {norm} at step {step}; stopping before it is applied "
                                 "(the last checkpoint, if any, is left as it was; try a lower --lr)")
    opt.step()
    update_ema(ema, model, ema_decay)
    return norm


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping "
                                 "(the last checkpoint, if any, is left as it was; try a lower --lr)")
