"""The opt-in ``torch.compile`` path for training and sampling (``--compile``).

Compiled graphs are specialised to their shapes (``dynamic=False``), so the number of graphs is
bounded by keeping the shapes of a run to a small set:

* Training: ``CompiledForward`` is ``shape_buckets.BucketedForward`` (the clean prefix padded to a
  bucket) with the attention mask as a graph input, so a run with random S compiles at most
  ``training_graph_count(L, clean_bucket)`` graphs (L=256, bucket 32: 9), whatever splits it draws.
* Sampling: ``CompiledCachedRunner`` keeps the KV cache's full preallocated layout (C + L slots)
  in every call: new keys/values go to their slots by an index tensor, and attention covers all
  slots under a mask of the filled ones. One graph per (batch rows, group size, full or not, denoise
  or commit): S=1 needs 1 (2 with an interval CFG), S equal groups 3 (6).

Compile time is paid on the first call of each graph (and the first backward in training).
"""
from __future__ import annotations

import functools

import torch
import torch._dynamo

from .kv_cache import KVCache
from .models import CausalFusion
from .sampling_runners import CachedRunner, Condition
from .shape_buckets import CLEAN_BUCKET, BucketedForward


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


class CompiledForward(BucketedForward):
    """``BucketedForward`` through a compiled ``model.forward_sequence``: one graph per padded shape."""

    def __init__(self, model: CausalFusion, clean_bucket: int = CLEAN_BUCKET, max_masks: int = 64,
                 backend: str = "inductor"):
        super().__init__(model, clean_bucket, max_masks)
        allow_recompiles(2 * self.graphs)  # x2: a shared or a per-token t
        self._compiled = torch.compile(model.forward_sequence, dynamic=False, backend=backend)

    def run(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
            n_pad: int, mask: torch.Tensor) -> torch.Tensor:
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
