"""FLOPs of a sampling run, counted on the real code (torch's FlopCounterMode).

Wall time on a shared CPU moves by several percent from run to run; the FLOPs a configuration
executes do not. ``benchmarks/sampling.py`` prints them next to the measured times, so a speed
ratio can be read against the work ratio behind it: with the KV cache a diffusion step at S AR
steps runs only the current group, so S=4 does S=1's linear-layer work (plus S-1 commit passes)
and less attention; without the cache every step re-runs the condition and the finished groups.

torch counts matmuls itself; the CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``)
has no formula there, so one is registered here: QKᵀ and PV, dense (masked entries are computed
and then discarded by the kernel, so they cost the same).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import CausalFusion
from .sampling import sample

_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """q [B, H, Nq, d], k [B, H, Nk, d], v [B, H, Nk, dv]: 2 multiply-adds per entry of QKᵀ and of PV."""
    b, h, nq, d = q_shape
    return 2 * b * h * nq * k_shape[2] * (d + v_shape[3])


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """Run ``fn()`` once and count its FLOPs: ``{"attention": SDPA, "linear": everything else
    (the matmuls), "total": both}``."""
    with FlopCounterMode(display=False, custom_mapping={_CPU_ATTENTION: _attention_flops}) as counter:
        fn()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in by_op.items() if "scaled_dot_product" in str(op))
    total = counter.get_total_flops()
    return {"attention": attention, "linear": total - attention, "total": total}


def sampling_flops(model: CausalFusion, labels: torch.Tensor, steps: int, **sample_kwargs) -> dict[str, int]:
    """FLOPs of ``sample(model, labels, steps=steps, **sample_kwargs)`` without running all T steps.

    Every diffusion step of an AR step makes the same model call, so the count is affine in T:
    F(T) = F(1) + (T - 1) * (F(2) - F(1)), the constant being the condition and commit passes.
    Guidance restricted to an interval breaks this (steps outside it run half the rows), so it
    is refused; guidance on all t is fine.
    """
    if sample_kwargs.get("cfg", 1.0) != 1.0 and tuple(sample_kwargs.get("cfg_interval", (0, 1000))) != (0, 1000):
        raise ValueError("sampling_flops needs the same work at every diffusion step: use the full CFG interval 0,1000")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling_flops takes one diffusion step count >= 1 for every AR step, got {steps!r}")
    with torch.no_grad():
        one, two = (count_flops(lambda n=n: sample(model, labels, steps=n, **sample_kwargs)) for n in (1, 2))
    return {k: one[k] + (steps - 1) * (two[k] - one[k]) for k in one}
