"""Sampling in one AR step (S = 1: the In-context DiT mode the paper's headline numbers use).

DDPM ancestral sampling with the fixed large variance, respaced to ``steps`` (default 250), and
classifier-free guidance on all channels: the conditional and null-class passes run as one doubled
batch, and guidance applies only for original timesteps t in [lo, hi) (the CFG interval).

Every sample draws its noise from its own generator, seeded from (seed, index of the sample), so a
sample does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .diffusion import Diffusion
from .models import CausalFusion


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the run seed and the sample's global index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def per_sample_randn(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack of one standard normal tensor per generator: [len(generators), *shape]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def check_cfg(scale: float, interval: tuple[float, float]) -> None:
    if scale < 0:
        raise ValueError(f"CFG scale must be >= 0, got {scale}")
    lo, hi = interval
    if not 0 <= lo <= hi <= 1000:
        raise ValueError(f"CFG interval must satisfy 0 <= lo <= hi <= 1000, got {lo},{hi}")


def guided_eps(eps_fn, x: torch.Tensor, t: int, y: torch.Tensor, null: int, scale: float,
               interval: tuple[float, float]) -> torch.Tensor:
    """eps for x at original timestep t, with classifier-free guidance when t is in [lo, hi).

    ``eps_fn(x, t_batch, y)`` is the model call. Outside the interval (or with scale 1) the null
    pass is skipped: the guided value would equal the conditional one anyway.
    """
    b = x.shape[0]
    guide = scale != 1.0 and interval[0] <= t < interval[1]
    if not guide:
        return eps_fn(x, torch.full((b,), t, device=x.device), y)
    y2 = torch.cat([y, torch.full_like(y, null)])
    eps = eps_fn(torch.cat([x, x]), torch.full((2 * b,), t, device=x.device), y2)
    cond, uncond = eps.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_one_step(
    model: CausalFusion,
    labels: torch.Tensor,
    steps: int = 250,
    cfg: float = 1.0,
    cfg_interval: tuple[float, float] = (0, 1000),
    seed: int = 0,
    first_index: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """S=1 DDPM sampling. labels [B] (num_classes = unconditional) -> images [B, C, H, W] in model space.

    ``first_index`` is the global index of the first sample (for per-sample seeding across batches).
    """
    check_cfg(cfg, cfg_interval)
    c = model.cfg
    if labels.numel() and (labels.min() < 0 or labels.max() > c.num_classes):
        raise ValueError(f"class ids must be in 0..{c.num_classes - 1} (or {c.num_classes} for unconditional)")
    device = next(model.parameters()).device
    diffusion = Diffusion().respace(steps)
    gens = sample_generators(seed, range(first_index, first_index + len(labels)))
    shape = (c.in_channels, c.image_size, c.image_size)
    x = per_sample_randn(gens, shape, device)
    y = labels.to(device)
    for i in tqdm(range(len(diffusion) - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        t = int(diffusion.timesteps[i])
        eps = guided_eps(model.predict_eps, x, t, y, c.num_classes, cfg, cfg_interval)
        x = diffusion.ddpm_step(x, i, eps.float(), per_sample_randn(gens, shape, device))
    return x
