"""Core-math checks that mutation testing showed the rest of the suite would not notice.

Each test names the change it guards against. Expected values come from the paper's / release's
formulas (written out here independently) or from exact statistical laws, never from running the
code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from causalfusion.ar_plan import ARPlanConfig, ar_loss_weights, sample_plan
from causalfusion.diffusion import Diffusion, space_timesteps
from causalfusion.editing import edit
from causalfusion.masks import generalized_causal_mask
from causalfusion.models import CausalFusion, sincos_pos_embed_2d
from causalfusion.objective import causalfusion_loss, noised_loss
from causalfusion.sampling import per_sample_randn, sample, sample_generators
from conftest import make_tiny_model, tiny_config


# ---- AR plan: timesteps --------------------------------------------------------------------------
def test_plan_timesteps_are_independent_per_sample_and_per_copy():
    """Tab. 7's "K x t per AR step": every sample, and every one of its K noisy copies, draws its own t
    (not one t per batch, not one t shared by the copies)."""
    g = torch.Generator().manual_seed(0)
    for t_per_step in (False, True):
        plan = sample_plan(ARPlanConfig(t_copies=4, t_per_step=t_per_step, fixed_steps=2), 64, (4, 4), 1000, g)
        first = plan.t[:, :, 0]  # [B, K]: the t of each copy's first token
        # two independent uniform draws over 1000 steps coincide with probability 1/1000
        assert (first[:, 0] == first[:, 1]).float().mean() < 0.05, t_per_step
        assert len(torch.unique(first[:, 0])) > 48, t_per_step  # 64 samples: ~62 distinct values expected


def test_plan_timesteps_cover_every_training_step():
    """t ~ U{0..T-1} (DiT): with 20000 draws each of the 1000 steps shows up (a missing one has
    probability ~1000 exp(-20)), t=0 and t=T-1 included, and the counts fit the uniform law."""
    from scipy import stats

    plan = sample_plan(ARPlanConfig(order="raster"), 20000, (4, 4), 1000, torch.Generator().manual_seed(1))
    t = plan.t[:, 0, 0]
    counts = torch.bincount(t, minlength=1000)
    assert len(counts) == 1000 and int(counts.min()) > 0
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


# ---- objective: AR weights and the noise -----------------------------------------------------------
def test_noised_loss_applies_the_ar_weights_in_ar_order():
    """A model that outputs 0 scores mean_{b,k,l} w_l * mean_p(eps_{b,k,order[b,l]}^2): the weights
    (AR order) multiply the squared noise of the token at that AR position."""
    model = CausalFusion(tiny_config(in_channels=1))
    g = torch.Generator().manual_seed(2)
    B, K, L, P = 3, 2, model.cfg.num_tokens, model.cfg.patch_dim
    groups = [3, 5, 8]
    weights = ar_loss_weights(groups, 3.0)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    t = torch.randint(0, 1000, (B, K, L), generator=g)
    noise = torch.randn(B, K, L, P, generator=g, dtype=torch.float64)
    x0 = torch.rand(B, 1, 8, 8, generator=g, dtype=torch.float64)

    def zero_model(x0, xt, t, y, group_sizes, order):
        return torch.zeros(B, K, L, P, dtype=torch.float64)

    loss = noised_loss(model, Diffusion(), x0, torch.zeros(B, dtype=torch.long), order, t, noise, groups, weights,
                       run_model=zero_model)
    starts = [0, 3, 8]  # first AR index of each step
    want = 0.0
    for b in range(B):
        for k in range(K):
            for pos in range(L):
                start = max(s for s in starts if s <= pos)
                w = 3.0 - 2.0 * start / L  # release: lambda - (lambda - 1) * start / L
                want += w * float((noise[b, k, order[b, pos]] ** 2).mean())
    want /= B * K * L
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert abs(float(loss) - float((noise ** 2).mean())) > 1e-2  # the weights matter here


def test_loss_of_a_zero_model_is_the_mean_ar_weight():
    """The zero-initialised head predicts eps = 0, so E[loss] = mean_l w_l * E[eps^2] = mean_l w_l for
    standard normal noise. Fixed S=4 of 4 tokens, lambda=3: weights 3, 2.5, 2, 1.5 -> 2.25 (unweighted:
    1; uniform noise: 0.75). The plan's t span the whole 0..999 schedule."""
    torch.manual_seed(0)
    model = CausalFusion(tiny_config(in_channels=1))  # zero head
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(256, 1, 8, 8, generator=g) * 2 - 1
    with torch.no_grad():
        loss, plan = causalfusion_loss(model, Diffusion(), x0, torch.zeros(256, dtype=torch.long),
                                       ARPlanConfig(fixed_steps=4, lam=3.0), g)
    # 256 x 16 tokens of 4 values: the estimate's standard deviation is about 0.026
    assert float(loss) == pytest.approx(2.25, abs=0.15)
    assert int(plan.t.min()) < 50 and int(plan.t.max()) > 950


