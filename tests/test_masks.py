"""Generalized causal mask vs. an independent, loop-based transcription of Alg. 1 / Fig. 6."""
from __future__ import annotations

import random

import pytest
import torch

from causalfusion.masks import generalized_causal_mask, sequence_length


def reference_mask(groups: list[int], num_cond: int, num_copies: int = 1) -> torch.Tensor:
    """Build the [N, N] mask token by token from the written rules (True = may attend).

    Layout: [C condition | clean steps 1..S-1 | (noisy steps 1..S) x num_copies].
    """
    # Describe each token as a tuple (kind, step, copy).
    tokens: list[tuple[str, int, int]] = [("cond", -1, -1)] * num_cond
    for s, g in enumerate(groups[:-1]):
        tokens += [("clean", s, -1)] * g
    for c in range(num_copies):
        for s, g in enumerate(groups):
            tokens += [("noisy", s, c)] * g
    n = len(tokens)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, (qk, qs, qc) in enumerate(tokens):
        for j, (kk, ks, kc) in enumerate(tokens):
            if qk == "cond":
                ok = kk == "cond"
            elif qk == "clean":
                ok = kk == "cond" or (kk == "clean" and ks <= qs)
            else:  # noisy
                ok = (kk == "cond" or (kk == "clean" and ks < qs)
                      or (kk == "noisy" and ks == qs and kc == qc))
            m[i, j] = ok
    return m


def alg1_mask(ctx_len: int, sumk: list[int]) -> torch.Tensor:
    """Literal transcription of the paper's Algorithm 1 (with its 1 = masked convention inverted).

    In Alg. 1 ``ctx_len`` is the number of clean tokens and ``x_len`` the number of noisy tokens,
    with no condition tokens and the full L clean tokens (the last block unused).
    """
    x_len = sumk[-1]
    seq_len = ctx_len + x_len
    attn = torch.ones(seq_len, seq_len)
    m1 = torch.ones(ctx_len, ctx_len)
    m2 = torch.ones(x_len, ctx_len)
    m3 = torch.ones(x_len, x_len)
    for i in range(len(sumk) - 2):
        m1[sumk[i]:sumk[i + 1], 0:sumk[i + 1]] = 0
        m2[sumk[i + 1]:sumk[i + 2], 0:sumk[i + 1]] = 0
    for i in range(len(sumk) - 1):
        m3[sumk[i]:sumk[i + 1], sumk[i]:sumk[i + 1]] = 0
    attn[:ctx_len, :ctx_len] = m1
    attn[ctx_len:, :ctx_len] = m2
    attn[ctx_len:, ctx_len:] = m3
    return attn == 0  # True = may attend


def random_groups(rng: random.Random, total: int, steps: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, total), steps - 1))
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def test_fig6_example_matches_reference():
    groups = [2, 2, 3]
    for num_cond in (0, 3):
        got = generalized_causal_mask(groups, num_cond)
        assert got.dtype == torch.bool
        assert got.shape == (num_cond + 4 + 7,) * 2
        assert torch.equal(got, reference_mask(groups, num_cond))


def test_fig6_example_spot_checks():
    # Fig. 6 caption: each noisy group attends to itself and the clean tokens of earlier steps.
    m = generalized_causal_mask([2, 2, 3], 0)
    clean1, clean2 = slice(0, 2), slice(2, 4)
    noisy1, noisy2, noisy3 = slice(4, 6), slice(6, 8), slice(8, 11)
    assert m[noisy1, clean1].sum() == 0 and m[noisy1, clean2].sum() == 0
    assert m[noisy2, clean1].all() and not m[noisy2, clean2].any()
    assert m[noisy3, clean1].all() and m[noisy3, clean2].all()
    assert m[noisy3, noisy3].all() and not m[noisy3, noisy1].any() and not m[noisy3, noisy2].any()
    assert m[clean1, clean1].all() and not m[clean1, clean2].any()
    assert m[clean2, clean1].all() and m[clean2, clean2].all()
    assert not m[clean1, 4:].any() and not m[clean2, 4:].any()


@pytest.mark.parametrize("seed", range(8))
def test_random_splits_match_reference(seed):
    rng = random.Random(seed)
    total = rng.randint(1, 12)
    steps = rng.randint(1, total)
    groups = random_groups(rng, total, steps)
    num_cond = rng.choice([0, 1, 4])
    got = generalized_causal_mask(groups, num_cond)
    assert got.shape == (num_cond + sum(groups[:-1]) + sum(groups),) * 2
    assert torch.equal(got, reference_mask(groups, num_cond))


@pytest.mark.parametrize("seed", range(5))
def test_matches_literal_algorithm_1(seed):
    """Alg. 1 keeps all L clean tokens; dropping the last step's (unused) clean tokens gives ours."""
    rng = random.Random(100 + seed)
    total = rng.randint(2, 12)
    steps = rng.randint(1, total)
    groups = random_groups(rng, total, steps)
    sumk = [0] + list(torch.tensor(groups).cumsum(0).tolist())
    full = alg1_mask(total, sumk)
    n_clean = sum(groups[:-1])
    keep = list(range(n_clean)) + list(range(total, 2 * total))
    # Nobody may look at the dropped clean tokens of the last step, so dropping them loses nothing.
    assert not full[:, n_clean:total].any()
    ours = generalized_causal_mask(groups, 0)
    assert torch.equal(ours, full[keep][:, keep])


@pytest.mark.parametrize("seed", range(4))
def test_num_copies_matches_reference(seed):
    rng = random.Random(200 + seed)
    total = rng.randint(2, 10)
    groups = random_groups(rng, total, rng.randint(1, total))
    num_cond = rng.choice([0, 2])
    k = rng.choice([2, 3])
    got = generalized_causal_mask(groups, num_cond, num_copies=k)
    n = num_cond + sum(groups[:-1]) + k * sum(groups)
    assert got.shape == (n, n)
    assert sequence_length(groups, num_cond, k) == n
    assert torch.equal(got, reference_mask(groups, num_cond, k))
    # Each copy, taken alone with the shared prefix, is exactly the K=1 mask.
    single = generalized_causal_mask(groups, num_cond)
    prefix = num_cond + sum(groups[:-1])
    for c in range(k):
        idx = list(range(prefix)) + list(range(prefix + c * total, prefix + (c + 1) * total))
        assert torch.equal(got[idx][:, idx], single)


def test_every_row_attends_to_something():
    # A fully masked row would make scaled_dot_product_attention produce NaN.
    for groups, c, k in [([1], 0, 1), ([3, 1, 2], 0, 2), ([4], 2, 3), ([1, 1, 1, 1], 1, 1)]:
        assert generalized_causal_mask(groups, c, k).any(dim=1).all()


def test_device_argument():
    m = generalized_causal_mask([2, 2], 1, device="cpu")
    assert m.device.type == "cpu"


@pytest.mark.parametrize("groups, num_cond, num_copies", [
    ([], 0, 1),
    ([2, 0, 3], 0, 1),
    ([0], 2, 1),
    ([2, -1], 0, 1),
    ([2, 2], -1, 1),
    ([2, 2], 0, 0),
])
def test_bad_input_raises(groups, num_cond, num_copies):
    with pytest.raises(ValueError):
        generalized_causal_mask(groups, num_cond, num_copies)
