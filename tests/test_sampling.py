"""Next-token(s) diffusion sampling: the KV cache against the uncached reference, S=1 against the
one-step sampler, determinism across batch sizes, CFG interval, DDIM, refusals, GIF and CLI.

The equality tests need samples of a sane size: with a random head the DDPM trajectory explodes
(x0 = x_t / sqrt(ā_t) with ā_t ~ 4e-5 at t=999) and fp32 round-off scales with it. So the model
here is a depth-2, 32-wide CausalFusion fitted for a few seconds to a toy 5-class data set (with
the real objective and AR plan); its samples stay O(1) and the 1e-4 tolerance is meaningful.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from causalfusion import sampling, sampling_runners
from causalfusion.ar_plan import ARPlanConfig
from causalfusion.cli import main
from causalfusion.diffusion import Diffusion
from causalfusion.generation_path import GenerationPath
from causalfusion.kv_cache import KVCache
from causalfusion.models import CausalFusion
from causalfusion.objective import causalfusion_loss, drop_labels
from causalfusion.one_step_sampler import sample_one_step
from causalfusion.sampling import class_condition, resolve_groups, resolve_order, sample
from causalfusion.sampling_runners import Condition
from conftest import save_run, tiny_config

TOL = 1e-4
L = 16  # 8x8 images, patch 2
ORDER_CASES = ["random", "raster", "block", "dilated", [int(v) for v in torch.randperm(L, generator=torch.Generator().manual_seed(5))]]


def fit_toy(prediction: str = "eps", iters: int = 300) -> tuple[CausalFusion, torch.Tensor]:
    """A depth-2 model fitted to 5 noisy class prototypes -> (model in eval mode, prototypes [5, 1, 8, 8])."""
    torch.manual_seed(0)
    m = CausalFusion(tiny_config(in_channels=1, prediction=prediction)).train()
    g = torch.Generator().manual_seed(0)
    k = m.cfg.num_classes
    protos = torch.randn(k, 1, 8, 8, generator=g).clamp(-1, 1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    diffusion, plan = Diffusion(prediction=prediction), ARPlanConfig(gamma=0.9)
    for _ in range(iters):
        y = torch.randint(0, k, (16,), generator=g)
        x0 = (protos[y] + 0.1 * torch.randn(16, 1, 8, 8, generator=g)).clamp(-1, 1)
        loss, _ = causalfusion_loss(m, diffusion, x0, drop_labels(y, 0.1, k, g), plan, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), protos


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and kinder to a shared machine
    yield fit_toy()[0]
    torch.set_num_threads(threads)


LABELS = torch.tensor([0, 1, 3, 4])


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# ---- the KV cache is exact ---------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDER_CASES, ids=["random", "raster", "block", "dilated", "explicit"])
@pytest.mark.parametrize("S", [1, 2, 4, L])
def test_cache_matches_uncached_reference(model, S, order):
    kw = dict(ar_steps=S, order=order, steps=20, seed=1)
    a = sample(model, LABELS, **kw)
    b = sample(model, LABELS, cache=False, **kw)
    assert a.shape == (4, 1, 8, 8) and torch.isfinite(a).all()
    assert a.abs().max() < 20  # sane samples: the tolerance means something
    assert max_diff(a, b) <= TOL


@pytest.mark.parametrize("kw", [
    dict(groups=[3, 5, 8], cfg=2.0, cfg_interval=(0, 600)),
    dict(ar_steps=4, sampler="ddim", eta=0.0, cfg=1.5),
    dict(ar_steps=4, sampler="ddim", eta=0.7, steps=[12, 6, 4, 3]),
    dict(groups=[1, 14, 1], order="dilated", cfg=3.0, cfg_interval=(300, 1000)),
], ids=["groups-cfg-interval", "ddim", "ddim-eta-schedule", "uneven-cfg"])
def test_cache_matches_uncached_with_cfg_ddim_schedules(model, kw):
    kw = {"steps": 12, "seed": 2, **kw}
    a = sample(model, LABELS, **kw)
    # relative to the sample size: deterministic DDIM drives this toy model's samples far out of
    # range (|x| ~ 90), and fp32 round-off grows with them
    assert max_diff(a, sample(model, LABELS, cache=False, **kw)) <= TOL * max(1.0, float(a.abs().max()))


@torch.no_grad()
def test_cache_processes_only_the_current_group_and_is_preallocated(model, monkeypatch):
    seen, ptrs = [], set()

    class Spy(KVCache):
        def write(self, layer, k, v):
            out = super().write(layer, k, v)
            ptrs.add((layer, self.keys[layer].data_ptr(), self.keys[layer].shape))
            return out

    monkeypatch.setattr(sampling_runners, "KVCache", Spy)
    hook = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        sample(model, LABELS, ar_steps=4, steps=5, cfg=2.0)
    finally:
        hook.remove()
    c = model.cfg.num_cond
    assert seen[0] == c and set(seen[1:]) == {4}  # condition once, then only 4-token groups
    assert len(seen) == 1 + 4 * 5 + 3  # 20 diffusion steps + 3 commits (the last group is never cached)
    # one buffer per layer for the whole run, sized for C + L, twice the batch for CFG
    assert len(ptrs) == model.cfg.depth
    assert {shape for _, _, shape in ptrs} == {(8, model.cfg.num_heads, c + L, model.cfg.hidden_size // model.cfg.num_heads)}


# ---- the condition contract --------------------------------------------------------------------
def _condition(model, causal: bool, visible, other_null: bool = False) -> Condition:
    """LABELS' class tokens + null-class rows, as a Condition; ``other_null``: the null rows get other tokens."""
    tokens = class_condition(model, LABELS, null_rows=True).tokens
    if other_null:
        tokens = torch.cat([tokens[:4], torch.randn(tokens[4:].shape, generator=torch.Generator().manual_seed(9))])
    return Condition(tokens, causal=causal, visible=visible)


