"""Text-to-image and captioning with a multimodal CausalFusion.

Text-to-image reuses ``causalfusion.sampling.sample`` unchanged (any S, group sizes, order, DDPM/
DDIM, CFG interval, KV cache or the uncached reference) through ``_TextConditioned``: an adapter
that looks to the sampler like a class-conditional CausalFusion with one class (0 = "the prompt",
1 = null) and T condition tokens, where the condition tokens are the prompt's text slot. The only
thing it changes is the attention mask: the text is causal, and the null rows of a CFG batch may
not see the text at all -- their image tokens see only image tokens, i.e. they run the text-free
image model that the image-first sequences train, which is the paper's CFG baseline.

Captioning puts the image in a KV cache (``MultimodalCausalFusion.image_prefix``) and decodes
the caption token by token (greedy, or temperature / top-k sampling with per-image generators),
one cached step per token.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..sampling import check_cfg, model_order, sample, sample_generators
from .model import MultimodalCausalFusion
from .tokenizer import TextTokenizer


def check_decoding(temperature: float, top_k: int) -> None:
    """NaN/inf temperatures would make softmax NaN (a torch error) or uniform noise (garbage captions)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 1 (or 0 for all tokens), got {top_k}")


class _TextConditioned:
    """What ``sample`` drives (cfg, embed_cond, embed_tokens, run_blocks, output, patchify,
    unpatchify, parameters), with the prompt ids [B, T] as the condition tokens."""

    def __init__(self, model: MultimodalCausalFusion, ids: torch.Tensor):
        c = model.cfg
        self.model, self.ids, self.text_len = model, ids, model.text_len
        self.cfg = SimpleNamespace(num_classes=1, num_cond=model.text_len, num_tokens=c.num_tokens, depth=c.depth,
                                   grid=c.grid, in_channels=c.in_channels, image_size=c.image_size,
                                   patch_dim=c.patch_dim, prediction=c.prediction)
        self.sees_text: torch.Tensor | None = None  # [rows] bool, False for the null (text-free) rows
        bb = model.backbone
        self.embed_tokens, self.output, self.patchify, self.unpatchify = (
            bb.embed_tokens, bb.output, bb.patchify, bb.unpatchify)

    def parameters(self):
        return self.model.parameters()

    def embed_cond(self, y: torch.Tensor) -> torch.Tensor:
        """y [rows]: 0 for the prompt rows, 1 for the null rows (which get the same ids, unseen)."""
        self.sees_text = y == 0
        ids = self.ids.repeat(y.shape[0] // self.ids.shape[0], 1)
        return self.model.embed_text(ids)

    def run_blocks(self, h: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        rows, n, tl = h.shape[0], h.shape[1], self.text_len
        sees = self.sees_text[:rows].to(h.device)  # rows < all: the conditional half (listed first)
        causal = torch.ones(tl, tl, dtype=torch.bool, device=h.device).tril()
        # An empty cache means this is sampling's first call (``_CachedRunner.__init__``): the
        # prompt itself goes into the cache, causal among its own tokens.
        if cache is not None and getattr(cache, "length", 1) == 0:
            m = causal
        elif cache is not None and bool(sees.all()):  # cached, no null rows: everything visible
            m = None
        else:
            if cache is not None:  # image tokens after a cached prefix [text | finished groups]
                m = torch.ones(rows, 1, n, cache.length + n, dtype=torch.bool, device=h.device)
                text_q = slice(0, n)
            else:  # uncached reference: the full [text | clean | noisy] mask from the sampler
                m = mask.clone()
                m[:tl, :tl] = causal
                m = m.expand(rows, 1, n, n).clone()
                text_q = slice(tl, n)  # the text rows stay causal: never an all-False row (SDPA gives NaN)
            m[~sees, :, text_q, :tl] = False
        return self.model.backbone.run_blocks(h, m, cache)


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
    view = _TextConditioned(model, ids)
    order, block, dilation = model_order(model, order, block, dilation)  # the view does not carry them
    labels = torch.zeros(len(prompts), dtype=torch.long)
    return sample(view, labels, ar_steps=ar_steps, groups=groups, order=order, block=block, dilation=dilation,
                  steps=steps, sampler=sampler,
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
