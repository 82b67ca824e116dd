"""FLOP counting of sampling runs: the CPU attention formula, the affine-in-T extrapolation, and
the work ratios the sampling docs argue from (cache: S=4 does S=1's linear work; no cache: the
linear work grows as C/g + (S+1)/2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from causalfusion.flop_count import count_flops, sampling_flops
from causalfusion.sampling import sample
from conftest import make_tiny_model

LABELS = torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(in_channels=1).eval()  # 8x8 images, patch 2: L = 16 tokens


def test_linear_and_attention_counts_match_their_formulas():
    lin = torch.nn.Linear(24, 40, bias=False)
    x = torch.randn(5, 7, 24)
    assert count_flops(lambda: lin(x)) == {"attention": 0, "linear": 2 * 35 * 24 * 40, "total": 2 * 35 * 24 * 40}
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = torch.ones(6, 10, dtype=torch.bool).tril(4)
    got = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert got["attention"] == 2 * 2 * (2 * 3 * 6 * 10 * 8) and got["linear"] == 0  # QKᵀ and PV, dense


def test_extrapolation_in_t_equals_a_direct_count(model):
    kw = dict(ar_steps=4, order="raster", cfg=2.0)
    with torch.no_grad():
        direct = count_flops(lambda: sample(model, LABELS, steps=3, **kw))
    assert sampling_flops(model, LABELS, 3, **kw) == direct


def test_cache_gives_s4_the_linear_work_of_s1_and_no_cache_the_prefix_ratio(model):
    @torch.no_grad()
    def per_step(**kw):  # the work of one more diffusion step per AR step
        f1, f2 = (count_flops(lambda t=t: sample(model, LABELS, steps=t, **kw)) for t in (1, 2))
        return {k: f2[k] - f1[k] for k in f1}

    s1, s4, s4_ref = per_step(ar_steps=1), per_step(ar_steps=4), per_step(ar_steps=4, cache=False)
    # every step runs only its group (4 x L/4 tokens = L tokens); only the timestep embedding, one per
    # row and model call, is paid 4 times instead of once
    temb = count_flops(lambda: model.t_embedder(torch.zeros(len(LABELS), 1)))["linear"]
    assert s4["linear"] == s1["linear"] + 3 * temb
    assert s4["attention"] < s1["attention"]  # ...and attends to the prefix, not to all L tokens
    c, g, S = model.cfg.num_cond, model.cfg.num_tokens // 4, 4
    blocks_ratio = c / g + (S + 1) / 2  # the transformer blocks see C + s*g tokens instead of g
    ratio = s4_ref["linear"] / s4["linear"]
    assert 0.9 * blocks_ratio < ratio <= blocks_ratio  # head and t-embedder run on g tokens either way


@pytest.mark.parametrize("steps, kw, needle", [(10, dict(cfg=2.0, cfg_interval=(0, 700)), "full CFG interval"),
                                               ([5, 3], dict(ar_steps=2), "one diffusion step count"),
                                               (0, {}, "one diffusion step count")])
def test_unsupported_arguments_are_refused(model, steps, kw, needle):
    with pytest.raises(ValueError, match=needle):
        sampling_flops(model, LABELS, steps, **kw)