@pytest.mark.parametrize("causal", [False, True])
def test_condition_cache_matches_uncached_and_blind_rows_ignore_their_tokens(model, causal):
    """The runners build every mask from the Condition: cached = uncached for causal condition tokens
    and rows that may not see them; such rows' images do not depend on their condition tokens (cfg 0
    keeps only them), while rows that see the tokens do."""
    blind = torch.tensor([True] * 4 + [False] * 4)
    kw = dict(groups=[3, 5, 8], steps=6, seed=3)
    for cfg, interval in ((2.0, (0, 600)), (0.0, (0, 1000))):
        a = sample(model, _condition(model, causal, blind), cfg=cfg, cfg_interval=interval, **kw)
        b = sample(model, _condition(model, causal, blind), cfg=cfg, cfg_interval=interval, cache=False, **kw)
        assert max_diff(a, b) <= TOL * max(1.0, float(a.abs().max()))
    for cache in (True, False):
        kw0 = dict(cfg=0.0, cache=cache, **kw)
        ref = sample(model, _condition(model, causal, blind), **kw0)
        assert max_diff(ref, sample(model, _condition(model, causal, blind, other_null=True), **kw0)) <= 1e-6
        seen = sample(model, _condition(model, causal, None), **kw0)
        assert max_diff(seen, sample(model, _condition(model, causal, None, other_null=True), **kw0)) > 1e-2


