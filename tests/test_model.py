"""CausalFusion transformer: causality of the training forward, S=1 / K-copies equivalences,
parameter counts, zero-init head, patchify, config round-trip, KV cache."""
from __future__ import annotations

import re

import pytest
import torch

from causalfusion.kv_cache import KVCache
from causalfusion.masks import generalized_causal_mask
from causalfusion.models import CausalFusion, ModelConfig, count_parameters
from conftest import make_tiny_model, tiny_config

ATOL, RTOL = 1e-5, 1e-5


def raster_pixels_mask(model: CausalFusion, raster_positions: list[int]) -> torch.Tensor:
    """A [C, H, W] {0,1} mask that covers exactly the patches at the given raster positions."""
    cfg = model.cfg
    tok = torch.zeros(1, cfg.num_tokens, cfg.patch_dim)
    tok[0, raster_positions] = 1.0
    return model.unpatchify(tok)[0]


def perturb_tokens(model, img: torch.Tensor, b: int, order: torch.Tensor, ar_positions, scale=3.0, seed=0):
    """Copy of ``img`` ([B, C, H, W]) with sample b's patches at the given AR positions changed."""
    g = torch.Generator().manual_seed(seed)
    raster = order[b, list(ar_positions)].tolist()
    m = raster_pixels_mask(model, raster)
    out = img.clone()
    out[b] = out[b] + scale * m * torch.randn(m.shape, generator=g)
    return out


def make_inputs(model, B=2, K=1, seed=0, t_const=True):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    L = cfg.num_tokens
    x0 = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    xt = torch.randn(B, K, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if t_const:
        t = torch.randint(0, 1000, (B, K, 1), generator=g).expand(B, K, L).contiguous()
    else:
        t = torch.randint(0, 1000, (B, K, L), generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return x0, xt, t, y, order


def step_slice(groups, s):
    start = sum(groups[:s])
    return slice(start, start + groups[s])


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def assert_changed(a, b):
    assert (a - b).abs().max() > 1e-3


# ---- causality of the training forward ------------------------------------------------------

CASES = [([5, 4, 7], 1), ([3, 3, 3, 7], 2), ([1, 14, 1], 1), ([8, 8], 1), ([2, 2, 2, 2, 2, 2, 4], 3)]


@pytest.mark.parametrize("groups, s", CASES)
@torch.no_grad()
def test_forbidden_inputs_do_not_change_step_s(groups, s):
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model, t_const=False)
    base = model(x0, xt, t, y, groups, order)
    L = sum(groups)
    assert base.shape == (2, 1, L, model.cfg.patch_dim)
    ss = step_slice(groups, s)
    later = range(ss.start, L)  # clean tokens of steps >= s
    other_noisy = [i for i in range(L) if not ss.start <= i < ss.stop]
    for b in range(2):
        out = model(perturb_tokens(model, x0, b, order, later), xt, t, y, groups, order)
        assert_same(out[:, :, ss], base[:, :, ss])
        # the earlier steps' predictions do not depend on them either
        assert_same(out[:, :, :ss.start], base[:, :, :ss.start])
        xt2 = xt.clone()
        xt2[:, 0] = perturb_tokens(model, xt[:, 0], b, order, other_noisy, seed=1)
        out = model(x0, xt2, t, y, groups, order)
        assert_same(out[:, :, ss], base[:, :, ss])
        # timesteps of other steps' noisy tokens do not matter either
        t2 = t.clone()
        t2[b, :, other_noisy] = (t2[b, :, other_noisy] + 377) % 1000
        out = model(x0, xt, t2, y, groups, order)
        assert_same(out[:, :, ss], base[:, :, ss])


@pytest.mark.parametrize("groups, s", CASES)
@torch.no_grad()
def test_allowed_inputs_change_step_s(groups, s):
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model)
    base = model(x0, xt, t, y, groups, order)
    ss = step_slice(groups, s)
    b = 1
    # one clean token of an earlier step
    out = model(perturb_tokens(model, x0, b, order, [ss.start - 1]), xt, t, y, groups, order)
    assert_changed(out[b, :, ss], base[b, :, ss])
    assert_same(out[1 - b], base[1 - b])  # other samples untouched
    # one noisy token of step s itself changes the other tokens of step s too
    xt2 = xt.clone()
    xt2[:, 0] = perturb_tokens(model, xt[:, 0], b, order, [ss.start])
    out = model(x0, xt2, t, y, groups, order)
    assert_changed(out[b, :, ss], base[b, :, ss])
    if groups[s] > 1:
        assert_changed(out[b, :, ss.start + 1:ss.stop], base[b, :, ss.start + 1:ss.stop])
    # the class label
    y2 = y.clone()
    y2[b] = (y2[b] + 1) % model.cfg.num_classes
    out = model(x0, xt, t, y2, groups, order)
    assert_changed(out[b, :, ss], base[b, :, ss])
    # the timestep of step s
    t2 = t.clone()
    t2[b, :, ss] = (t2[b, :, ss] + 400) % 1000
    out = model(x0, xt, t2, y, groups, order)
    assert_changed(out[b, :, ss], base[b, :, ss])


