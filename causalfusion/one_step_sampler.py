"""The original S=1 sampler (In-context DiT mode): the whole image is one AR step, denoised with
DDPM over respaced steps, classifier-free guidance on an interval. ``sampling.sample`` must
reproduce it draw for draw at S=1 (tests/test_sampling.py); the trainer's in-loop grids use it.
"""
from __future__ import annotations

import torch
from .progress import progress_iter

from .diffusion import Diffusion
from .models import CausalFusion
from .sampling import check_cfg, check_labels, per_sample_randn, sample_generators


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
    check_labels(labels, c.num_classes)
    device = next(model.parameters()).device
    diffusion = Diffusion(prediction=c.prediction).respace(steps)
    gens = sample_generators(seed, range(first_index, first_index + len(labels)))
    shape = (c.in_channels, c.image_size, c.image_size)
    x = per_sample_randn(gens, shape, device)
    y = labels.to(device)
    for i in progress_iter(range(len(diffusion) - 1, -1, -1), len(diffusion), desc="sampling", disable=not progress):
        t = int(diffusion.timesteps[i])
        eps = guided_eps(model.predict_one_step, x, t, y, c.num_classes, cfg, cfg_interval)
        x = diffusion.ddpm_step(x, i, eps.float(), per_sample_randn(gens, shape, device))
    return x
