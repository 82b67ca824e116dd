"""The compiled path (``--compile``) computes what the eager one does, with a bounded number of graphs."""
from __future__ import annotations

import pytest
import torch

from causalfusion.ar_plan import ARPlanConfig, random_group_sizes
from causalfusion.compiling import CompiledForward, bf16_linear_copy
from causalfusion.shape_buckets import padded_clean_length, training_graph_count
from causalfusion.models import CausalFusion, ModelConfig, num_tokens_before_last
from causalfusion.sampling import class_condition, sample
from causalfusion.sampling_runners import Condition
from causalfusion.trainer import TrainConfig, Trainer

from conftest import make_tiny_model

# one block keeps the compile time of the inductor graphs in the test budget
TINY = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10,
            class_tokens=2)


def test_training_losses_of_20_compiled_steps_match_eager(tmp_path):
    """fp32, S=2 equal groups: 8 clean tokens padded to 16 (the bucket), so padding is exercised."""
    losses = {}
    for compiled in (False, True):
        cfg = TrainConfig(out=str(tmp_path / str(compiled)), steps=20, batch_size=8, lr=1e-3, warmup=2,
                          sample_every=0, progress=False)
        trainer = Trainer(ModelConfig(**TINY), ARPlanConfig(fixed_steps=2), cfg, compile=compiled)
        losses[compiled] = torch.tensor([trainer.train_step()["loss"] for _ in range(20)])
    assert losses[True][-1] < losses[True][0]  # it trains
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=0)


def test_compiled_sampling_matches_eager():
    """fp32, S=2 (a masked static-layout cache call, a commit, and a full one) with guidance; the
    compiled calls attend over unfilled cache slots too (masked), so those must not hold NaN."""
    model = make_tiny_model(depth=1)
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(ar_steps=2, steps=3, cfg=2.0, seed=1)
    eager = sample(model, labels, **kw)
    c = model.cfg
    poison = torch.full((2 * len(labels), c.num_heads, c.num_cond + c.num_tokens, c.hidden_size // c.num_heads), float("nan"))
    del poison  # freed memory full of NaN, which the cache's allocation is likely to reuse
    compiled = sample(model, labels, compile=True, **kw)
    assert not torch.equal(eager, sample(model, labels, **{**kw, "seed": 2}))  # the tolerance is tight enough
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))
    with pytest.raises(ValueError, match="KV cache"):
        sample(model, labels, compile=True, cache=False, **kw)


def test_compiled_sampling_with_rows_blind_to_the_condition_matches_eager():
    """Rows that may not see the condition (the null rows of a multimodal CFG) get a mask in the
    compiled calls too, over a prefix whose length changes from call to call."""
    model = make_tiny_model(depth=1)
    tokens = class_condition(model, torch.tensor([0, 1]), null_rows=True).tokens
    tokens[2:] = torch.randn(tokens[2:].shape, generator=torch.Generator().manual_seed(9))  # tokens the blind rows must not see
    visible = torch.tensor([True, True, False, False])
    kw = dict(groups=[4, 12], steps=2, cfg=0.0, seed=3)  # cfg 0: the images are the blind rows' predictions
    eager = sample(model, Condition(tokens, visible=visible), **kw)
    compiled = sample(model, Condition(tokens, visible=visible), compile=True, **kw)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_compiled_sampling_follows_weight_changes_and_stays_per_model(precision, tol):
    """A second model of the same shape, and the same model after an in-place update (as in-loop
    sampling sees), must each sample what eager samples; bf16 runs on a cached bf16 copy of the
    weights, which must be remade when they change."""
    a, b = make_tiny_model(depth=1, seed=0), make_tiny_model(depth=1, seed=1)
    labels, kw = torch.tensor([0, 1]), dict(ar_steps=2, steps=2, seed=3, precision=precision)

    def check(model):
        eager = sample(model, labels, **kw)
        torch.testing.assert_close(sample(model, labels, compile=True, **kw), eager,
                                   rtol=tol, atol=tol * float(eager.abs().max()))
        return eager

    first = check(a)
    assert not torch.allclose(check(b), first, atol=0.2 * float(first.abs().max()))  # far apart
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(0.5)  # as an optimizer or EMA step would: same tensors, new values
    assert not torch.allclose(check(a), first, atol=0.2 * float(first.abs().max()))