# ---- schedule ----------------------------------------------------------------------------------------
def adm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's ``space_timesteps`` (improved-diffusion respace.py, one section), as DiT uses it."""
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken))


def test_respacing_matches_adm():
    """Every step count 2..1000 keeps ADM's timesteps (the paper's 250 included), ties too."""
    for count in range(2, 1001):
        assert space_timesteps(1000, count) == adm_space_timesteps(1000, count), count
    assert space_timesteps(1000, 1) == [999]  # one step starts from pure noise (ADM would keep t=0)


def test_ddim_eta_above_one_clips_the_direction_term():
    """sample() accepts any eta >= 0. Where sigma^2 > 1 - a_prev the deterministic direction
    sqrt(1 - a_prev - sigma^2) eps has no real value; the step stays real with that term at 0."""
    d = Diffusion().respace(5)
    ac_all = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    kept = adm_space_timesteps(1000, 5)
    i, eta = 4, 1.5
    ac, ac_prev = ac_all[kept[i]], ac_all[kept[i - 1]]
    sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
    assert sigma ** 2 > 1 - ac_prev  # the case in question
    g = torch.Generator().manual_seed(4)
    xt, eps, z = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    x0 = (xt - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
    out = d.ddim_step(xt, i, eps, z, eta=eta)
    assert not out.is_complex() and torch.isfinite(out).all()
    torch.testing.assert_close(out, math.sqrt(ac_prev) * x0 + sigma * z)


# ---- sampler -------------------------------------------------------------------------------------------
@torch.no_grad()
def test_ddim_sampler_uses_eta():
    """S=1 DDIM with eta > 0 is, draw for draw, the written-out loop: the initial noise and one
    fresh per-sample draw at every step but the last, each step ``ddim_step(..., eta)``."""
    model = make_tiny_model()
    c = model.cfg
    labels, steps, eta, seed = torch.tensor([0, 3]), 4, 0.8, 5
    d = Diffusion().respace(steps)
    gens = sample_generators(seed, range(len(labels)))
    shape = (c.in_channels, c.image_size, c.image_size)
    x = per_sample_randn(gens, shape)
    for i in reversed(range(steps)):
        eps = model.predict_one_step(x, torch.full((len(labels),), int(d.timesteps[i])), labels)
        z = per_sample_randn(gens, shape) if i > 0 else torch.zeros_like(x)
        x = d.ddim_step(x, i, eps, z, eta=eta)
    got = sample(model, labels, steps=steps, sampler="ddim", eta=eta, seed=seed, order="raster")
    scale = float(x.abs().max())
    assert float((got - x).abs().max()) <= 1e-4 * max(scale, 1.0)
    plain = sample(model, labels, steps=steps, sampler="ddim", eta=0.0, seed=seed, order="raster")
    assert float((got - plain).abs().max()) > 1e-2 * max(scale, 1.0)  # eta really changes the sample


# ---- editing ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_edit_pairs_each_image_with_its_own_label():
    """Per-image labels with n variations: image i's variations are generated as label i (the
    output is [B*n] with each image's n variations together)."""
    model = make_tiny_model()
    images = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    kw = dict(n=2, steps=3, seed=2)
    both = edit(model, images, "top", [1, 3], **kw)
    for i, label in enumerate((1, 3)):
        alone = edit(model, images[i], "top", label, first_index=2 * i, **kw)
        scale = max(float(alone.abs().max()), 1.0)
        assert float((both[2 * i:2 * i + 2] - alone).abs().max()) <= 1e-4 * scale, i
        other = edit(model, images[i], "top", 4 - label, first_index=2 * i, **kw)
        assert float((other - alone).abs().max()) > 1e-2 * scale  # the label matters
    with pytest.raises(ValueError, match="the mask regenerates 8 tokens"):
        edit(model, images, "top", 1, steps=2, ar_steps=9)


# ---- model ----------------------------------------------------------------------------------------------
def _layer_norm(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def _gelu_tanh(u):
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))


