"""AR-step plan (paper Sec. 5): S distribution, cut points, token orders, loss weights, timesteps."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from causalfusion.ar_plan import (
    ARPlanConfig,
    ar_loss_weights,
    ar_step_probs,
    equal_group_sizes,
    random_group_sizes,
    sample_num_steps,
    sample_plan,
    token_order,
)


def chisquare_pooled(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness-of-fit p-value, pooling tail bins until each has >= min_expected."""
    obs, exp = [], []
    acc_o = acc_e = 0.0
    for o, e in zip(observed, expected):
        acc_o += o
        acc_e += e
        if acc_e >= min_expected:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:  # leftover tail joins the last bin
        obs[-1] += acc_o
        exp[-1] += acc_e
    obs, exp = np.array(obs), np.array(exp)
    assert len(obs) >= 2
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


# ---- number of AR steps ------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.9, 0.5])
def test_num_steps_distribution(gamma):
    L, n = 16, 3000
    g = torch.Generator().manual_seed(1234)
    draws = [sample_num_steps(L, gamma, g) for _ in range(n)]
    assert min(draws) >= 1 and max(draws) <= L
    counts = Counter(draws)
    observed = np.array([counts.get(s, 0) for s in range(1, L + 1)], dtype=float)
    expected = np.array([gamma ** (s - 1) for s in range(1, L + 1)])
    expected = expected / expected.sum() * n
    assert chisquare_pooled(observed, expected) > 1e-3


def test_num_steps_distribution_rejects_wrong_law():
    # The test above has power: the same draws are clearly not uniform over 1..L.
    L, n = 16, 3000
    g = torch.Generator().manual_seed(1234)
    draws = Counter(sample_num_steps(L, 0.9, g) for _ in range(n))
    observed = np.array([draws.get(s, 0) for s in range(1, L + 1)], dtype=float)
    assert chisquare_pooled(observed, np.full(L, n / L)) < 1e-3


def test_step_probs_formula():
    p = ar_step_probs(10, 0.8)
    ref = 0.8 ** np.arange(10)
    np.testing.assert_allclose(p.numpy(), ref / ref.sum(), rtol=1e-12)
    np.testing.assert_allclose(ar_step_probs(7, 1.0).numpy(), np.full(7, 1 / 7), rtol=1e-12)


def test_gamma_zero_is_in_context_dit():
    g = torch.Generator().manual_seed(0)
    assert all(sample_num_steps(16, 0.0, g) == 1 for _ in range(200))
    plan = sample_plan(ARPlanConfig(gamma=0.0), 2, (4, 4), 1000, g)
    assert plan.group_sizes == [16] and plan.num_steps == 1


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError):
        ar_step_probs(16, gamma)
    with pytest.raises(ValueError):
        sample_plan(ARPlanConfig(gamma=gamma), 1, (4, 4), 1000)


# ---- group sizes -------------------------------------------------------------------------------