def test_bf16_linear_copy_computes_exactly_what_autocast_computes():
    model = make_tiny_model(depth=2)
    copy = bf16_linear_copy(model)
    assert copy is bf16_linear_copy(model)  # made once per model and weights
    assert {p.dtype for p in copy.parameters()} == {torch.float32, torch.bfloat16}  # LayerNorms stay fp32
    c = model.cfg
    tokens, pos, t = torch.randn(2, c.num_tokens, c.patch_dim), torch.arange(c.num_tokens).expand(2, -1), torch.tensor([[5], [700]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = [m.output(m.run_blocks(m.embed_tokens(tokens, pos, t), None, None)) for m in (model, copy)]
    assert torch.equal(out[0], out[1])


def test_compiled_sampling_needs_few_graphs_across_ar_steps():
    """One graph serves every prefix length: S=1, 2, 4 and 8 in one process need at most 4
    (S=1's denoise; then denoise and commit, each recompiled once when the group size changes)."""
    model = make_tiny_model(depth=1)
    for guidance in (dict(), dict(cfg=2.0, cfg_interval=(0, 500))):  # the interval changes the row count
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for s in (1, 2, 4, 8):
            sample(model, torch.tensor([0, 1]), ar_steps=s, steps=4, compile=True, **guidance)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_random_s_run_compiles_at_most_the_bucket_count():
    """Dynamo's graph count (the cheap 'eager' backend: the bucketing, not inductor, is under test)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs of earlier tests
    model = CausalFusion(ModelConfig(**TINY))
    run = CompiledForward(model, clean_bucket=4, backend="eager")
    b, num_tokens = 2, model.cfg.num_tokens
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 1, 8, 8, generator=g)
    seen = set()
    for s in range(1, num_tokens + 1):
        sizes = random_group_sizes(num_tokens, s, g)
        seen.add(padded_clean_length(num_tokens_before_last(sizes), num_tokens, 4))
        t = torch.randint(0, 1000, (b, 1, 1), generator=g).expand(b, 1, num_tokens)
        args = (x0, torch.randn(b, 1, 1, 8, 8, generator=g), t, torch.tensor([1, 2]), sizes,
                torch.randperm(num_tokens, generator=g))
        torch.testing.assert_close(run(*args), model(*args), rtol=1e-5, atol=1e-5)  # padding changes nothing
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(seen) > 1 and frames <= training_graph_count(num_tokens, 4) == 5


def test_compiled_edit_matches_eager_and_keeps_the_visible_tokens():
    """An edit's known tokens are the first AR step: the compiled cache gets them as its prefix."""
    from causalfusion.editing import edit

    model = make_tiny_model(depth=1)
    image = torch.rand(1, model.cfg.in_channels, 8, 8) * 2 - 1
    kw = dict(n=2, ar_steps=2, steps=3, cfg=2.0, seed=1)
    eager = edit(model, image, "top", 3, **kw)
    compiled = edit(model, image, "top", 3, compile=True, **kw)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))
    assert torch.equal(compiled[:, :, 4:], image.expand(2, -1, -1, -1)[:, :, 4:])  # bottom half kept as given


def test_train_compile_reaches_the_trainer_and_is_refused_where_it_does_not_apply(tmp_path):
    from causalfusion.distributed import ScaleConfig, make_trainer

    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=4, sample_every=0, progress=False)
    trainer = make_trainer(ModelConfig(**TINY), ARPlanConfig(), cfg, None, compile=True)
    assert trainer.compile and type(trainer) is Trainer
    with pytest.raises(ValueError, match="--compile trains in one process"):
        make_trainer(ModelConfig(**TINY), ARPlanConfig(), TrainConfig(out=str(tmp_path / "b"), steps=1),
                     None, scale=ScaleConfig(grad_accum=2), compile=True)
    assert not (tmp_path / "b").exists()