@torch.no_grad()
def test_block_is_pre_ln_with_headwise_qk_layernorm_and_tanh_gelu():
    """One block written out from the paper's description: x + Attn(LN1(x)) with qkv without bias and
    a LayerNorm on every head's query and key, then x + MLP(LN2(x)) with GELU (tanh)."""
    torch.manual_seed(7)
    model = make_tiny_model().double()
    blk = model.blocks[0]
    for ln in (blk.norm1, blk.norm2, blk.attn.q_norm, blk.attn.k_norm):  # distinct, non-trivial norms
        ln.weight.copy_(1 + 0.3 * torch.randn_like(ln.weight))
        ln.bias.copy_(0.3 * torch.randn_like(ln.bias))
    groups, C = [3, 5, 8], model.cfg.num_cond
    mask = generalized_causal_mask(groups, C)
    n, D, H = mask.shape[0], model.cfg.hidden_size, model.cfg.num_heads
    hd = D // H
    x = torch.randn(2, n, D, dtype=torch.float64) * 2

    h = _layer_norm(x, blk.norm1)
    assert blk.attn.qkv.bias is None
    q, k, v = (h @ blk.attn.qkv.weight.T).split(D, -1)
    q, k, v = (a.view(2, n, H, hd).transpose(1, 2) for a in (q, k, v))
    q, k = _layer_norm(q, blk.attn.q_norm), _layer_norm(k, blk.attn.k_norm)
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
    x1 = x + (att @ v).transpose(1, 2).reshape(2, n, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    fc1, fc2 = blk.mlp[0], blk.mlp[2]
    want = x1 + _gelu_tanh(_layer_norm(x1, blk.norm2) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    torch.testing.assert_close(blk(x, mask, None, 0), want, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_timestep_embedding_is_the_dit_sinusoid():
    """DiT's frequency embedding [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/128), i < 128, into the MLP."""
    model = make_tiny_model()
    t = torch.tensor([0, 1, 17, 500, 999])
    w = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    arg = t.numpy()[:, None].astype(np.float64) * w[None]
    freq = torch.from_numpy(np.concatenate([np.cos(arg), np.sin(arg)], 1)).float()
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(freq), rtol=1e-5, atol=1e-5)


def test_sincos_positions_follow_the_2d_formula_and_tell_tokens_apart():
    """MAE/DiT 2-D sin-cos, half the channels for the row and half for the column; each half is
    [sin(p w_j), cos(p w_j)] with w_j = 10000^(-j/(d/2)), d = D/2. Every position is distinct."""
    D, grid = 16, (3, 4)
    got = sincos_pos_embed_2d(D, grid)
    d = D // 2
    want = torch.zeros(grid[0] * grid[1], D)
    for r in range(grid[0]):
        for c in range(grid[1]):
            for half, p in enumerate((r, c)):
                for j in range(d // 2):
                    w = 10000.0 ** (-j / (d / 2))
                    want[r * grid[1] + c, half * d + j] = math.sin(p * w)
                    want[r * grid[1] + c, half * d + d // 2 + j] = math.cos(p * w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model = make_tiny_model()
    pos = model.pos_embed
    dist = torch.cdist(pos, pos) + torch.eye(len(pos))
    assert float(dist.min()) > 1e-2


@torch.no_grad()
def test_repeated_class_tokens_are_told_apart_by_their_positions():
    """Tab. 8: class_tokens tokens repeated class_repeat times, each slot with its own learned
    position; the repeats are the same class tokens, and no two slots are equal."""
    model = make_tiny_model(class_tokens=2, class_repeat=3)
    D = model.cfg.hidden_size
    y = torch.tensor([1, 4])
    emb = model.embed_cond(y)  # [B, 6, D]
    tokens = model.class_embed.weight[y].view(2, 2, D)
    base = emb - model.cond_pos
    for b in range(2):
        # every slot minus its position is one of the sample's class tokens, each used 3 times
        match = (base[b][:, None] - tokens[b][None]).abs().amax(-1) < 1e-6  # [6, 2]
        assert match.sum(1).eq(1).all() and match.sum(0).tolist() == [3, 3]
        dist = torch.cdist(emb[b], emb[b]) + torch.eye(6)
        assert float(dist.min()) > 1e-3
