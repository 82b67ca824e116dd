"""The opt-in ``torch.compile`` path for training and sampling (``--compile``).

The number of graphs stays small and bounded:

* Training: graphs are specialised to their shapes (``dynamic=False``). ``CompiledForward`` is
  ``shape_buckets.BucketedForward`` (the clean prefix padded to a bucket) with the attention mask as
  a graph input, so a run with random S compiles at most ``training_graph_count(L, clean_bucket)``
  graphs (L=256, bucket 32: 9), whatever splits it draws.
* Sampling: ``CompiledCachedRunner`` hands each call the filled slots of the preallocated KV cache
  as views whose length is a dynamic dimension, and new keys/values go to their slots by an index
  tensor, so one graph serves every prefix length. Graphs: one per kind of call (denoise, commit;
  with or without a mask for rows blind to the condition); a second group size or row count makes
  that dimension dynamic instead of adding graphs. A process sampling at S = 1, 2, 4 and 8, with or
  without guidance, compiles at most 4. Under bf16 autocast the graphs run on
  ``bf16_linear_copy(model)``.

Compile time is paid on the first call of each graph (and the first backward in training).
"""
from __future__ import annotations

import functools
import weakref
from copy import deepcopy

import torch
import torch._dynamo

from .kv_cache import KVCache
from .models import CausalFusion
from .sampling_runners import CachedRunner, Condition
from .shape_buckets import CLEAN_BUCKET, BucketedForward


# GELU's tanh as 2 / (1 + exp(-2x)) - 1 in inductor's CPU kernels: one exp instead of a Sleef tanh,
# which makes the GELU kernels, the largest fused ones of a bf16 step, markedly faster
# (benchmarks/profile_step.py). Inductor has it off by default because its absolute error near 0
# (~1e-8) can flip the sign of an atan2; GELU adds it to 1.
INDUCTOR_OPTIONS = {"cpp.use_decompose_tanh": True}


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
        self._compiled = torch.compile(model.forward_sequence, dynamic=False, backend=backend,
                                       options=INDUCTOR_OPTIONS if backend == "inductor" else None)

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
    """A ``KVCache`` over views of exactly the slots filled once this call has written: the new
    keys/values go to ``slots`` (a tensor, so the offset is data, not a specialised int), and the
    whole views come back."""

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
    return torch.compile(_cached_pass, dynamic=None, options=INDUCTOR_OPTIONS)


def bf16_linear_copy(model: CausalFusion) -> CausalFusion:
    """A copy of ``model`` whose Linear weights and biases are stored in bf16. Under bf16 autocast it
    computes exactly what ``model`` does (autocast rounds them to bf16 the same way), but a compiled
    graph no longer re-casts every fp32 weight on every call (eager autocast caches those casts; a
    graph cannot). One copy per model, made again once ``weights_fingerprint`` changes."""
    key = weights_fingerprint(model)
    held = _BF16_COPIES.get(model)
    if held is None or held[0] != key:
        copy = deepcopy(model)
        for m in copy.modules():
            if isinstance(m, torch.nn.Linear):
                m.to(torch.bfloat16)
        held = _BF16_COPIES[model] = (key, copy)
    return held[1]


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: it changes when an optimizer or
    EMA step, ``load_state_dict`` or ``.to()`` changes the weights."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (fingerprint, copy)


class CompiledCachedRunner(CachedRunner):
    """``CachedRunner`` with every denoising and commit call compiled (one graph for all prefix lengths)."""

    # One slot more than any call fills: the cache views a call gets are then never the whole tensor,
    # so their strides never change and one graph serves every prefix length.
    spare_slots = 1

    def __init__(self, model: CausalFusion, cond: Condition):
        super().__init__(model, cond)
        self._pass = _compiled_cached_pass()
        dev = cond.tokens.device.type
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
            self.model = bf16_linear_copy(model)

    def _call(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        rows, n = tokens.shape[:2]
        length = cache.length + n  # the filled slots once this call's keys/values are written
        slots = torch.arange(cache.length, length, device=tokens.device)
        keys, values = [k[:, :, :length] for k in cache.keys], [v[:, :, :length] for v in cache.values]
        for x in (*keys, *values):
            torch._dynamo.maybe_mark_dynamic(x, 2)  # one graph for every prefix length
        mask = self._blind_mask(rows, n, length, tokens.device)  # rows blind to the condition (multimodal CFG)
        if mask is not None:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        return self._pass(self.model, tokens.contiguous(), pos.contiguous(), t, keys, values, slots, mask)

    def output(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        cache = self.cache if rows == self.cond.rows else self.cache.first_rows(rows)
        return self._call(tokens, pos, t, cache)

    def commit(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        reps = self.cond.rows // tokens.shape[0]
        self._call(tokens.repeat(reps, 1, 1), pos.repeat(reps, 1), None, self.cache)
        self.cache.commit(tokens.shape[1])
