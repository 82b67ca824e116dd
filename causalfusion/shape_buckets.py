"""Training sequences from a small set of lengths: the clean prefix padded up to a bucket.

The training sequence [condition | clean prefix | K noisy copies] changes length with the AR plan
(the clean prefix holds all but the last AR step's tokens: 0..L-1 of them), so a run with random S
sees a new length almost every step, and ``torch.compile`` (``compiling.CompiledForward``) would
compile a graph for each. ``BucketedForward`` pads the clean prefix to a multiple of
``clean_bucket`` tokens with tokens that nobody attends to (the next clean tokens in AR order,
whose outputs are discarded), so every row that matters computes what it computed before, and a
run has at most ``training_graph_count(L, clean_bucket)`` shapes (L=256, bucket 32: 9).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .masks import generalized_causal_mask
from .models import CausalFusion, num_tokens_before_last, shared_timesteps

CLEAN_BUCKET = 32  # L/32 + 1 shapes, <= 31 padding tokens a step


def training_graph_count(num_tokens: int, clean_bucket: int = CLEAN_BUCKET) -> int:
    """Most shapes (compiled graphs) a run can see: padded clean-prefix lengths 0, b, 2b, ... up to L."""
    return 1 + math.ceil((num_tokens - 1) / clean_bucket) if num_tokens > 1 else 1


def padded_clean_length(n_clean: int, num_tokens: int, clean_bucket: int = CLEAN_BUCKET) -> int:
    """The clean prefix's length after padding: 0 stays 0 (S=1), others round up to the bucket (<= L)."""
    return min(num_tokens, -(-n_clean // clean_bucket) * clean_bucket)


def padded_causal_mask(group_sizes: list[int], num_cond: int, num_copies: int, n_pad: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``generalized_causal_mask`` with ``n_pad - n_clean`` padding tokens after the clean prefix:
    bool [N + p, N + p]. Nobody attends to a padding token, so every other row is unchanged; the
    padding tokens see the condition only (a row with no key at all would be NaN)."""
    mask = generalized_causal_mask(group_sizes, num_cond, num_copies, device=device)
    n0 = num_cond + num_tokens_before_last(group_sizes)
    p = n_pad - num_tokens_before_last(group_sizes)
    if p == 0:
        return mask
    n = mask.shape[0]
    out = torch.zeros(n + p, n + p, dtype=torch.bool, device=mask.device)
    keep = torch.cat([torch.arange(n0), torch.arange(n0 + p, n + p)]).to(mask.device)
    out[keep[:, None], keep] = mask
    out[n0:n0 + p, :num_cond] = True
    return out


class BucketedForward:
    """``model(x0, xt, t, y, group_sizes, order)`` with the clean prefix padded to ``clean_bucket``:
    same inputs and output as ``CausalFusion.forward`` (the ``run_model`` of ``objective.noised_loss``)."""

    def __init__(self, model: CausalFusion, clean_bucket: int = CLEAN_BUCKET, max_masks: int = 64):
        if clean_bucket < 1:
            raise ValueError(f"clean bucket must be >= 1, got {clean_bucket}")
        self.model, self.clean_bucket = model, clean_bucket
        self.graphs = training_graph_count(model.cfg.num_tokens, clean_bucket)
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # a mask is built once per split
        self.max_masks = max_masks
        self.shapes_seen: set[tuple] = set()

    def _mask(self, group_sizes: list[int], k: int, n_pad: int, device: torch.device) -> torch.Tensor:
        key = (tuple(group_sizes), k, n_pad, str(device))
        if key in self._masks:
            self._masks.move_to_end(key)
        else:
            self._masks[key] = padded_causal_mask(group_sizes, self.model.cfg.num_cond, k, n_pad, device)
            if len(self._masks) > self.max_masks:
                self._masks.popitem(last=False)
        return self._masks[key]

    def run(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
            n_pad: int, mask: torch.Tensor) -> torch.Tensor:
        """The padded forward: ``CausalFusion.forward_sequence`` (``CompiledForward`` compiles it)."""
        return self.model.forward_sequence(x0, xt, t, y, order, n_pad, mask)

    def __call__(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 group_sizes: list[int], order: torch.Tensor) -> torch.Tensor:
        m = self.model
        order = m._check_forward_shapes(x0, xt, t, y, group_sizes, order)
        n_pad = padded_clean_length(num_tokens_before_last(group_sizes), m.cfg.num_tokens, self.clean_bucket)
        t = shared_timesteps(t)
        self.shapes_seen.add((n_pad, tuple(xt.shape), t.shape[-1]))
        mask = self._mask(group_sizes, xt.shape[1], n_pad, x0.device)
        return self.run(x0, xt, t, y, order, n_pad, mask)
