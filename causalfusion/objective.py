"""The CausalFusion training objective (paper Eq. 5 with the AR-weighted Eq. 4).

For a batch: draw the AR plan (S, cut points, orders, t), noise the image tokens with each token's
own t, let the model predict the noise of all noisy tokens from [condition | clean prefix | noisy]
under the generalized causal mask, and average the AR-weighted squared error.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .ar_plan import ARPlan, ARPlanConfig, sample_plan
from .diffusion import Diffusion, denoising_loss
from .models import CausalFusion, ModelConfig


def drop_labels(y: torch.Tensor, p: float, null: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator) < p
    return torch.where(drop.to(y.device), torch.full_like(y, null), y)


def causalfusion_loss(
    model: CausalFusion,
    diffusion: Diffusion,
    x0: torch.Tensor,
    y: torch.Tensor,
    plan_cfg: ARPlanConfig,
    generator: torch.Generator | None = None,
    run_model: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ARPlan]:
    """Scalar loss for clean images x0 [B, C, H, W] and (already label-dropped) classes y [B];
    ``run_model`` as in ``noised_loss`` (e.g. ``compiling.CompiledForward``)."""
    diffusion.check_model(model.cfg.prediction)
    device = x0.device
    plan, noise = draw_plan_and_noise(plan_cfg, x0.shape[0], model.cfg, diffusion.num_timesteps, generator)
    loss = noised_loss(model, diffusion, x0, y, plan.order.to(device), plan.t.to(device), noise.to(device),
                       plan.group_sizes, plan.weights.to(device), run_model)
    return loss, plan


def draw_plan_and_noise(plan_cfg: ARPlanConfig, batch: int, model_cfg: ModelConfig, num_timesteps: int,
                        generator: torch.Generator | None = None) -> tuple[ARPlan, torch.Tensor]:
    """A batch's AR plan, then its noise [B, K, L, P] (raster order), from ``generator`` in this order:
    the single-process and the distributed trainer both draw through here, so they stay one stream."""
    plan = sample_plan(plan_cfg, batch, model_cfg.grid, num_timesteps, generator)
    noise = torch.randn((batch, plan_cfg.t_copies, model_cfg.num_tokens, model_cfg.patch_dim), generator=generator)
    return plan, noise


def noised_loss(model: CausalFusion, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor, group_sizes: list[int], weights: torch.Tensor,
                run_model: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """The loss for drawn randomness: x0 [B, C, H, W], y [B], order [B, L], t [B, K, L] (AR order),
    noise [B, K, L, P] (raster order), weights [L] (AR order). ``run_model`` is the callable that
    runs the model (a DDP/FSDP wrapper of ``model``; default ``model`` itself)."""
    b, k, num_tokens, p = noise.shape
    # The model's forward takes images (it patchifies and applies the order itself), so the noisy
    # image is built in raster order: the plan's t (AR order) move to raster positions first, and a
    # pixel's noise does not depend on the order drawn. The target is then gathered into AR order.
    x0_tok = model.patchify(x0)  # [B, L, P]
    t_raster = torch.empty_like(t).scatter_(2, order[:, None, :].expand(b, k, num_tokens), t)
    xt_tok = diffusion.q_sample(x0_tok[:, None].expand(b, k, num_tokens, p), t_raster, noise)
    xt = model.unpatchify(xt_tok.flatten(0, 1)).view(b, k, *x0.shape[1:])
    out = (run_model or model)(x0, xt, t, y, group_sizes, order)  # [B, K, L, P], AR order
    return denoising_loss(out, ar_target(diffusion, x0_tok, t, noise, order), weights)


def ar_target(diffusion: Diffusion, x0_tok: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              order: torch.Tensor) -> torch.Tensor:
    """The regression target in AR order [B, K, L, P]: x0_tok [B, L, P] and noise [B, K, L, P] in
    raster order, t [B, K, L] and order [B, L] in AR order."""
    b, k, num_tokens, p = noise.shape
    idx = order[:, None, :, None].expand(b, k, num_tokens, p)
    x0_ar = torch.gather(x0_tok[:, None].expand(b, k, num_tokens, p), 2, idx)
    return diffusion.target(x0_ar, t, torch.gather(noise, 2, idx))
