"""Scaled dot-product attention with the kernel that is fastest for the case at hand.

On a CPU, the fused (flash) kernel's bf16 *backward* is slow: for the S preset's attention the
plain softmax(QKᵀ/√d)V written out, whose matmuls run on the bf16 matrix units, is faster forward +
backward (``benchmarks/profile_step.py`` prints both). Forward-only calls (sampling) and fp32 keep
the fused kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v with the softmax in fp32. q [B, H, Nq, d], k/v [B, H, Nk, d],
    mask bool broadcastable to [B, H, Nq, Nk] (True = may attend) -> [B, H, Nq, d]."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)``; shapes as there."""
    low = torch.is_autocast_enabled(q.device.type) and torch.get_autocast_dtype(q.device.type) == torch.bfloat16
    if q.device.type == "cpu" and torch.is_grad_enabled() and (low or q.dtype == torch.bfloat16):
        return explicit_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