def test_condition_causal_flag_and_class_path(model):
    """``causal`` changes what the condition tokens see (so the images); ``sample`` with
    class ids is ``sample`` with their class condition; a malformed condition (width, shape, visible rows,
    an odd row count under CFG) is refused in one line."""
    kw = dict(ar_steps=2, steps=4, seed=1, cfg=2.0)
    full = sample(model, _condition(model, False, None), **kw)
    assert torch.equal(full, sample(model, LABELS, **kw))
    assert max_diff(full, sample(model, _condition(model, True, None), **kw)) > 1e-3
    with pytest.raises(ValueError, match="wide, the model"):
        sample(model, Condition(torch.zeros(4, 2, model.cfg.hidden_size + 1)), **kw)
    with pytest.raises(ValueError, match=r"\[rows, C, D\]"):
        Condition(torch.zeros(4, model.cfg.hidden_size))
    with pytest.raises(ValueError, match="visible rows must be bool"):
        Condition(torch.zeros(4, 2, model.cfg.hidden_size), visible=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2B condition rows"):
        sample(model, Condition(class_condition(model, LABELS[:3], null_rows=False).tokens), **kw)


# ---- S=1 is the one-step sampler ---------------------------------------------------------------
@pytest.mark.parametrize("cfg, interval", [(1.0, (0, 1000)), (2.5, (0, 700))])
@pytest.mark.parametrize("order", ["random", "raster"])
def test_s1_equals_one_step_sampler(model, cfg, interval, order):
    ref = sample_one_step(model, LABELS, steps=8, cfg=cfg, cfg_interval=interval, seed=4, first_index=3)
    for cache in (True, False):
        out = sample(model, LABELS, ar_steps=1, order=order, steps=8, cfg=cfg, cfg_interval=interval,
                     seed=4, first_index=3, cache=cache)
        assert max_diff(out, ref) <= TOL


def test_sampler_follows_the_models_prediction_type():
    """A v model samples near its class prototypes with every S, cached or not; read as an eps
    model (the wrong conversion) the same weights give samples far from them."""
    m, protos = fit_toy("v", iters=400)
    labels = torch.tensor([0, 1, 2, 3, 4])

    def nearest_ok(x):
        d = ((x[:, None] - protos[None]) ** 2).flatten(2).mean(-1)  # [B, K]
        return float((d.argmin(1) == labels).float().mean()), float(d[torch.arange(5), labels].mean())

    for S in (1, 4):
        a = sample(m, labels, ar_steps=S, steps=20, seed=0)
        assert max_diff(a, sample(m, labels, ar_steps=S, steps=20, seed=0, cache=False)) <= TOL
        hit, dist = nearest_ok(a)
        assert hit == 1.0 and dist < 0.3, (S, hit, dist)  # other prototypes are ~1.0 away
    m.cfg.prediction = "eps"
    _, wrong = nearest_ok(sample(m, labels, steps=20, seed=0))
    assert wrong > 1.0


# ---- determinism -------------------------------------------------------------------------------
def test_deterministic_whatever_the_batch_size(model):
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    kw = dict(ar_steps=4, order="random", steps=5, cfg=2.0, cfg_interval=(0, 700), seed=7)
    whole = sample(model, labels, **kw)
    assert torch.equal(whole, sample(model, labels, **kw))
    parts = torch.cat([sample(model, labels[:1], first_index=0, **kw),
                       sample(model, labels[1:4], first_index=1, **kw),
                       sample(model, labels[4:], first_index=4, **kw)])
    assert max_diff(whole, parts) <= TOL
    assert max_diff(whole, sample(model, labels, **{**kw, "seed": 8})) > 1e-2


def test_random_orders_are_per_sample():
    grid = (4, 4)
    gens = lambda idx: sampling.order_generators(3, idx)  # noqa: E731
    full = resolve_order("random", 5, grid, gens(range(5)))
    assert torch.equal(full[2:4], resolve_order("random", 2, grid, gens(range(2, 4))))
    assert not torch.equal(full[0], full[1])
    assert all(sorted(o.tolist()) == list(range(16)) for o in full)
    # the order stream is not the noise stream of any sample
    assert not torch.equal(full[0], torch.randperm(16, generator=sampling.sample_generators(3, [0])[0]))


def test_orders_change_the_samples_for_s_above_1(model):
    kw = dict(ar_steps=4, steps=5, seed=1)
    assert max_diff(sample(model, LABELS, order="raster", **kw), sample(model, LABELS, order="dilated", **kw)) > 1e-3


# ---- CFG interval ------------------------------------------------------------------------------
def test_cfg_interval_selects_the_guided_steps(model):
    kw = dict(ar_steps=2, steps=6, seed=3)
    plain = sample(model, LABELS, **kw)
    # an empty interval never guides: same as no guidance, although the null rows are cached
    assert max_diff(sample(model, LABELS, cfg=4.0, cfg_interval=(500, 500), **kw), plain) <= TOL
    guided = sample(model, LABELS, cfg=4.0, **kw)
    part = sample(model, LABELS, cfg=4.0, cfg_interval=(0, 500), **kw)
    assert max_diff(guided, plain) > 1e-2 and max_diff(part, plain) > 1e-3 and max_diff(part, guided) > 1e-3


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(groups=[4, 4, 4]), "sum to 12, not the 16 tokens"),
    (dict(groups=[8, 0, 8]), "positive integers"),
    (dict(ar_steps=0), "must be in 1..16"),
    (dict(ar_steps=17), "must be in 1..16"),
    (dict(ar_steps=2, groups=[8, 8]), "not both"),
    (dict(order=[0] * 16), "not a permutation"),
    (dict(order=list(range(15))), "permutation of 0..15"),
    (dict(order=list(range(1, 17))), "not a permutation"),
    (dict(order="spiral"), "unknown token order"),
    (dict(cfg=2.0, cfg_interval=(-1, 500)), "CFG interval"),
    (dict(cfg=2.0, cfg_interval=(0, 1001)), "CFG interval"),
    (dict(cfg=2.0, cfg_interval=(700, 600)), "CFG interval"),
    (dict(ar_steps=2, steps=[5, 5, 5]), "3 diffusion step counts for 2 AR steps"),
    (dict(steps=0), "in 1..1000"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(sampler="ddim", eta=-0.1), "eta"),
])
def test_bad_arguments_are_refused_with_one_line(model, kw, needle):
    with pytest.raises(ValueError) as e:
        sample(model, LABELS, **{"steps": 2, **kw})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_no_labels_give_no_images(model):
    """An empty batch is an empty result in image shape."""
    for kw in (dict(), dict(cfg=2.0, ar_steps=4), dict(order="raster")):
        out = sample(model, torch.empty(0, dtype=torch.long), steps=2, **kw)
        assert out.shape == (0, model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)