@torch.no_grad()
def test_first_step_ignores_all_clean_tokens():
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model)
    groups = [6, 10]
    base = model(x0, xt, t, y, groups, order)
    out = model(torch.randn_like(x0) * 5, xt, t, y, groups, order)
    assert_same(out[:, :, :6], base[:, :, :6])
    assert_changed(out[:, :, 6:], base[:, :, 6:])


@torch.no_grad()
def test_order_is_respected():
    """The same image under two orders with the same split: the prediction of a token that is in
    the first step under both orders depends only on the first step's set of tokens."""
    model = make_tiny_model()
    x0, xt, t, y, _ = make_inputs(model, B=1)
    L = model.cfg.num_tokens
    o1 = torch.arange(L)[None]
    o2 = torch.cat([torch.tensor([3, 2, 1, 0]), torch.arange(4, L)])[None]  # same first set of 4
    groups = [4, L - 4]
    out1 = model(x0, xt, t, y, groups, o1)
    out2 = model(x0, xt, t, y, groups, o2)
    # first step: same set, permuted -> same predictions, permuted
    assert_same(out2[0, 0, :4], out1[0, 0, [3, 2, 1, 0]])
    # second step sees the same clean set and the same noisy set -> same predictions
    assert_same(out2[0, 0, 4:], out1[0, 0, 4:])
    o3 = torch.cat([torch.tensor([0, 1, 2, 15]), torch.arange(3, 15)])[None]  # different first set
    out3 = model(x0, xt, t, y, groups, o3)
    # raster tokens 4..14 are in the second step under both orders (AR positions r and r+1), but
    # their clean context ({0,1,2,3} vs {0,1,2,15}) differs, so their predictions must differ.
    assert_changed(out3[0, 0, 5:16], out1[0, 0, 4:15])


@pytest.mark.parametrize("patch, channels", [(1, 1), (2, 2)])
@torch.no_grad()
def test_single_step_forward_matches_predict_one_step(patch, channels):
    model = make_tiny_model(patch_size=patch, in_channels=channels)
    cfg = model.cfg
    L = cfg.num_tokens
    x0, xt, t, y, order = make_inputs(model, B=3)
    out = model(x0, xt, t, y, [L], order)[:, 0]  # [B, L, P], AR order
    raster = torch.empty_like(out)
    for b in range(3):
        raster[b, order[b]] = out[b]
    eps = model.predict_one_step(xt[:, 0], t[:, 0, 0], y)
    assert eps.shape == xt[:, 0].shape
    assert_same(model.unpatchify(raster), eps)
    # S=1 never looks at x0
    assert_same(model(torch.randn_like(x0), xt, t, y, [L], order)[:, 0], out)


@torch.no_grad()
def test_k_copies_match_single_copy_forward():
    model = make_tiny_model()
    K = 3
    x0, xt, t, y, order = make_inputs(model, B=2, K=K, t_const=False)
    for groups in ([16], [5, 4, 7], [1] * 16):
        out = model(x0, xt, t, y, groups, order)
        assert out.shape == (2, K, 16, model.cfg.patch_dim)
        for j in range(K):
            ref = model(x0, xt[:, j:j + 1], t[:, j:j + 1], y, groups, order)
            assert_same(out[:, j:j + 1], ref)
        assert_changed(out[:, 0], out[:, 1])  # copies are really different inputs


@pytest.mark.parametrize("bad, needle", [
    (lambda x0, xt, t, y, o: (x0, xt[:, 0], t, y, o), "xt must be [B, K, 2, 8, 8]"),
    (lambda x0, xt, t, y, o: (x0, xt, t[:, 0], y, o), "t must be [B, K, L] = [2, 1, 16]"),
    (lambda x0, xt, t, y, o: (x0, xt, t, y[:, None], o), "y must be [B] = [2]"),
    (lambda x0, xt, t, y, o: (x0[:, :, :4], xt, t, y, o), "x0 must be [B, 2, 8, 8]"),
    (lambda x0, xt, t, y, o: (x0, xt, t, y, o[:, :8]), "order must be [B, L] or [L] = [16]"),
])
def test_forward_refuses_misshaped_inputs_in_one_line(bad, needle):
    model = make_tiny_model()
    x0, xt, t, y, order = bad(*make_inputs(model))
    with pytest.raises(ValueError, match=re.escape(needle)):
        model(x0, xt, t, y, [8, 8], order)