def test_random_group_sizes_partition():
    g = torch.Generator().manual_seed(0)
    for L in (1, 2, 7, 16):
        for s in {1, min(2, L), max(L // 2, 1), L}:
            sizes = random_group_sizes(L, s, g)
            assert len(sizes) == s and sum(sizes) == L and all(k >= 1 for k in sizes)
            assert all(isinstance(k, int) for k in sizes)


def test_first_group_uniform_for_two_steps():
    L, n = 16, 3000
    g = torch.Generator().manual_seed(7)
    counts = Counter(random_group_sizes(L, 2, g)[0] for _ in range(n))
    assert set(counts) <= set(range(1, L))
    observed = np.array([counts.get(k, 0) for k in range(1, L)], dtype=float)
    assert stats.chisquare(observed).pvalue > 1e-3


def test_cut_subsets_uniform():
    # S=3, L=6: the 2 cut points are one of C(5, 2) = 10 subsets of {1..5}, each equally likely.
    L, S, n = 6, 3, 3000
    g = torch.Generator().manual_seed(11)
    subsets = list(itertools.combinations(range(1, L), S - 1))
    counts = Counter()
    for _ in range(n):
        sizes = random_group_sizes(L, S, g)
        counts[tuple(np.cumsum(sizes)[:-1].tolist())] += 1
    assert set(counts) <= set(subsets)
    observed = np.array([counts.get(c, 0) for c in subsets], dtype=float)
    assert stats.chisquare(observed).pvalue > 1e-3


@pytest.mark.parametrize("L, S", [(16, 1), (16, 4), (16, 16), (10, 3), (7, 7)])
def test_equal_group_sizes(L, S):
    sizes = equal_group_sizes(L, S)
    assert len(sizes) == S and sum(sizes) == L and max(sizes) - min(sizes) <= 1
    if L % S == 0:
        assert sizes == [L // S] * S


@pytest.mark.parametrize("fn", [random_group_sizes, equal_group_sizes])
@pytest.mark.parametrize("S", [0, -1, 17])
def test_group_sizes_bad_steps(fn, S):
    with pytest.raises(ValueError):
        fn(16, S)


# ---- token orders ------------------------------------------------------------------------------

def ref_block_order(h: int, w: int, b: int) -> list[int]:
    out = []
    for tr in range(0, h, b):
        for tc in range(0, w, b):
            for r in range(tr, min(tr + b, h)):
                for c in range(tc, min(tc + b, w)):
                    out.append(r * w + c)
    return out


def ref_dilated_order(h: int, w: int, d: int) -> list[int]:
    out = []
    for pr in range(d):
        for pc in range(d):
            for r in range(pr, h, d):
                for c in range(pc, w, d):
                    out.append(r * w + c)
    return out


GRIDS = [(4, 4), (5, 5), (3, 7), (6, 4), (1, 1), (8, 8)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["random", "raster", "block", "dilated"])
def test_orders_are_permutations(kind, grid):
    g = torch.Generator().manual_seed(3)
    order = token_order(kind, 3, grid, block=2, dilation=2, generator=g)
    n = grid[0] * grid[1]
    assert order.shape == (3, n) and order.dtype == torch.long
    for row in order:
        assert sorted(row.tolist()) == list(range(n))


def test_random_orders_differ_per_sample():
    g = torch.Generator().manual_seed(0)
    order = token_order("random", 4, (4, 4), generator=g)
    assert len({tuple(r.tolist()) for r in order}) == 4


def test_raster_is_identity():
    order = token_order("raster", 2, (3, 5))
    assert torch.equal(order, torch.arange(15).expand(2, 15))


def test_block_order_4x4_block2_visits_top_left_tile_first():
    order = token_order("block", 1, (4, 4), block=2)[0].tolist()
    assert sorted(order[:4]) == [0, 1, 4, 5]  # top-left 2x2 tile
    assert sorted(order[4:8]) == [2, 3, 6, 7]  # then the top-right tile


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_block_order_matches_reference(grid, block):
    order = token_order("block", 2, grid, block=block)
    assert order[0].tolist() == ref_block_order(*grid, block)
    assert torch.equal(order[0], order[1])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_dilated_order_matches_reference(grid, dilation):
    order = token_order("dilated", 1, grid, dilation=dilation)
    assert order[0].tolist() == ref_dilated_order(*grid, dilation)


def test_bad_orders():
    with pytest.raises(ValueError):
        token_order("spiral", 1, (4, 4))
    with pytest.raises(ValueError):
        token_order("block", 1, (4, 4), block=0)
    with pytest.raises(ValueError):
        token_order("dilated", 1, (4, 4), dilation=0)


# ---- loss weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [1.0, 2.0, 3.5])
def test_release_weights(lam):
    sizes = [3, 5, 1, 7]
    L = sum(sizes)
    w = ar_loss_weights(sizes, lam, "release")
    assert w.shape == (L,)
    start = 0
    for k in sizes:
        expected = lam - (lam - 1) * start / L
        torch.testing.assert_close(w[start:start + k], torch.full((k,), expected), rtol=1e-6, atol=1e-6)
        start += k
    assert w[0] == pytest.approx(lam)


def test_release_weights_default_lambda_is_2_minus_start_over_L():
    sizes = [4, 4, 8]
    w = ar_loss_weights(sizes)
    assert w[0] == pytest.approx(2.0) and w[4] == pytest.approx(2 - 4 / 16) and w[8] == pytest.approx(2 - 8 / 16)


@pytest.mark.parametrize("sizes", [[3, 5, 1, 7], [8, 8], [1] * 6])
def test_step_weights(sizes):
    lam = 2.5
    w = ar_loss_weights(sizes, lam, "step")
    S = len(sizes)
    bounds = np.cumsum([0] + sizes)
    per_step = [w[bounds[i]:bounds[i + 1]] for i in range(S)]
    for s, ws in enumerate(per_step):
        assert torch.all(ws == ws[0])  # constant inside a step
        assert float(ws[0]) == pytest.approx(lam - (lam - 1) * s / (S - 1))  # linear in the step index
    assert float(per_step[0][0]) == pytest.approx(lam)
    assert float(per_step[-1][0]) == 1.0  # exactly 1 at the last step


def test_step_weights_single_step():
    assert torch.allclose(ar_loss_weights([16], 2.0, "step"), torch.full((16,), 2.0))


def test_bad_weighting():
    with pytest.raises(ValueError):
        ar_loss_weights([4, 4], 2.0, "cosine")


# ---- full plans ---------------------------------------------------------------------------------

def test_plan_shapes_and_shared_t():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        plan = sample_plan(ARPlanConfig(gamma=0.9), 3, (4, 4), 1000, g)
        assert sum(plan.group_sizes) == 16 and plan.num_steps == len(plan.group_sizes)
        assert plan.order.shape == (3, 16) and plan.weights.shape == (16,)
        assert plan.t.shape == (3, 1, 16) and plan.t.dtype == torch.long
        assert (plan.t >= 0).all() and (plan.t < 1000).all()
        # default: one t per sample shared by every AR step
        assert torch.all(plan.t == plan.t[..., :1])


def test_plan_t_per_step_constant_within_group():
    g = torch.Generator().manual_seed(6)
    seen_varying = False
    for _ in range(20):
        plan = sample_plan(ARPlanConfig(gamma=1.0, t_per_step=True), 4, (4, 4), 1000, g)
        bounds = np.cumsum([0] + plan.group_sizes)
        for a, b in zip(bounds[:-1], bounds[1:]):
            grp = plan.t[..., a:b]
            assert torch.all(grp == grp[..., :1])
        if plan.num_steps > 1 and not torch.all(plan.t == plan.t[..., :1]):
            seen_varying = True
    assert seen_varying  # different steps do get different t


def test_plan_t_copies():
    g = torch.Generator().manual_seed(8)
    plan = sample_plan(ARPlanConfig(t_copies=4), 2, (4, 4), 1000, g)
    assert plan.t.shape == (2, 4, 16)
    assert len(torch.unique(plan.t[:, :, 0])) > 1  # copies carry independent timesteps
    plan = sample_plan(ARPlanConfig(t_copies=3, t_per_step=True, fixed_steps=4), 2, (4, 4), 1000, g)
    assert plan.t.shape == (2, 3, 16)
    for a in range(0, 16, 4):  # every copy: one t per AR step, and the four steps are not all alike
        assert torch.all(plan.t[..., a:a + 4] == plan.t[..., a:a + 1])
    assert not torch.all(plan.t == plan.t[..., :1])


@pytest.mark.parametrize("S", [1, 2, 4, 8, 16])
def test_plan_fixed_steps(S):
    g = torch.Generator().manual_seed(9)
    plan = sample_plan(ARPlanConfig(fixed_steps=S), 2, (4, 4), 1000, g)
    assert plan.group_sizes == [16 // S] * S


def test_plan_orders_from_config():
    plan = sample_plan(ARPlanConfig(order="raster"), 2, (4, 4), 1000)
    assert torch.equal(plan.order, torch.arange(16).expand(2, 16))
    plan = sample_plan(ARPlanConfig(order="block", block=2), 1, (4, 4), 1000)
    assert plan.order[0].tolist() == ref_block_order(4, 4, 2)


def test_plan_weights_follow_config():
    plan = sample_plan(ARPlanConfig(fixed_steps=4, lam=3.0, weighting="step"), 1, (4, 4), 1000)
    assert float(plan.weights[0]) == pytest.approx(3.0) and float(plan.weights[-1]) == 1.0


@pytest.mark.parametrize("cfg", [
    ARPlanConfig(fixed_steps=17),
    ARPlanConfig(fixed_steps=-1),
    ARPlanConfig(order="zigzag"),
    ARPlanConfig(weighting="cosine"),
    ARPlanConfig(lam=0.5),
    ARPlanConfig(t_copies=0),
    ARPlanConfig(gamma=2.0),
    ARPlanConfig(order="block", block=0),
    ARPlanConfig(order="dilated", dilation=0),
])
def test_plan_invalid_config(cfg):
    with pytest.raises(ValueError):
        cfg.validate(16)  # what the trainer checks before it writes anything
    with pytest.raises(ValueError):
        sample_plan(cfg, 1, (4, 4), 1000)