def test_bf16_sampling_runs_the_model_in_bf16_close_to_fp32(model, monkeypatch):
    kw = dict(ar_steps=4, steps=20, cfg=2.0, seed=1)  # (at 4 steps the toy's samples reach |x| ~ 65)
    ref = sample(model, LABELS, **kw)
    dtypes = []
    real = type(model).output

    def spy(self, h):
        out = real(self, h)
        dtypes.append(out.dtype)  # the head's matmul ran in bf16
        return out

    monkeypatch.setattr(type(model), "output", spy)
    low = sample(model, LABELS, precision="bf16", **kw)
    assert set(dtypes) == {torch.bfloat16} and low.dtype == torch.float32  # the sampler's state stays fp32
    assert 0 < max_diff(low, ref) < 0.05 * ref.abs().max()  # bf16 rounding, not another sample
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        sample(model, LABELS, precision="fp16", **kw)


def test_steps_per_ar_step_from_a_list_an_array_or_a_tensor():
    import numpy as np

    from causalfusion.sampling import resolve_steps

    for steps in ([10, 5], (10, 5), np.array([10, 5]), torch.tensor([10, 5])):
        assert resolve_steps(steps, 2) == [10, 5], type(steps)
    assert resolve_steps(np.int64(7), 3) == resolve_steps(torch.tensor(7), 3) == [7, 7, 7]


def test_resolve_groups_defaults():
    assert resolve_groups(16) == [16]
    assert resolve_groups(16, 4) == [4, 4, 4, 4]
    assert resolve_groups(16, 3) == [6, 5, 5]
    assert resolve_groups(16, groups=[1, 15]) == [1, 15]


# ---- generation path GIF and the CLI ------------------------------------------------------------
def test_generation_path_gif(model, tmp_path):
    path = GenerationPath(frames_per_ar_step=3)
    images = sample(model, LABELS, ar_steps=4, steps=5, path=path)
    assert len(path.frames) == 4 * 3
    # frame 0: the first group appears, the other 12 tokens (48 pixels per sample) are pending
    assert int(path.frames[0][1].sum()) == 4 * 48 and int(path.frames[-1][1].sum()) == 0
    assert torch.equal(path.final, images)
    gif = path.save_gif(tmp_path / "path.gif")
    with Image.open(gif) as im:
        # + the final images, held (Pillow merges it into the last frame when they are the same picture)
        assert im.n_frames in (4 * 3, 4 * 3 + 1) and im.size[0] > 16


