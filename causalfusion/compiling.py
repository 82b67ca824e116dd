"""The opt-in ``torch.compile`` path for training and sampling (``--compile``).

Compiled graphs are specialised to their shapes (``dynamic=False``), so the number of graphs is
bounded by keeping the shapes of a run to a small set:

* Training: the sequence [condition | clean prefix | K noisy copies] changes length with the AR
  plan (the clean prefix holds all but the last AR step's tokens). ``CompiledForward`` pads the
  clean prefix up to a multiple of ``clean_bucket`` tokens with tokens nobody attends to, and passes
  the attention mask as a graph input, so a run with random S compiles at most
  ``training_graph_count(L, clean_bucket)`` graphs (L=256, bucket 32: 9), whatever splits it draws.
* Sampling: ``CompiledCachedRunner`` keeps the KV cache's full preallocated layout (C + L slots)
  in every call: new keys/values go to their slots by an index tensor, and attention covers all
  slots under a mask of the filled ones. One graph per (batch rows, group size, full or not, denoise
  or commit): S=1 needs 1 (2 with an interval CFG), S equal groups 3 (6).

Compile time is paid on the first call of each graph (and the first backward in training).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch._dynamo

from .kv_cache import KVCache
from .masks import generalized_causal_mask
from .models import CausalFusion, num_tokens_before_last, shared_timesteps
from .sampling_runners import CachedRunner, Condition

CLEAN_BUCKET = 32  # clean-prefix padding step: L/32 + 1 training graphs, <= 31 wasted tokens a step


def training_graph_count(num_tokens: int, clean_bucket: int = CLEAN_BUCKET) -> int:
    """Most training graphs a run can compile: padded clean-prefix lengths 0, b, 2b, ... up to L."""
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


def allow_recompiles(graphs: int) -> None:
    """Let dynamo keep ``graphs`` specialisations of one function (its default of 8 would send the
    rest back to eager mode, silently slow)."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, graphs)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * graphs)


def compile_seconds() -> float:
    """Seconds spent compiling in this process so far (dynamo + inductor, forward and backward graphs)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return sum(sum(v) for k, v in metrics.items() if k in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))


class CompiledForward:
    """``model(x0, xt, t, y, group_sizes, order)`` through a compiled ``model.forward_sequence``:
    same inputs and output as ``CausalFusion.forward`` (the ``run_model`` of ``objective.noised_loss``),
    the clean prefix padded to ``clean_bucket`` so that shapes come from a small set."""

    def __init__(self, model: CausalFusion, clean_bucket: int = CLEAN_BUCKET, max_masks: int = 64,
                 backend: str = "inductor"):
        if clean_bucket < 1:
            raise ValueError(f"clean bucket must be >= 1, got {clean_bucket}")
        self.model, self.clean_bucket = model, clean_bucket
        self.graphs = training_graph_count(model.cfg.num_tokens, clean_bucket)
        allow_recompiles(2 * self.graphs)  # x2: a shared or a per-token t
        self._compiled = torch.compile(model.forward_sequence, dynamic=False, backend=backend)
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

    def __call__(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 group_sizes: list[int], order: torch.Tensor) -> torch.Tensor:
        m = self.model
        order = m._check_forward_shapes(x0, xt, t, y, group_sizes, order)
        n_pad = padded_clean_length(num_tokens_before_last(group_sizes), m.cfg.num_tokens, self.clean_bucket)
        t = shared_timesteps(t)
        self.shapes_seen.add((n_pad, tuple(xt.shape), t.shape[-1]))
        mask = self._mask(group_sizes, xt.shape[1], n_pad, x0.device)
        return self._compiled(x0, xt, t, y, order, n_pad, mask)


class FirstCompileReport:
    """Prints the compile time once, after the first compiled step: ``report(print)``."""

    def __init__(self) -> None:
        self.start, self.done = compile_seconds(), False

    def report(self, log=print, what: str = "training step") -> None:
        if not self.done:
            self.done = True
            log(f"torch.compile: {compile_seconds() - self.start:.1f} s to compile the first {what} "
                f"(later AR-plan shapes compile once each on first use)")


# ---- sampling ---------------------------------------------------------------------------------------
class StaticKVCache(KVCache):
    """A ``KVCache`` whose ``write`` keeps the full preallocated layout: the new keys/values go to
    ``slots`` (a tensor, so the slot offset is data, not a shape), and all ``max_len`` slots come back;
    the caller masks the slots not filled yet."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor):
        super().__init__(len(keys), keys[0].shape[2])
        self.keys, self.values, self.slots = list(keys), list(values), slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.keys[layer], self.values[layer]
        kc.index_copy_(2, self.slots, k.to(kc.dtype))
        vc.index_copy_(2, self.slots, v.to(vc.dtype))
        return kc, vc


def _cached_pass(model: CausalFusion, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor | None,
                 keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens [rows, n, P] at raster positions [rows, n] (timesteps [rows, 1]; None: clean) through the
    model against the cache -> output [rows, n, P] (noisy) or the last hidden states (clean)."""
    h = model.run_blocks(model.embed_tokens(tokens, pos, t), mask, StaticKVCache(keys, values, slots))
    return h if t is None else model.output(h)


@functools.cache
def _compiled_cached_pass():
    allow_recompiles(16)
    return torch.compile(_cached_pass, dynamic=False)


class CompiledCachedRunner(CachedRunner):
    """``CachedRunner`` with every denoising and commit call compiled against the static cache layout."""

    def __init__(self, model: CausalFusion, cond: Condition):
        super().__init__(model, cond)
        self._pass = _compiled_cached_pass()

    def _call(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        rows, n = tokens.shape[:2]
        start, size = cache.length, cache.max_len
        slots = torch.arange(start, start + n, device=tokens.device)
        blind = self.cond.blind_rows(rows)
        mask = None
        if start + n < size or blind is not None:  # some slots are empty (or hidden from some rows)
            mask = (torch.arange(size, device=tokens.device) < start + n).expand(n, size)
            if blind is not None:
                mask = mask.expand(rows, 1, n, size).clone()
                mask[blind, :, :, :self.cond.length] = False
        return self._pass(self.model, tokens, pos, t, cache.keys, cache.values, slots, mask)

    def output(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        cache = self.cache if rows == self.cond.rows else self.cache.first_rows(rows)
        return self._call(tokens, pos, t, cache)

    def commit(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        reps = self.cond.rows // tokens.shape[0]
        self._call(tokens.repeat(reps, 1, 1), pos.repeat(reps, 1), None, self.cache)
        self.cache.commit(tokens.shape[1])
