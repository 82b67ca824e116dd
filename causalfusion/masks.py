"""The generalized causal attention mask of CausalFusion (paper Appendix A, Fig. 6, Algorithm 1).

Training sequence layout (one row per token, N tokens in all)::

    [ C condition | clean of AR steps 1..S-1 | noisy of steps 1..S (copy 1) | ... | noisy 1..S (copy K) ]

The clean tokens of the last AR step are never looked at by anybody, so they are dropped:
N = C + (L - |k_S|) + K * L, with K the number of noisy copies (Tab. 7's "K x t per AR step":
the clean tokens are computed once and shared by K noisy versions of the image).

Rules (True = may attend, the ``scaled_dot_product_attention`` convention):

* condition -> condition;
* clean of step s -> condition, clean of steps <= s (full attention inside a step);
* noisy of step s -> condition, clean of steps < s, noisy of step s of the *same* copy;
* nobody attends to a noisy token of another step (or of another copy).

Reading Algorithm 1 next to ``generalized_causal_mask``: the paper's listing returns 1 = *masked*
(this code returns True = may attend); its ``ctx_len`` is the clean tokens (it has no class
tokens, which here come first and are seen by everybody); and it draws the cut points itself,
which here is ``ar_plan.random_group_sizes`` (one split per batch). Fig. 6 (3 AR steps of 2, 2
and 3 tokens) is ``generalized_causal_mask([2, 2, 3], num_cond=0)``.
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

    kind, step, copy = (v.to(device) for v in (kind, step, copy))  # the [N, N] work on the model's device
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_step, k_step = step[:, None], step[None, :]
    key_is_cond = k_kind == 0
    clean_ok = (q_kind == 1) & (k_kind == 1) & (k_step <= q_step)
    noisy_sees_clean = (q_kind == 2) & (k_kind == 1) & (k_step < q_step)
    noisy_sees_noisy = (q_kind == 2) & (k_kind == 2) & (k_step == q_step) & (copy[:, None] == copy[None, :])
    # Condition tokens see only condition tokens; every other token sees them too.
    return key_is_cond | clean_ok | noisy_sees_clean | noisy_sees_noisy


# ---- vision-language sequences (paper Sec. 6, App. C) -------------------------------------------
LAYOUTS = ("text_first", "image_first")


def multimodal_mask(
    layout: str,
    group_sizes: Sequence[int],
    text_len: int,
    transfusion: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask ``[N, N]`` (True = may attend) of a text + image training sequence.

    ``text_first`` (text-to-image, 90%): ``[text T | clean steps 1..S-1 | noisy steps 1..S]``;
    the text is causal, and the image part is the generalized causal mask with the text in the
    place of the condition tokens (every image token sees all T text slots).
    ``image_first`` (captioning, 10%): ``[clean steps 1..S (all L) | noisy steps 1..S | text T]``;
    the image part follows the generalized rules (no image token sees the text: that is the
    text-free image model classifier-free guidance needs), the clean tokens of the *last* step are
    kept because the caption needs the whole image, and each text token sees the text up to itself
    plus all clean image tokens, or, with ``transfusion``, all *noisy* image tokens instead.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if text_len < 1:
        raise ValueError(f"text length must be >= 1, got {text_len}")
    causal = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    if layout == "text_first":
        mask = generalized_causal_mask(group_sizes, text_len)
        mask[:text_len, :text_len] = causal
        return mask.to(device) if device is not None else mask
    _check_groups(group_sizes, 0, 1)
    sizes = torch.as_tensor([int(g) for g in group_sizes], dtype=torch.long)
    steps = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    num_tokens = len(steps)
    # (kind, step) of every position; kind 1 = clean, 2 = noisy, 3 = text.
    kind = torch.cat([torch.ones(num_tokens, dtype=torch.long), torch.full((num_tokens,), 2),
                      torch.full((text_len,), 3)])
    step = torch.cat([steps, steps, torch.full((text_len,), -1)])
    qk, kk, qs, ks = kind[:, None], kind[None, :], step[:, None], step[None, :]
    mask = ((qk == 1) & (kk == 1) & (ks <= qs)) \
        | ((qk == 2) & (kk == 1) & (ks < qs)) \
        | ((qk == 2) & (kk == 2) & (ks == qs)) \
        | ((qk == 3) & (kk == (2 if transfusion else 1)))
    mask[-text_len:, -text_len:] = causal
    return mask.to(device) if device is not None else mask
