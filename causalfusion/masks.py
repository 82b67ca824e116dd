"""The generalized causal attention mask of CausalFusion (paper Appendix A, Fig. 6, Algorithm 1).

Training sequence layout (one row per token, N tokens in all)::

    [ C condition | clean tokens of AR steps 1..S-1 | noisy tokens of AR steps 1..S ] x copies

The clean tokens of the last AR step are never looked at by anybody, so they are dropped:
N = C + (L - |k_S|) + K * L, with K the number of noisy copies (Tab. 7's "K x t per AR step":
the clean tokens are computed once and shared by K noisy versions of the image).

Rules (True = may attend, the ``scaled_dot_product_attention`` convention):

* condition -> condition;
* clean of step s -> condition, clean of steps <= s (full attention inside a step);
* noisy of step s -> condition, clean of steps < s, noisy of step s of the *same* copy;
* nobody attends to a noisy token of another step (or of another copy).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_groups(group_sizes: Sequence[int], num_cond: int, num_copies: int) -> None:
    if len(group_sizes) == 0 or any(int(g) < 1 for g in group_sizes):
        raise ValueError(f"group sizes must be a non-empty list of positive ints, got {list(group_sizes)}")
    if num_cond < 0:
        raise ValueError(f"num_cond must be >= 0, got {num_cond}")
    if num_copies < 1:
        raise ValueError(f"num_copies must be >= 1, got {num_copies}")


def sequence_length(group_sizes: Sequence[int], num_cond: int, num_copies: int = 1) -> int:
    """N = C + sum(group_sizes[:-1]) + num_copies * sum(group_sizes)."""
    return num_cond + sum(group_sizes[:-1]) + num_copies * sum(group_sizes)


def generalized_causal_mask(
    group_sizes: Sequence[int],
    num_cond: int,
    num_copies: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask ``[N, N]`` (True = query row may attend to key column).

    ``group_sizes`` are |k_1|..|k_S| in AR order (they sum to L). One mask serves the whole
    batch: it broadcasts over batch and heads in ``scaled_dot_product_attention``.
    """
    _check_groups(group_sizes, num_cond, num_copies)
    sizes = torch.as_tensor([int(g) for g in group_sizes], dtype=torch.long)
    steps = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # AR step of each token
    n_clean = int(sizes[:-1].sum())

    # Describe every position by (kind, step, copy); kind 0 = condition, 1 = clean, 2 = noisy.
    kind = torch.cat([
        torch.zeros(num_cond, dtype=torch.long),
        torch.ones(n_clean, dtype=torch.long),
        torch.full((num_copies * len(steps),), 2, dtype=torch.long),
    ])
    step = torch.cat([
        torch.full((num_cond,), -1, dtype=torch.long),
        steps[:n_clean],
        steps.repeat(num_copies),
    ])
    copy = torch.cat([
        torch.full((num_cond + n_clean,), -1, dtype=torch.long),
        torch.arange(num_copies).repeat_interleave(len(steps)),
    ])

    q_kind, k_kind = kind[:, None], kind[None, :]
    q_step, k_step = step[:, None], step[None, :]
    key_is_cond = k_kind == 0
    clean_ok = (q_kind == 1) & (k_kind == 1) & (k_step <= q_step)
    noisy_sees_clean = (q_kind == 2) & (k_kind == 1) & (k_step < q_step)
    noisy_sees_noisy = (q_kind == 2) & (k_kind == 2) & (k_step == q_step) & (copy[:, None] == copy[None, :])
    # Condition tokens see only condition tokens; every other token sees them too.
    mask = key_is_cond | clean_ok | noisy_sees_clean | noisy_sees_noisy
    return mask.to(device) if device is not None else mask