@torch.no_grad()
def test_shared_order_is_every_samples_order():
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model)
    shared = order[0]
    assert_same(model(x0, xt, t, y, [4, 12], shared), model(x0, xt, t, y, [4, 12], shared.expand(2, -1)))


@torch.no_grad()
def test_class_repeat_and_null_class():
    model = make_tiny_model(class_tokens=2, class_repeat=3)
    assert model.cfg.num_cond == 6
    x0, xt, t, y, order = make_inputs(model)
    out = model(x0, xt, t, y, [4, 12], order)
    assert torch.isfinite(out).all()
    y_null = torch.full_like(y, model.cfg.num_classes)  # the CFG null class is a valid id
    out_null = model(x0, xt, t, y_null, [4, 12], order)
    assert_changed(out, out_null)
    cond = model.embed_cond(y)
    assert cond.shape == (2, 6, model.cfg.hidden_size)


# ---- initialisation, parameter counts, patchify --------------------------------------------

@torch.no_grad()
def test_zero_initialised_head_predicts_zero():
    torch.manual_seed(0)
    model = CausalFusion(tiny_config())
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x0, xt, t, y, order = make_inputs(model)
    assert torch.count_nonzero(model(x0, xt, t, y, [6, 10], order)) == 0
    assert torch.count_nonzero(model.predict_one_step(xt[:, 0], t[:, 0, 0], y)) == 0
    # the rest is not zero: the hidden states carry signal
    h = model.final_norm(model.run_blocks(model.embed_cond(y)))
    assert h.abs().sum() > 0


def paper_cfg(preset: str, class_tokens: int) -> ModelConfig:
    return ModelConfig.from_preset(preset, image_size=32, in_channels=4, patch_size=2,
                                   num_classes=1000, class_tokens=class_tokens)


def test_parameter_count_L_matches_paper():
    n = count_parameters(paper_cfg("L", 64))
    assert abs(n - 368e6) / 368e6 < 0.02, n


def test_parameter_count_in_context_dit_L2():
    n = count_parameters(paper_cfg("L", 4))
    assert abs(n - 308e6) / 308e6 < 0.02, n
    # Tab. 8: 60 more class tokens cost (1001 class ids + 1 position) * 60 * 1024 more parameters
    assert count_parameters(paper_cfg("L", 64)) - n == 60 * (1001 + 1) * 1024


def test_count_parameters_matches_real_model():
    cfg = tiny_config(learn_pos=True)
    assert count_parameters(cfg) == sum(p.numel() for p in CausalFusion(cfg).parameters())


@pytest.mark.parametrize("patch, channels", [(1, 1), (1, 3), (2, 1), (2, 4)])
def test_patchify_roundtrip(patch, channels):
    model = CausalFusion(tiny_config(patch_size=patch, in_channels=channels))
    x = torch.randn(2, channels, 8, 8)
    tok = model.patchify(x)
    g = 8 // patch
    assert tok.shape == (2, g * g, patch * patch * channels)
    assert torch.equal(model.unpatchify(tok), x)
    # raster order: token r*g + c holds exactly the pixels of patch (r, c)
    r, c = g - 1, 1
    patch_pixels = x[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
    assert torch.equal(tok[:, r * g + c].sort(-1).values, patch_pixels.reshape(2, -1).sort(-1).values)


# ---- config ----------------------------------------------------------------------------------

def test_config_dict_roundtrip():
    cfg = ModelConfig.from_preset("S", image_size=16, in_channels=4, patch_size=2, class_tokens=8,
                                  class_repeat=2, learn_pos=True, qk_norm=False, mlp_ratio=3.0)
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    assert d["depth"] == 12 and d["hidden_size"] == 384
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**d, "dropout": 0.1})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ModelConfig(image_size=9, patch_size=2)
    with pytest.raises(ValueError):
        ModelConfig(hidden_size=100, num_heads=6)
    with pytest.raises(ValueError):
        ModelConfig.from_preset("XXL")
    with pytest.raises(ValueError, match="prediction type"):
        ModelConfig(prediction="x0")


def test_config_prediction_defaults_to_eps_for_older_checkpoints():
    d = ModelConfig(prediction="v").to_dict()
    assert ModelConfig.from_dict(d).prediction == "v"
    del d["prediction"]  # configs written before v-prediction existed
    assert ModelConfig.from_dict(d).prediction == "eps"


# ---- KV cache ------------------------------------------------------------------------------------

def _embed_sequence(model, x0, xt, t, y, order, groups):
    """Embedded training sequence pieces: condition, clean (AR order), noisy (AR order)."""
    cfg = model.cfg
    L = cfg.num_tokens
    idx = order[..., None].expand(-1, L, cfg.patch_dim)
    clean = torch.gather(model.patchify(x0), 1, idx)
    noisy = torch.gather(model.patchify(xt[:, 0]), 1, idx)
    return (model.embed_cond(y), model.embed_tokens(clean, order),
            model.embed_tokens(noisy, order, t[:, 0]))


