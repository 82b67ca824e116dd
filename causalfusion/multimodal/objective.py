"""The mixed vision-language objective (paper Sec. 6): CausalFusion on images, next-token CE on text.

Each sequence of a batch is text-first (T2I: image loss only) with probability 1 - p, or
image-first with probability p = ``image_first_prob`` (0.1 in the paper): there the caption gets a
next-token cross-entropy weighted ``text_weight`` (0.01) and the image gets the usual loss, which
is what trains the text-free image model that classifier-free guidance needs.

The number of image-first rows is p*B stochastically rounded (expectation exactly p*B, less
variance than per-row coin flips), and which rows they are is drawn at random. Each of the two sub-batches draws its own AR plan (split, orders,
t), because one mask serves one layout. The image loss is the row-weighted mean over both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ar_plan import ARPlanConfig, sample_plan
from ..diffusion import Diffusion, denoising_loss
from .model import MultimodalCausalFusion

# The Transfusion baseline's image objective (paper: "standard diffusion loss for images"): one AR
# step with full attention in the image (gamma 0 draws S=1 always) and every token weighted 1.
TRANSFUSION_IMAGE_PLAN = {"gamma": 0.0, "lam": 1.0}


@dataclass
class MixConfig:
    image_first_prob: float = 0.1
    text_weight: float = 0.01

    def validate(self) -> None:
        if not 0.0 <= self.image_first_prob <= 1.0:
            raise ValueError(f"image-first probability must be in [0, 1], got {self.image_first_prob}")
        if not 0 <= self.text_weight < float("inf"):  # NaN too: it made the first loss NaN after config.json was written
            raise ValueError(f"text loss weight must be a finite number >= 0, got {self.text_weight}")


def split_rows(batch: int, p: float, generator: torch.Generator | None = None) -> int:
    """How many of ``batch`` rows are image-first: floor(p*B + u), u ~ U[0, 1)."""
    u = float(torch.rand((), generator=generator))
    return min(batch, int(p * batch + u))


def text_loss(logits: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Next-token CE over the real tokens. logits [B, T, V] (slot i predicts token i+1), ids [B, T],
    lens [B] (real tokens incl. <bos>/<eos>) -> mean over the B * (len-1) predicted tokens."""
    b, tl, v = logits.shape
    valid = torch.arange(tl - 1, device=ids.device)[None] < (lens.to(ids.device)[:, None] - 1)
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
    return (ce.view(b, tl - 1) * valid).sum() / valid.sum().clamp(min=1)


def _image_branch(model: MultimodalCausalFusion, diffusion: Diffusion, x0: torch.Tensor, ids: torch.Tensor,
                  plan_cfg: ARPlanConfig, image_first: bool, generator: torch.Generator | None):
    """Noise one sub-batch in token space and run its layout -> (image loss, logits or None)."""
    b, device, bb = x0.shape[0], x0.device, model.backbone
    plan = sample_plan(plan_cfg, b, model.cfg.grid, diffusion.num_timesteps, generator)
    order, t = plan.order.to(device), plan.t[:, 0].to(device)  # one noisy copy: t [B, L], AR order
    tok = bb.patchify(x0)
    x0_tok = torch.gather(tok, 1, order[..., None].expand_as(tok))  # AR order from here on
    noise = torch.randn(x0_tok.shape, generator=generator).to(device)
    xt_tok = diffusion.q_sample(x0_tok, t, noise)
    if image_first:
        out, logits = model.forward_image_first(ids, x0_tok, xt_tok, t, plan.group_sizes, order)
    else:
        out, logits = model.forward_text_first(ids, x0_tok, xt_tok, t, plan.group_sizes, order), None
    return denoising_loss(out, diffusion.target(x0_tok, t, noise), plan.weights.to(device)), logits


def multimodal_loss(model: MultimodalCausalFusion, diffusion: Diffusion, x0: torch.Tensor, ids: torch.Tensor,
                    lens: torch.Tensor, plan_cfg: ARPlanConfig, mix: MixConfig,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """images x0 [B, C, H, W], caption ids [B, T], lengths [B] -> (scalar loss, stats).

    loss = image loss (mean over all B rows) + text_weight * caption CE (image-first rows)."""
    if plan_cfg.t_copies != 1:
        raise ValueError("the multimodal objective uses one noisy copy per image (t_copies=1)")
    diffusion.check_model(model.cfg.prediction)
    b = x0.shape[0]
    n_if = split_rows(b, mix.image_first_prob, generator)
    n_tf = b - n_if
    rows = torch.randperm(b, generator=generator)  # which rows are image-first: any, not always the last
    tf_rows, if_rows = rows[:n_tf].to(x0.device), rows[n_tf:].to(x0.device)
    ids = ids.to(x0.device)
    image, text = x0.new_zeros(()), x0.new_zeros(())
    if n_tf:
        loss_tf, _ = _image_branch(model, diffusion, x0[tf_rows], ids[tf_rows], plan_cfg, False, generator)
        image = image + loss_tf * (n_tf / b)
    if n_if:
        loss_if, logits = _image_branch(model, diffusion, x0[if_rows], ids[if_rows], plan_cfg, True, generator)
        image = image + loss_if * (n_if / b)
        text = text_loss(logits, ids[if_rows], lens.to(x0.device)[if_rows])
    loss = image + mix.text_weight * text
    return loss, {"image_loss": float(image.detach()), "text_loss": float(text.detach()) if n_if else float("nan"),
                  "image_first": n_if}
