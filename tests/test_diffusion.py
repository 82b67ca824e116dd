"""DDPM schedule (release: linear betas 1e-4..0.02 over 1000 steps), respacing, samplers, loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causalfusion.diffusion import Diffusion, denoising_loss, space_timesteps


def np_alphas_cumprod(n: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, n))


def test_linear_betas():
    d = Diffusion()
    assert len(d) == 1000
    betas = d.betas.numpy()
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9, atol=1e-12)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np_alphas_cumprod(), rtol=1e-12)
    assert torch.equal(d.timesteps, torch.arange(1000))


@pytest.mark.parametrize("t", [0, 50, 250, 600, 999])
def test_q_sample_statistics(t):
    d = Diffusion()
    ac = np_alphas_cumprod()[t]
    n, x0_val = 100_000, 1.5
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((n,), t), noise)
    assert xt.shape == x0.shape
    std = np.sqrt(1 - ac)
    assert float(xt.mean()) == pytest.approx(np.sqrt(ac) * x0_val, abs=5 * std / np.sqrt(n))
    assert float(xt.std()) == pytest.approx(std, rel=0.02)


def test_q_sample_exact_and_per_sample_t():
    d = Diffusion()
    ac = np_alphas_cumprod()
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, noise)
    for b in range(3):
        ref = np.sqrt(ac[t[b]]) * x0[b] + np.sqrt(1 - ac[t[b]]) * noise[b]
        torch.testing.assert_close(xt[b], ref, rtol=1e-12, atol=1e-12)
    # float32 input stays float32
    assert d.q_sample(x0.float(), t, noise.float()).dtype == torch.float32
    # t may carry token dims too (per-token timesteps in AR training): [B, L] against [B, L, P]
    tok = torch.randn(2, 5, 3)
    tt = torch.tensor([[0, 1, 2, 3, 999], [10, 10, 10, 10, 10]])
    out = d.q_sample(tok, tt, torch.zeros_like(tok))
    torch.testing.assert_close(out[1, 2], tok[1, 2] * float(np.sqrt(ac[10])))
    torch.testing.assert_close(out[0, 4], tok[0, 4] * float(np.sqrt(ac[999])))


def test_space_timesteps_250():
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 == len(set(steps))
    assert steps[0] == 0 and steps[-1] == 999
    assert steps == sorted(steps) and all(0 <= s < 1000 for s in steps)
    gaps = np.diff(steps)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly spaced


@pytest.mark.parametrize("n, count", [(1000, 2), (1000, 7), (1000, 50), (1000, 999), (1000, 1000), (10, 3), (37, 36)])
def test_space_timesteps_counts(n, count):
    steps = space_timesteps(n, count)
    assert len(set(steps)) == count and steps[0] == 0 and steps[-1] == n - 1


def test_space_timesteps_bad():
    for count in (0, 1001):
        with pytest.raises(ValueError):
            space_timesteps(1000, count)


def test_respace_keeps_alphas_cumprod():
    base = Diffusion()
    d = base.respace(250)
    kept = space_timesteps(1000, 250)
    assert len(d) == 250 and d.timesteps.tolist() == kept
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np_alphas_cumprod()[kept], rtol=1e-12)
    # betas are re-derived so that the cumulative product reproduces the kept alphā
    np.testing.assert_allclose(np.cumprod(1 - d.betas.numpy()), d.alphas_cumprod.numpy(), rtol=1e-10)
    assert (d.betas > 0).all() and (d.betas < 1).all()


def test_respace_full_is_identity():
    base = Diffusion()
    d = base.respace(1000)
    assert torch.equal(d.timesteps, base.timesteps)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "large_variance"):
        torch.testing.assert_close(getattr(d, name), getattr(base, name), rtol=1e-12, atol=0)


def test_large_variance_and_posterior():
    d = Diffusion()
    b = np.linspace(1e-4, 0.02, 1000)
    ac = np_alphas_cumprod()
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post = b * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(d.posterior_variance.numpy(), post, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(d.large_variance.numpy()[1:], b[1:], rtol=1e-9)
    assert float(d.large_variance[0]) == pytest.approx(post[1], rel=1e-9)


@pytest.mark.parametrize("steps", [1000, 250, 10])
def test_ddpm_step_last_returns_x0(steps):
    d = Diffusion().respace(steps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, torch.zeros(4, dtype=torch.long), eps)
    out = d.ddpm_step(xt, 0, eps, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)


def test_ddpm_step_is_posterior_mean_plus_large_variance_noise():
    d = Diffusion().respace(50)
    i = 20
    ac, ac_prev = float(d.alphas_cumprod[i]), float(d.alphas_cumprod[i - 1])
    beta = 1 - ac / ac_prev
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, dtype=torch.float64, generator=g)
    eps = torch.randn(8, dtype=torch.float64, generator=g)
    z = torch.randn(8, dtype=torch.float64, generator=g)
    xt = d.q_sample(x0, torch.full((8,), i), eps)
    mean = (np.sqrt(ac_prev) * beta / (1 - ac)) * x0 + (np.sqrt(1 - beta) * (1 - ac_prev) / (1 - ac)) * xt
    torch.testing.assert_close(d.ddpm_step(xt, i, eps, torch.zeros(8, dtype=torch.float64)), mean)
    torch.testing.assert_close(d.ddpm_step(xt, i, eps, z), mean + np.sqrt(beta) * z)


@pytest.mark.parametrize("steps", [5, 25])
def test_ddim_chain_recovers_x0(steps):
    d = Diffusion().respace(steps)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps0 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = d.q_sample(x0, torch.full((3,), len(d) - 1), eps0)
    for i in reversed(range(len(d))):
        ac = float(d.alphas_cumprod[i])
        true_eps = (x - ac ** 0.5 * x0) / (1 - ac) ** 0.5  # the oracle noise of the current x_i
        x = d.ddim_step(x, i, true_eps, torch.randn(x.shape, generator=g, dtype=torch.float64), eta=0.0)
        if i > 0:  # eta = 0 is deterministic and stays on the same noise direction
            ac_prev = float(d.alphas_cumprod[i - 1])
            torch.testing.assert_close(x, ac_prev ** 0.5 * x0 + (1 - ac_prev) ** 0.5 * eps0)
    torch.testing.assert_close(x, x0, rtol=1e-9, atol=1e-9)


def test_ddim_eta_one_adds_ddpm_posterior_noise():
    d = Diffusion().respace(20)
    i = 10
    x0 = torch.randn(5, dtype=torch.float64)
    eps = torch.randn(5, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((5,), i), eps)
    z = torch.randn(5, dtype=torch.float64)
    a = d.ddim_step(xt, i, eps, z, eta=1.0)
    b = d.ddim_step(xt, i, eps, torch.zeros(5, dtype=torch.float64), eta=1.0)
    sigma = float(d.posterior_variance[i]) ** 0.5  # eta=1 DDIM has the DDPM posterior variance
    torch.testing.assert_close(a - b, sigma * z)
    # its mean is the DDPM posterior mean
    torch.testing.assert_close(b, d.ddpm_step(xt, i, eps, torch.zeros(5, dtype=torch.float64)))


def test_denoising_loss_weighted_mean():
    g = torch.Generator().manual_seed(3)
    B, K, L, P = 2, 3, 5, 4
    pred = torch.randn(B, K, L, P, generator=g)
    noise = torch.randn(B, K, L, P, generator=g)
    w = torch.tensor([2.0, 1.5, 1.5, 1.0, 1.0])
    total = 0.0
    for b in range(B):
        for k in range(K):
            for l in range(L):
                total += float(w[l]) * sum(float(pred[b, k, l, p] - noise[b, k, l, p]) ** 2 for p in range(P)) / P
    expected = total / (B * K * L)
    assert float(denoising_loss(pred, noise, w)) == pytest.approx(expected, rel=1e-5)
    assert float(denoising_loss(pred, noise)) == pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-6)
    assert float(denoising_loss(pred, noise, torch.ones(L))) == pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-6)
    assert denoising_loss(pred, pred.clone(), w).item() == 0.0


def test_denoising_loss_is_differentiable_and_float32_for_half_inputs():
    pred = torch.randn(2, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    loss = denoising_loss(pred, torch.zeros(2, 4, 3, dtype=torch.bfloat16), torch.ones(4))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


# ---- v-prediction ---------------------------------------------------------------------------------
def test_unknown_prediction_refused():
    with pytest.raises(ValueError, match="prediction type"):
        Diffusion(prediction="x0")


@pytest.mark.parametrize("steps", [1000, 50])
def test_v_target_converts_back_to_x0_and_eps(steps):
    """A perfect v model gives back the exact x0 and noise at every step of a (respaced) schedule."""
    d = Diffusion(prediction="v").respace(steps)
    assert d.prediction == "v"
    g = torch.Generator().manual_seed(0)
    for i in (0, len(d) // 2, len(d) - 1):
        x0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
        noise = torch.randn(4, 6, generator=g, dtype=torch.float64)
        t = torch.full((4,), i)
        xt, v = d.q_sample(x0, t, noise), d.target(x0, t, noise)
        ac = float(d.alphas_cumprod[i])
        torch.testing.assert_close(v, ac ** 0.5 * noise - (1 - ac) ** 0.5 * x0)
        torch.testing.assert_close(d.predict_x0(xt, i, v), x0)
        torch.testing.assert_close(d.predict_eps(xt, i, v), noise)


def test_v_and_eps_models_take_the_same_steps():
    """DDPM and DDIM updates depend only on what the output implies, not on its parameterisation."""
    de, dv = Diffusion().respace(20), Diffusion(prediction="v").respace(20)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    z = torch.randn(2, 8, generator=g, dtype=torch.float64)
    for i in (0, 7, 19):
        t = torch.full((2,), i)
        xt = de.q_sample(x0, t, eps)
        v = dv.target(x0, t, eps)
        torch.testing.assert_close(dv.ddpm_step(xt, i, v, z), de.ddpm_step(xt, i, eps, z))
        torch.testing.assert_close(dv.ddim_step(xt, i, v, z, eta=0.5), de.ddim_step(xt, i, eps, z, eta=0.5))
    assert torch.equal(de.target(x0, torch.full((2,), 3), eps), eps)  # eps models regress the noise itself