@pytest.mark.parametrize("groups", [[5, 4, 7], [3, 13], [16]])
@torch.no_grad()
def test_kv_cache_matches_masked_sequence(groups):
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model, t_const=False)
    full = model(x0, xt, t, y, groups, order)[:, 0]  # [B, L, P]
    cond, clean, noisy = _embed_sequence(model, x0, xt, t, y, order, groups)
    C, L = model.cfg.num_cond, model.cfg.num_tokens
    # Step-by-step, no masks: condition, then each finished step's clean tokens, committed.
    cache = KVCache(model.cfg.depth, C + L)
    model.run_blocks(cond, cache=cache)
    cache.commit(C)
    for s in range(len(groups)):
        ss = step_slice(groups, s)
        for _ in range(2):  # the same noisy slots are overwritten at every diffusion step
            out = model.output(model.run_blocks(noisy[:, ss], cache=cache))
            assert_same(out, full[:, ss])
        assert cache.length == C + ss.start  # noisy tokens are never committed
        if s < len(groups) - 1:
            model.run_blocks(clean[:, ss], cache=cache)
            cache.commit(groups[s])


@torch.no_grad()
def test_kv_cache_slots_not_written_yet_hold_zeros():
    """The compiled runner reads every slot (masked): freed NaN memory reused by the cache must not show."""
    for _ in range(3):
        poison = torch.full((2, 2, 16, 8), float("nan"))
        del poison
        cache = KVCache(1, 16)
        k = torch.ones(2, 2, 3, 8)
        cache.write(0, k, k)
        assert torch.equal(cache.keys[0][:, :, 3:], torch.zeros(2, 2, 13, 8))
        assert torch.equal(cache.values[0][:, :, 3:], torch.zeros(2, 2, 13, 8))


def test_kv_cache_masked_prefix():
    """The whole prefix in one pass (with its part of the generalized mask), then the noisy tokens."""
    model = make_tiny_model()
    x0, xt, t, y, order = make_inputs(model)
    groups = [5, 4, 7]
    full = model(x0, xt, t, y, groups, order)[:, 0]
    cond, clean, noisy = _embed_sequence(model, x0, xt, t, y, order, groups)
    C = model.cfg.num_cond
    prefix = torch.cat([cond, clean[:, :9]], 1)
    mask = generalized_causal_mask(groups, C)[:C + 9, :C + 9]
    cache = KVCache(model.cfg.depth, C + 9 + 7)
    model.run_blocks(prefix, mask=mask, cache=cache)
    cache.commit(C + 9)
    out = model.output(model.run_blocks(noisy[:, 9:], cache=cache))
    assert_same(out, full[:, 9:])
    # without the cached prefix the answer is different (the cache is really used)
    empty = KVCache(model.cfg.depth, C + 16)
    model.run_blocks(cond, cache=empty)
    empty.commit(C)
    assert_changed(model.output(model.run_blocks(noisy[:, 9:], cache=empty)), full[:, 9:])


def test_kv_cache_overflow_and_batch_checks():
    cache = KVCache(1, 4)
    k = torch.zeros(2, 1, 3, 8)
    kk, vv = cache.write(0, k, k)
    assert kk.shape == (2, 1, 3, 8)
    cache.commit(3)
    with pytest.raises(ValueError):
        cache.write(0, k, k)  # 3 + 3 > 4
    with pytest.raises(ValueError):
        cache.commit(2)
    with pytest.raises(ValueError):
        cache.write(0, torch.zeros(3, 1, 1, 8), torch.zeros(3, 1, 1, 8))
    kk, _ = cache.write(0, torch.ones(2, 1, 1, 8), torch.ones(2, 1, 1, 8))
    assert kk.shape == (2, 1, 4, 8) and torch.equal(kk[:, :, 3], torch.ones(2, 1, 8))
    assert torch.equal(kk[:, :, :3], torch.zeros(2, 1, 3, 8))


def test_learnable_positions_get_the_same_gradient_every_time():
    """Each position's gradient sums over many samples, in a fixed order (indexing's backward summed in a
    thread-dependent order on CPU: learnable-position runs were not bit-reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = CausalFusion(tiny_config(learn_pos=True, image_size=16, hidden_size=64))
        pos = torch.stack([torch.randperm(model.cfg.num_tokens) for _ in range(256)])
        tokens = torch.randn(256, model.cfg.num_tokens, model.cfg.patch_dim)
        grads = []
        for _ in range(6):
            model.zero_grad()
            model.embed_tokens(tokens, pos).pow(2).sum().backward()
            grads.append(model.pos_embed.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.set_num_threads(threads)
