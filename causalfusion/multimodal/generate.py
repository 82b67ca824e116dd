"""Text-to-image and captioning with a multimodal CausalFusion.

Text-to-image runs the class-conditional sampler, ``causalfusion.sampling.sample``
(any S, group sizes, order, DDPM/DDIM, CFG interval, KV cache or the uncached reference), on the
image backbone with a text ``Condition`` (``text_condition``) in place of the class tokens: the
prompt's T text slots, causal among themselves; the null rows of a CFG batch may not see the text
at all -- their image tokens see only image tokens, i.e. they run the text-free image model that
the image-first sequences train, which is the paper's CFG baseline.

Captioning puts the image in a KV cache (``MultimodalCausalFusion.image_prefix``) and decodes
the caption token by token (greedy, or temperature / top-k sampling with per-image generators),
one cached step per token.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..sampling import check_cfg, model_order, sample, sample_generators
from ..sampling_runners import Condition
from .model import MultimodalCausalFusion
from .tokenizer import TextTokenizer


def check_decoding(temperature: float, top_k: int) -> None:
    """NaN/inf temperatures would make softmax NaN (a torch error) or uniform noise (garbage captions)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 1 (or 0 for all tokens), got {top_k}")


def text_condition(model: MultimodalCausalFusion, ids: torch.Tensor, null_rows: bool) -> Condition:
    """Prompt ids [B, T] -> the sampler's condition: the T text slots, causal among themselves as in
    training, seen by the image tokens; with ``null_rows`` (CFG) B more rows, last, whose image
    tokens may not see the text at all -- they run the text-free image model that the image-first
    sequences train, the paper's CFG baseline. (The null rows carry the same ids only so that every
    row has T condition tokens.)"""
    b = ids.shape[0]
    reps = 2 if null_rows else 1
    visible = torch.arange(reps * b, device=ids.device) < b
    return Condition(model.embed_text(ids.repeat(reps, 1)), causal=True, visible=visible)


@torch.no_grad()
def text_to_image(model: MultimodalCausalFusion, tokenizer: TextTokenizer, prompts: Sequence[str], *,
                  cfg: float = 3.0, cfg_interval: tuple[float, float] = (0, 1000), ar_steps: int | None = None,
                  groups: Sequence[int] | None = None, order=None, block: int | None = None,
                  dilation: int | None = None, steps: int | Sequence[int] = 50, sampler: str = "ddpm",
                  eta: float = 0.0, seed: int = 0, first_index: int = 0, cache: bool = True,
                  progress: bool = False) -> torch.Tensor:
    """Prompts -> images [len(prompts), C, H, W] in the data range [-1, 1], not clamped. ``cfg``
    guides against the text-free image model for t in ``cfg_interval``; the rest are
    ``sampling.sample``'s options (``order`` None: the model's training order)."""
    if not prompts:
        raise ValueError("no prompts given")
    check_cfg(cfg, cfg_interval)
    device = next(model.parameters()).device
    ids = torch.stack([tokenizer.prompt(p, model.text_len) for p in prompts]).to(device)
    order, block, dilation = model_order(model, order, block, dilation)  # the backbone does not carry them
    return sample(model.backbone, text_condition(model, ids, null_rows=cfg != 1.0), ar_steps=ar_steps,
                  groups=groups, order=order, block=block, dilation=dilation, steps=steps, sampler=sampler,
                  eta=eta, cfg=cfg, cfg_interval=cfg_interval, seed=seed, first_index=first_index, cache=cache,
                  progress=progress)


def check_images(model: MultimodalCausalFusion, images: torch.Tensor) -> None:
    c = model.cfg
    want = (c.in_channels, c.image_size, c.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"captioning needs images of shape {list(want)} (C, H, W), got {list(images.shape[1:])}")


@torch.no_grad()
def caption(model: MultimodalCausalFusion, tokenizer: TextTokenizer, images: torch.Tensor, *,
            temperature: float = 0.0, top_k: int = 0, seed: int = 0, first_index: int = 0) -> list[str]:
    """Images [B, C, H, W] in [-1, 1] -> captions. ``temperature`` 0 is greedy; otherwise sample
    from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens if > 0.
    Image i draws from its own generator, seeded from (``seed``, ``first_index`` + i) as in
    ``sampling.sample``, so its caption does not depend on the batch it is in."""
    check_images(model, images)
    check_decoding(temperature, top_k)
    device = next(model.parameters()).device
    b, tl = images.shape[0], model.text_len
    gens = sample_generators(seed, range(first_index, first_index + b))
    cache = model.image_prefix(images.to(device), tl)
    tok = torch.full((b, 1), tokenizer.bos, dtype=torch.long, device=device)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(tl - 1):  # slot i holds token i and predicts token i+1
        h = model.backbone.run_blocks(model.embed_text(tok, i), None, cache)  # sees the image + text so far
        cache.commit(1)
        logits = model.text_logits(h[:, -1]).float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1).cpu()
            nxt = torch.cat([torch.multinomial(pr, 1, generator=g) for pr, g in zip(probs, gens)]).to(device)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == tokenizer.eos
        if bool(done.all()):
            break
        tok = nxt[:, None]
    texts = []
    for row in out.tolist():
        texts.append(tokenizer.decode(row[:row.index(tokenizer.eos)] if tokenizer.eos in row else row))
    return texts