def test_generation_path_caps_the_frames_for_large_s():
    path = GenerationPath(frames_per_ar_step=8, max_frames=4)
    kept = [(s, i) for s in range(16) for i in range(10) if path.wants(s, 16, i, 10)]
    assert kept == [(3, 0), (7, 0), (11, 0), (15, 0)]
    path = GenerationPath(frames_per_ar_step=8, max_frames=16)
    assert sum(path.wants(s, 4, i, 10) for s in range(4) for i in range(10)) == 16  # 4 per AR step


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    return save_run(model, tmp_path_factory.mktemp("run"))


def test_cli_sample_ar_steps_gif_npz(run_dir, tmp_path, capsys):
    png, npz, gif = tmp_path / "g.png", tmp_path / "s.npz", tmp_path / "p.gif"
    argv = ["sample", "--ckpt", str(run_dir), "--n", "6", "--batch-size", "4", "--class", "1,2", "--sample-steps", "4",
            "--ar-steps", "4", "--order", "dilated", "--cfg", "1.5", "--cfg-interval", "0,700",
            "--out", str(png), "--npz", str(npz), "--path-gif", str(gif)]
    assert main(argv) == 0
    assert png.exists() and npz.exists() and gif.exists()
    assert "S=4 AR steps (groups 4,4,4,4)" in capsys.readouterr().out
    assert main(argv[:-6] + ["--no-cache", "--sampler", "ddim", "--groups", "2,6,8", "--ar-steps", "3",
                             "--out", str(png)]) == 2  # --groups and --ar-steps together


@pytest.mark.parametrize("extra, needle", [
    (["--groups", "4,4"], "sum to 8"),
    (["--ar-steps", "17"], "must be in 1..16"),
    (["--permutation", "0,1,2"], "permutation"),
    (["--order", "zigzag"], "invalid choice: 'zigzag'"),
    (["--cfg", "2", "--cfg-interval", "0,1200"], "CFG interval"),
    (["--cfg-interval", "7"], "--cfg-interval expects LO,HI"),
    (["--sample-steps", "10,x"], "--sample-steps expects comma-separated integers"),
    (["--sampler", "heun"], "invalid choice: 'heun'"),
    (["--steps", "10"], "diffusion steps per AR step are --sample-steps"),
    (["--uncond", "--check-digits"], "--check-digits"),
])
def test_cli_bad_sampling_input_is_one_line(run_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "x.png"
    try:
        rc = main(["sample", "--ckpt", str(run_dir), "--n", "2", "--sample-steps", "2", "--out", str(out), *extra])
    except SystemExit as e:  # refused by the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_guidance_formula_and_interval_bounds():
    """guided = uncond + s (cond - uncond), only for t in [lo, hi): a stub model outputs 1 for a class
    and 0 for the null class, so the guided value is s inside the interval and 1 outside."""
    from causalfusion.one_step_sampler import guided_eps

    def stub(x, t, y):
        return (y != 10).float()[:, None].expand_as(x)

    x, y = torch.zeros(2, 3), torch.tensor([4, 7])
    for t, want in ((499, 1.0), (500, 3.0), (599, 3.0), (600, 1.0)):
        assert torch.equal(guided_eps(stub, x, t, y, 10, 3.0, (500, 600)), torch.full((2, 3), want)), t


def test_generation_path_shows_samples_spread_over_the_batch():
    path = GenerationPath(max_images=2)
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    path.add(images, torch.zeros(5, 1, 2, 2, dtype=torch.bool), 0, 1, 0)
    assert path.frames[0][0][:, 0, 0, 0].tolist() == [0.0, 4.0]  # the first and the last, not the first two


def test_a_numpy_integer_seed_samples_as_the_same_python_int():
    """check_seed takes numpy integers (a seed read from an array, say); the random token order's
    generators took them to torch unconverted ("an integer is required")."""
    import numpy as np

    torch.manual_seed(0)
    model = CausalFusion(tiny_config(in_channels=1)).eval()
    kw = dict(ar_steps=2, steps=2, order="random")
    want = sampling.sample(model, torch.tensor([0, 1]), seed=7, **kw)
    assert torch.equal(sampling.sample(model, torch.tensor([0, 1]), seed=np.int64(7), **kw), want)
