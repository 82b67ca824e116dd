"""Running the model on the current AR group while sampling, given an explicit ``Condition``.

A ``Condition`` is what the image tokens are conditioned on: C embedded condition tokens per batch
row, whether they attend causally among themselves, and which rows' image tokens may see them.
``sampling.class_condition`` builds the class-conditional one (class tokens, full attention among
themselves, seen by every row: the CFG null rows see the null class);
``multimodal.generate.text_condition`` the text-to-image one (the prompt's T slots, causal as in
training; the CFG null rows' image tokens see no text at all).

Two runners with one interface (``output`` for the current group's noisy tokens, ``commit`` for a
finished group's clean tokens) build their attention masks from the condition alone:

* ``CachedRunner``: the condition and the finished groups live in a ``KVCache``; each call runs
  only the group. The group may see the whole prefix and itself, so it needs no mask unless some
  rows may not see the condition.
* ``UncachedRunner``: the reference; every call runs [condition | clean finished groups | noisy
  group] under ``generalized_causal_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .masks import generalized_causal_mask
from .models import CausalFusion


@dataclass
class Condition:
    """The condition of one sampling batch.

    ``tokens`` [rows, C, D]: embedded condition tokens; rows = B, or 2B with classifier-free
    guidance (the null rows last, in the order of the conditional ones). ``causal``: the condition
    tokens attend causally among themselves (text) instead of to each other (class tokens).
    ``visible`` bool [rows]: whose image tokens may attend to the condition (None: every row's).
    """

    tokens: torch.Tensor
    causal: bool = False
    visible: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"condition tokens must be [rows, C, D], got shape {list(self.tokens.shape)}")
        if self.visible is not None and (self.visible.dtype != torch.bool or tuple(self.visible.shape) != (self.rows,)):
            raise ValueError(f"the condition's visible rows must be bool [{self.rows}], "
                             f"got {self.visible.dtype} {list(self.visible.shape)}")

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def self_mask(self) -> torch.Tensor | None:
        """The condition tokens' mask among themselves [C, C] (None: full attention)."""
        if not self.causal:
            return None
        return torch.ones(self.length, self.length, dtype=torch.bool, device=self.tokens.device).tril()

    def blind_rows(self, rows: int) -> torch.Tensor | None:
        """bool [rows]: which of the first ``rows`` rows may not see the condition; None when all may
        (the runners then keep the cheaper mask: none, or one shared by every row)."""
        if self.visible is None:
            return None
        blind = ~self.visible[:rows].to(self.tokens.device)
        return blind if bool(blind.any()) else None


class CachedRunner:
    """Condition + finished groups live in a preallocated KV cache; each call runs only the group."""

    spare_slots = 0  # cache slots beyond the longest sequence ever seen

    def __init__(self, model: CausalFusion, cond: Condition):
        c = model.cfg
        self.model, self.cond = model, cond
        self.cache = KVCache(c.depth, cond.length + c.num_tokens + self.spare_slots)
        model.run_blocks(cond.tokens, cond.self_mask(), self.cache)
        self.cache.commit(cond.length)

    def _blind_mask(self, rows: int, n: int, length: int, device) -> torch.Tensor | None:
        """bool [rows, 1, n, length] (True = may attend) for n new tokens over ``length`` cache slots
        (theirs included), hiding the condition from the rows that may not see it; None: no such row."""
        blind = self.cond.blind_rows(rows)
        if blind is None:
            return None
        mask = torch.ones(rows, 1, n, length, dtype=torch.bool, device=device)
        mask[blind, :, :, :self.cond.length] = False
        return mask

    def _run(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [rows, n, D] after the cached prefix: it sees all of it and itself, except the
        condition for the rows that may not see it."""
        rows, n = h.shape[:2]
        return self.model.run_blocks(h, self._blind_mask(rows, n, cache.length + n, h.device), cache)

    def output(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy tokens [rows, n, P] at raster positions [rows, n], timesteps [rows, 1] -> output [rows, n, P];
        rows < the cache's: the conditional half (listed first)."""
        rows = tokens.shape[0]
        cache = self.cache if rows == self.cond.rows else self.cache.first_rows(rows)
        h = self.model.embed_tokens(tokens, pos, t)
        return self.model.output(self._run(h, cache))

    def commit(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        """A finished group's clean tokens [B, n, P] join the prefix (for the null rows too)."""
        reps = self.cond.rows // tokens.shape[0]
        h = self.model.embed_tokens(tokens.repeat(reps, 1, 1), pos.repeat(reps, 1))
        self._run(h, self.cache)
        self.cache.commit(tokens.shape[1])


class UncachedRunner:
    """Reference: the whole prefix is recomputed at every diffusion step, under the causal mask."""

    def __init__(self, model: CausalFusion, cond: Condition):
        self.model, self.cond = model, cond
        self.clean: list[torch.Tensor] = []  # clean tokens of finished groups, AR order
        self.clean_pos: list[torch.Tensor] = []
        self._mask_key, self._mask = None, None

    def _mask_for(self, rows: int, n: int, device: torch.device) -> torch.Tensor:
        """[N, N], or [rows, 1, N, N] when some rows may not see the condition."""
        sizes = [t.shape[1] for t in self.clean] + [n]
        c = self.cond.length
        if self._mask_key != sizes:
            full = generalized_causal_mask(sizes, c, device=device)
            # Drop the noisy tokens of finished groups: nothing attends to them.
            prefix = c + sum(sizes[:-1])
            keep = torch.cat([torch.arange(prefix), torch.arange(full.shape[0] - n, full.shape[0])]).to(device)
            full = full[keep][:, keep]
            if self.cond.causal:
                full[:c, :c] = self.cond.self_mask()
            self._mask_key, self._mask = sizes, full
        blind = self.cond.blind_rows(rows)
        if blind is None:
            return self._mask
        mask = self._mask.expand(rows, 1, *self._mask.shape).clone()
        mask[blind, :, c:, :c] = False  # their condition rows stay as they are: never an all-False row (NaN)
        return mask

    def output(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """As ``CachedRunner.output``."""
        m, rows, n = self.model, tokens.shape[0], tokens.shape[1]
        parts = [self.cond.tokens[:rows]]
        if self.clean:
            reps = rows // self.clean[0].shape[0]  # CFG: the null rows share the clean tokens
            clean = torch.cat(self.clean, 1).repeat(reps, 1, 1)
            parts.append(m.embed_tokens(clean, torch.cat(self.clean_pos, 1).repeat(reps, 1)))
        parts.append(m.embed_tokens(tokens, pos, t))
        h = m.run_blocks(torch.cat(parts, 1), self._mask_for(rows, n, tokens.device))
        return m.output(h[:, -n:])

    def commit(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        self.clean.append(tokens)
        self.clean_pos.append(pos)
