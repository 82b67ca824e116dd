"""Padding the clean prefix to a bucket changes no output and bounds the shapes of a random-S run."""
from __future__ import annotations

import torch

from causalfusion.ar_plan import random_group_sizes
from causalfusion.masks import generalized_causal_mask
from causalfusion.models import CausalFusion, ModelConfig, num_tokens_before_last
from causalfusion.shape_buckets import (BucketedForward, padded_causal_mask, padded_clean_length,
                                        training_graph_count)

TINY = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            class_tokens=2)


def test_padded_mask_leaves_every_real_row_as_it_was():
    sizes, num_cond, copies = [3, 2, 4], 2, 2
    n_clean = num_tokens_before_last(sizes)
    plain = generalized_causal_mask(sizes, num_cond, copies)
    padded = padded_causal_mask(sizes, num_cond, copies, n_pad=8)
    n0, p = num_cond + n_clean, 8 - n_clean
    real = torch.cat([torch.arange(n0), torch.arange(n0 + p, padded.shape[0])])
    assert torch.equal(padded[real][:, real], plain)
    assert not padded[:, n0:n0 + p].any()  # nobody sees a padding token
    assert padded[n0:n0 + p].any(1).all()  # and no padding row is empty (NaN)


def test_clean_prefix_buckets_bound_the_shapes():
    assert [padded_clean_length(n, 256, 32) for n in (0, 1, 32, 33, 255)] == [0, 32, 32, 64, 256]
    assert training_graph_count(256, 32) == 9 and training_graph_count(16, 32) == 2
    g = torch.Generator().manual_seed(0)
    pads = {padded_clean_length(num_tokens_before_last(random_group_sizes(256, s, g)), 256, 32)
            for s in range(1, 257)}
    assert len(pads) <= training_graph_count(256, 32)


def test_bucketed_forward_and_gradients_equal_the_plain_ones_with_few_shapes():
    """fp32, every S from 1 to L once: outputs and parameter gradients as without padding."""
    torch.manual_seed(0)
    model = CausalFusion(ModelConfig(**TINY))
    run = BucketedForward(model, clean_bucket=4)
    b, num_tokens = 2, model.cfg.num_tokens
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 1, 8, 8, generator=g)
    for s in range(1, num_tokens + 1):
        sizes = random_group_sizes(num_tokens, s, g)
        args = (x0, torch.randn(b, 2, 1, 8, 8, generator=g), torch.randint(0, 1000, (b, 2, num_tokens), generator=g),
                torch.tensor([1, 2]), sizes, torch.randperm(num_tokens, generator=g))
        grads = []
        for fn in (run, model):
            model.zero_grad()
            out = fn(*args)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
        for a, c in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    pads = {shape[0] for shape in run.shapes_seen}
    assert pads <= {0, 4, 8, 12, 16} and len(pads) > 2  # multiples of the bucket only, S=1 (0) included
