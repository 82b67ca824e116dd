"""Tiny checkpoints in the exact layout of the authors' CausalFusion release (names, shapes, the
two forms torch.save writes there), built from random tensors for the conversion tests."""
from __future__ import annotations

import argparse

import torch


def release_state(depth=2, width=32, heads=4, class_tokens=3, num_classes=5, tokens=16, patch_dim=16,
                  mlp_ratio=4, seed=0) -> dict[str, torch.Tensor]:
    """Every parameter of the release's CausalDiffusionModel, random (norms away from 1/0 too)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3, mean=0.0):
        return torch.randn(*shape, generator=g) * scale + mean

    hd, hidden = width // heads, width * mlp_ratio
    s = {"x_proj.weight": r(width, patch_dim), "x_proj.bias": r(width),
         "t_embedder.mlp.0.weight": r(width, 256, scale=0.05), "t_embedder.mlp.0.bias": r(width),
         "t_embedder.mlp.2.weight": r(width, width, scale=0.1), "t_embedder.mlp.2.bias": r(width),
         "y_embedder.embedding_table.weight": r(num_classes + 1, class_tokens * width),
         "pos_embed": r(1, tokens, width), "cond_pos_embed": r(1, class_tokens, width),
         "final_layer.0.weight": r(width, mean=1.0), "final_layer.0.bias": r(width),
         "final_layer.1.weight": r(patch_dim, width), "final_layer.1.bias": r(patch_dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": r(width, mean=1.0), b + "norm1.bias": r(width),
                  b + "attn.qkv.weight": r(3 * width, width, scale=0.2),
                  b + "attn.q_norm.weight": r(hd, mean=1.0), b + "attn.q_norm.bias": r(hd),
                  b + "attn.k_norm.weight": r(hd, mean=1.0), b + "attn.k_norm.bias": r(hd),
                  b + "attn.proj.weight": r(width, width, scale=0.2), b + "attn.proj.bias": r(width),
                  b + "norm2.weight": r(width, mean=1.0), b + "norm2.bias": r(width),
                  b + "mlp.fc1.weight": r(hidden, width, scale=0.2), b + "mlp.fc1.bias": r(hidden),
                  b + "mlp.fc2.weight": r(width, hidden, scale=0.1), b + "mlp.fc2.bias": r(width)})
    return s


def save_release(path, state: dict, full: bool = False, args: dict | None = None, raw: dict | None = None) -> None:
    """torch.save ``state`` as the release does: bare, or (``full``) as train.py's checkpoint with
    ``raw`` weights as "model", ``state`` as "ema", optimizer and scheduler state, and ``args``."""
    if not full:
        torch.save(state, path)
        return
    params = [torch.nn.Parameter(v.clone()) for v in (raw or state).values()]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    torch.save({"model": raw or state, "ema": state, "opt": opt.state_dict(), "scheduler": sched.state_dict(),
                "train_steps": 12500, "start_epoch": 3, "args": argparse.Namespace(**(args or {}))}, path)
