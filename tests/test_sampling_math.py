"""Sampler math checked against independent derivations: the CFG interval's boundaries on the
original 0..999 scale when steps are respaced, and the respaced DDPM posterior derived by
conditioning the joint Gaussian of (x_prev, x_t) given x0 rather than from the closed form.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from causalfusion import sampling
from causalfusion.diffusion import Diffusion
from causalfusion.models import CausalFusion
from causalfusion.sampling import guided_output, sample
from conftest import tiny_config


class _StubRunner:
    """Outputs 1 for the conditional rows and 0 for the null rows of a doubled batch (and 1 when
    only the conditional rows run), so the guided value is the CFG scale inside the interval."""

    def __init__(self, batch: int):
        self.batch = batch

    def output(self, tokens: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond_rows = (torch.arange(tokens.shape[0]) < self.batch).float()
        return cond_rows[:, None, None].expand_as(tokens).clone()


def test_guided_output_interval_is_half_open():
    """[lo, hi): t = lo is guided, t = hi is not (the one-step sampler's rule, here for the general
    sampler, whose boundaries no other test reaches: the respaced steps there miss lo and hi)."""
    xs, pos = torch.zeros(3, 2, 4), torch.zeros(3, 2, dtype=torch.long)
    for t, want in ((199, 1.0), (200, 3.0), (598, 3.0), (599, 1.0)):
        out = guided_output(_StubRunner(3), xs, pos, t, 3.0, (200, 599))
        assert torch.equal(out, torch.full_like(xs, want)), t


@pytest.mark.parametrize("cache", [True, False])
def test_sampler_guides_exactly_the_kept_original_steps_in_the_interval(monkeypatch, cache):
    """With 6 respaced steps the model runs at the original t = round(k * 999 / 5); guidance (a
    doubled batch) must be decided on those t, not on the respaced index, with both bounds on kept
    steps: lo = 200 guided, hi = 799 not."""
    torch.manual_seed(0)
    model = CausalFusion(tiny_config(in_channels=1)).eval()
    runner_cls = sampling.CachedRunner if cache else sampling.UncachedRunner
    seen: list[tuple[int, int]] = []
    real = runner_cls.output

    def spy(self, tokens, pos, t):
        seen.append((int(t[0, 0]), tokens.shape[0]))
        return real(self, tokens, pos, t)

    monkeypatch.setattr(runner_cls, "output", spy)
    b, lo, hi = 3, 200, 799
    sample(model, torch.tensor([0, 1, 2]), ar_steps=2, steps=6, cfg=2.0, cfg_interval=(lo, hi), seed=0, cache=cache)
    kept = [round(k * 999 / 5) for k in range(6)]
    assert lo in kept and hi in kept  # the bounds themselves are sampled steps
    want = [(t, 2 * b if lo <= t < hi else b) for t in reversed(kept)] * 2  # two AR steps
    assert seen == want


@pytest.mark.parametrize("steps", [1000, 250, 7, 2, 1])
def test_respaced_posterior_is_the_conditioned_joint_gaussian(steps):
    """q(x_prev | x_t, x0) from the forward process alone: x_prev = sqrt(a_p) x0 + sqrt(1-a_p) e1 and
    x_t = sqrt(a_t/a_p) x_prev + sqrt(1 - a_t/a_p) e2, so given x0, Cov(x_prev, x_t) = sqrt(a_t/a_p)(1-a_p),
    Var(x_t) = 1-a_t, and the conditional mean/variance follow from Gaussian conditioning. The
    last step (i = 0) has a_p = 1: mean = x0 and variance 0."""
    d = Diffusion().respace(steps)
    base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    kept = d.timesteps.tolist()
    for i, t in enumerate(kept):
        a_t, a_p = base[t], (base[kept[i - 1]] if i > 0 else 1.0)
        cov, var_t, var_p = math.sqrt(a_t / a_p) * (1 - a_p), 1 - a_t, 1 - a_p
        coef_xt = cov / var_t
        coef_x0 = math.sqrt(a_p) - coef_xt * math.sqrt(a_t)
        assert float(d.posterior_coef_xt[i]) == pytest.approx(coef_xt, abs=1e-12), (i, t)
        assert float(d.posterior_coef_x0[i]) == pytest.approx(coef_x0, abs=1e-12), (i, t)
        assert float(d.posterior_variance[i]) == pytest.approx(var_p - cov ** 2 / var_t, abs=1e-14), (i, t)
        if i > 0:  # the fixed large variance is the respaced beta 1 - a_t/a_p (unused at i = 0: no noise)
            assert float(d.large_variance[i]) == pytest.approx(1 - a_t / a_p, rel=1e-9), (i, t)
