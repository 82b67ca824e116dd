"""Multimodal CausalFusion: one decoder-only transformer for text and image (paper Sec. 6, App. C).

A wrapper around the image model (``self.backbone``: input projection, timestep embedding, 2-D
image positions, blocks, noise head) that adds a text token embedding, a learnable text
positional embedding over the T-slot text window and an LM head. The backbone's class embedding
and its ``cond_pos`` are unused (``num_classes=0``: kept only so the backbone's code stays
unchanged; they get no gradient).

LM head: untied by default (``tie_head=False``). The input embedding is trained mostly by the
image loss (90% of sequences use text as the image's condition, and the text loss is weighted
0.01), so tying would hand the LM's output space to the conditioning objective; with the
paper's LLaMA-3 vocabulary the saving would matter (128k x 1024), but LLaMA-3 itself unties it,
and for a small BPE the extra V x D parameters are negligible. ``tie_head=True`` is offered.

Sequences (t = diffusion timestep, positions are the image's raster indices in AR order):
``text_first``: [text T | clean of steps 1..S-1 | noisy L]; ``image_first``: [clean L | noisy L | text T].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kv_cache import KVCache
from ..masks import multimodal_mask
from ..models import CausalFusion, ModelConfig, num_tokens_before_last


@dataclass
class TextConfig:
    vocab_size: int
    max_text_len: int = 35  # T: the text slot, <bos> and <eos> included (paper: 35)
    tie_head: bool = False
    # image-first captions see the noisy image tokens (the Transfusion baseline's mask); the baseline
    # also trains images with plain diffusion: pass ARPlanConfig(**TRANSFUSION_IMAGE_PLAN) to MMTrainer
    transfusion: bool = False

    def __post_init__(self) -> None:
        if self.max_text_len < 3:
            raise ValueError(f"max text length must be >= 3 (<bos>, a token, <eos>), got {self.max_text_len}")
        if self.vocab_size < 4:
            raise ValueError(f"vocabulary size must be >= 4, got {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown text config keys: {sorted(unknown)}")
        return cls(**d)


class MultimodalCausalFusion(nn.Module):
    def __init__(self, cfg: ModelConfig, text: TextConfig):
        super().__init__()
        if cfg.num_classes != 0:
            raise ValueError("the multimodal model is conditioned on text: build it with num_classes=0")
        self.cfg, self.text_cfg = cfg, text
        d = cfg.hidden_size
        self.backbone = CausalFusion(cfg)
        self.tok_embed = nn.Embedding(text.vocab_size, d)
        self.text_pos = nn.Parameter(torch.zeros(text.max_text_len, d))
        self.text_norm = nn.LayerNorm(d)
        self.lm_head = None if text.tie_head else nn.Linear(d, text.vocab_size, bias=False)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def text_len(self) -> int:
        return self.text_cfg.max_text_len

    # ---- pieces ------------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token ids [B, n] at text slots start..start+n-1 -> [B, n, D]."""
        return self.tok_embed(ids) + self.text_pos[start:start + ids.shape[1]]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, n, D] -> next-token logits [B, n, V]."""
        h = self.text_norm(h)
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.tok_embed.weight)

    def _image_parts(self, x0_tok: torch.Tensor, xt_tok: torch.Tensor, t: torch.Tensor, order: torch.Tensor,
                     n_clean: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens in AR order (x0 [B, L, P], xt [B, L, P], t [B, L]) -> clean [B, n_clean, D], noisy [B, L, D]."""
        bb = self.backbone
        return bb.embed_tokens(x0_tok[:, :n_clean], order[:, :n_clean]), bb.embed_tokens(xt_tok, order, t)

    # ---- training forwards ----------------------------------------------------------------------
    def forward_text_first(self, ids: torch.Tensor, x0_tok: torch.Tensor, xt_tok: torch.Tensor, t: torch.Tensor,
                           group_sizes: list[int], order: torch.Tensor) -> torch.Tensor:
        """T2I sequence. ids [B, T]; image tokens in AR order [B, L, P]; t [B, L]; order [B, L]
        -> predicted noise [B, L, P] (AR order)."""
        num_tokens = self.cfg.num_tokens
        clean, noisy = self._image_parts(x0_tok, xt_tok, t, order, num_tokens_before_last(group_sizes))
        h = torch.cat([self.embed_text(ids), clean, noisy], 1)
        mask = multimodal_mask("text_first", group_sizes, self.text_len, device=h.device)
        return self.backbone.output(self.backbone.run_blocks(h, mask)[:, -num_tokens:])

    def forward_image_first(self, ids: torch.Tensor, x0_tok: torch.Tensor, xt_tok: torch.Tensor, t: torch.Tensor,
                            group_sizes: list[int], order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captioning sequence (same shapes) -> (noise [B, L, P], next-token logits [B, T, V])."""
        num_tokens, tl = self.cfg.num_tokens, self.text_len
        clean, noisy = self._image_parts(x0_tok, xt_tok, t, order, num_tokens)  # every clean token: the caption reads them all
        h = torch.cat([clean, noisy, self.embed_text(ids)], 1)
        mask = multimodal_mask("image_first", group_sizes, tl, self.text_cfg.transfusion, device=h.device)
        h = self.backbone.run_blocks(h, mask)
        return self.backbone.output(h[:, num_tokens:2 * num_tokens]), self.text_logits(h[:, -tl:])

    # ---- captioning prefix ----------------------------------------------------------------------
    def image_prefix(self, images: torch.Tensor, extra: int) -> KVCache:
        """Clean images [B, C, H, W] -> a KV cache holding the image as the captions see it, with
        room for ``extra`` text tokens: one AR step of clean tokens (full attention among them),
        or for Transfusion the image as noisy tokens at t = 0."""
        bb, b = self.backbone, images.shape[0]
        num_tokens = self.cfg.num_tokens
        pos = torch.arange(num_tokens, device=images.device).expand(b, num_tokens)
        t = torch.zeros(b, num_tokens, device=images.device) if self.text_cfg.transfusion else None
        cache = KVCache(self.cfg.depth, num_tokens + extra)
        bb.run_blocks(bb.embed_tokens(bb.patchify(images), pos, t), None, cache)
        cache.commit(num_tokens)
        return cache


def build_model(image: dict, text: dict) -> MultimodalCausalFusion:
    """From the ``model`` and ``text`` dicts of a run's config.json."""
    return MultimodalCausalFusion(ModelConfig.from_dict(image), TextConfig.from_dict(text))
