"""Training: overfitting, exact resume, EMA/lr rules, data, bad inputs at the API level."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.checkpoint import CheckpointError, load_model, part_path, read_state
from causalfusion.data import BatchStream, load_dataset, load_digits_split
from causalfusion.diffusion import Diffusion
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.objective import causalfusion_loss, drop_labels
from causalfusion.trainer import TrainConfig, Trainer


def digits_model(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                                 num_heads=4, num_classes=10, class_tokens=2), **kw})


def small_train(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), steps=6, batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9,
                                 log_every=1, ckpt_every=3, sample_every=0, progress=False), **kw})


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = CausalFusion(digits_model(hidden_size=64))
    x0, y = load_digits_split("train")
    x0, y = x0[:4], y[:4]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    diffusion, plan = Diffusion(), ARPlanConfig(gamma=0.9)
    losses = []
    for _ in range(150):
        # the same plan, t and noise every step: a memorisable target
        loss, _ = causalfusion_loss(model, diffusion, x0, y, plan, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_resume_is_bit_identical(tmp_path):
    straight = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a"))
    straight.train()
    half = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b", steps=3))
    half.train()
    resumed = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b"), resume=True)
    assert resumed.step == 3
    resumed.train()
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(p, q)
    log_a = (tmp_path / "a" / "log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.csv").read_text().splitlines()
    loss = lambda lines: [line.split(",")[1] for line in lines[1:]]  # noqa: E731
    assert loss(log_a) == loss(log_b) and len(log_a) == 7



def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    """A run killed between checkpoints logged steps it must train again: they are not logged twice."""
    straight = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a"))
    straight.train()
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b", steps=3)).train()
    log = tmp_path / "b" / "log.csv"
    log.write_text(log.read_text() + "4,9.999999,1.0,1.000e-03,1,1.00\n")  # logged, never checkpointed
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b"), resume=True).train()
    step_loss = lambda p: [ln.split(",")[:2] for ln in p.read_text().splitlines()]  # noqa: E731 (it/s differs)
    assert step_loss(log) == step_loss(tmp_path / "a" / "log.csv")


def test_resume_refuses_other_model_or_plan_config(tmp_path):
    Trainer(digits_model(), ARPlanConfig(order="raster"), small_train(tmp_path, steps=3)).train()
    with pytest.raises(CheckpointError, match="model config differs"):
        Trainer(digits_model(hidden_size=64), ARPlanConfig(order="raster"), small_train(tmp_path), resume=True)
    with pytest.raises(CheckpointError, match=r"plan config differs .*'order': \('raster', 'random'\)"):
        Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path), resume=True)


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3)).train()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path))
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}


def test_checkpoint_loads_ema_and_detects_corruption(tmp_path):
    tr = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3))
    tr.train()
    model = load_model(tmp_path)
    for p, q in zip(model.parameters(), tr.ema.parameters()):
        assert torch.equal(p, q)
    ema = part_path(tmp_path, read_state(tmp_path), "ema")
    data = ema.read_bytes()
    ema.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)
    ema.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path)


def test_torn_checkpoint_is_detected(tmp_path):
    tr = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3))
    tr.train()
    state = json.loads((tmp_path / "state.json").read_text())
    state["step"] = 99
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="torn"):
        load_model(tmp_path)


def test_nan_loss_stops_without_saving(tmp_path):
    ds = load_dataset("digits")
    ds.images = ds.images.clone()
    ds.images[:] = float("nan")
    tr = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path), dataset=ds)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        tr.train()
    assert not (tmp_path / "state.json").exists()


def test_fp16_is_refused_on_every_device(tmp_path):
    """fp16 would need loss scaling (autocast runs only for bf16): refused, never silently fp32."""
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="fp16 is not supported"):
            Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, precision="fp16", device=device))


def test_ema_and_warmup_rules(tmp_path):
    tr = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, warmup=4, lr=1e-3, ema_decay=0.9))
    assert [round(tr.lr_at(s), 8) for s in range(6)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    for _ in range(100):  # past the EMA warm-up, (1+step)/(10+step) > 0.9
        tr.train_step()
    assert tr.ema_decay_at(0) == 0.1 and tr.ema_decay_at(1000) == 0.9
    plain = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "plain", ema_decay=0.9, ema_warmup=False))
    assert plain.ema_decay_at(0) == 0.9  # the release's plain decay, as --config sets it
    before = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step()
    for e0, e, p in zip(before, tr.ema.parameters(), tr.model.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p)


def test_label_dropout_rate():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01


def test_digits_split():
    xtr, ytr = load_digits_split("train")
    xte, yte = load_digits_split("test")
    assert xtr.shape[1:] == (1, 8, 8) and len(xtr) + len(xte) == 1797
    assert xtr.min() >= -1 and xtr.max() <= 1 and set(ytr.tolist()) == set(range(10))
    flat_tr = {tuple(r) for r in xtr.view(len(xtr), -1).tolist()}
    assert sum(tuple(r) in flat_tr for r in xte.view(len(xte), -1).tolist()) < 10  # near-disjoint (duplicates exist)


def test_folder_dataset_crops_and_labels(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i, size in enumerate(((40, 20), (16, 30))):
            Image.new("RGB", size, color).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, 1]
    x, y = BatchStream(ds, 4, torch.Generator().manual_seed(0)).next()
    assert x.shape == (4, 3, 12, 12)
    red = x[y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0]), atol=0.02)
    assert torch.allclose(red[:, 2], -torch.ones_like(red[:, 2]), atol=0.02)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(f"folder:{tmp_path}", image_size=8)


@pytest.mark.parametrize("model_pred, diffusion_pred", [("v", "eps"), ("eps", "v")])
def test_loss_refuses_a_diffusion_of_the_other_parameterisation(model_pred, diffusion_pred):
    """A v model regressed on eps targets (or the reverse) would train without error and sample
    garbage: the loss refuses the pair."""
    model = CausalFusion(digits_model(prediction=model_pred))
    x0, y = load_digits_split("train")
    with pytest.raises(ValueError, match=f"predicts {model_pred} but this Diffusion is built for {diffusion_pred}"):
        causalfusion_loss(model, Diffusion(prediction=diffusion_pred), x0[:2], y[:2], ARPlanConfig())
    loss, _ = causalfusion_loss(model, Diffusion(prediction=model_pred), x0[:2], y[:2], ARPlanConfig())
    assert torch.isfinite(loss)


def test_ema_warmup_flag_and_paper_configs():
    from causalfusion.cli import build_parser
    from causalfusion.configs import get_config

    parse = build_parser().parse_args
    assert parse(["train", "--ema-warmup", "off"]).ema_warmup is False
    assert parse(["train", "--ema-warmup", "on"]).ema_warmup is True
    assert parse(["train"]).ema_warmup is None  # not given: TrainConfig's default (warm-up on)
    with pytest.raises(SystemExit):
        parse(["train", "--ema-warmup", "maybe"])
    assert get_config("in256-system-XL").train_args()["ema_warmup"] is False


def test_adam_eps_is_torchs_by_default_and_the_releases_under_paper_configs(tmp_path):
    from causalfusion.configs import PAPER_CONFIGS

    assert Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a")).opt.param_groups[0]["eps"] == 1e-8
    tr = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b", adam_eps=1e-15))
    assert tr.opt.param_groups[0]["eps"] == 1e-15
    assert {c.train_args()["adam_eps"] for c in PAPER_CONFIGS.values()} == {1e-15}  # release train.py --eps
    with pytest.raises(ValueError, match="--adam-eps must be a finite number > 0"):
        small_train(tmp_path / "c", adam_eps=0.0).validate()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noised_loss_is_zero_for_an_oracle(prediction):
    """A model that reads the noise back from its inputs, token by token in AR order, scores zero:
    so each token is noised with its own t (moved from AR to raster order) and the target is in AR
    order. Per-step t, random orders and K copies make every token's t and place differ."""
    from causalfusion.ar_plan import sample_plan
    from causalfusion.objective import noised_loss

    model = CausalFusion(digits_model(prediction=prediction))
    diffusion, g = Diffusion(prediction=prediction), torch.Generator().manual_seed(0)
    plan = sample_plan(ARPlanConfig(fixed_steps=4, t_per_step=True, t_copies=2), 3, model.cfg.grid, 1000, g)
    assert len(set(plan.t[0, 0].tolist())) > 1 and not torch.equal(plan.order[0], plan.order[1])
    x0 = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, model.cfg.num_tokens, model.cfg.patch_dim, generator=g, dtype=torch.float64)

    def oracle(x0, xt, t, y, group_sizes, order):
        b, k, n, p = noise.shape
        idx = order[:, None, :, None].expand(b, k, n, p)
        x0_ar = model.patchify(x0)[:, None].expand(b, k, n, p).gather(2, idx)
        xt_ar = model.patchify(xt.flatten(0, 1)).view(b, k, n, p).gather(2, idx)
        ac = diffusion.alphas_cumprod[t][..., None]
        eps = (xt_ar - ac.sqrt() * x0_ar) / (1 - ac).sqrt()
        return diffusion.target(x0_ar, t, eps)

    loss = noised_loss(model, diffusion, x0, torch.zeros(3, dtype=torch.long), plan.order, plan.t, noise,
                       plan.group_sizes, plan.weights, run_model=oracle)
    assert float(loss) < 1e-12


def test_weights_missing_a_tensor_are_refused(tmp_path):
    """Loading is strict: a weights file without one of the model's tensors does not fit."""
    from causalfusion.checkpoint import load_weights
    from causalfusion.files import write_json
    from safetensors.torch import save_file

    write_json(tmp_path / "state.json", {"step": 1})
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "ema.safetensors"), metadata={"step": "1"})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(tmp_path, torch.nn.Linear(2, 2))  # no "bias" in the file


def test_demo_resume_without_steps_keeps_the_runs_target(tmp_path, monkeypatch):
    import causalfusion.demo as demo

    monkeypatch.setattr(demo, "check_samples", lambda model, out: (1.0, out / "demo_grid.png"))  # no 200-image check
    small = dict(batch_size=8, sample_every=0, progress=False)
    assert demo.run_demo(str(tmp_path), steps=2, **small)["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained past the run's 2 steps"))
    assert demo.run_demo(str(tmp_path), resume=True, **small)["step"] == 2


def test_a_run_in_the_fixed_name_layout_torn_by_an_interrupted_save_loads_and_moves_on(tmp_path):
    """A run written with fixed names, whose save was interrupted after model.safetensors (the old one
    waits as .prev), loads as its state.json's step; its next save commits the step-named layout."""
    import os

    from safetensors.torch import load_file, save_file

    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b", steps=3, ckpt_every=3)).train()
    run, state = tmp_path / "b", read_state(tmp_path / "b")
    for part in ("model", "ema", "train"):  # the fixed-name layout of the same checkpoint
        os.replace(part_path(run, state, part), run / f"{part}.safetensors")
    del state["files"]
    (run / "state.json").write_text(json.dumps(state))
    os.link(run / "model.safetensors", run / "model.safetensors.prev")
    tensors = load_file(str(run / "model.safetensors"))
    save_file({k: v + 1 for k, v in tensors.items()}, str(run / "model.safetensors.new"), metadata={"step": "6"})
    os.replace(run / "model.safetensors.new", run / "model.safetensors")  # step 6's model beside step 3's state
    resumed = Trainer(digits_model(), ARPlanConfig(), small_train(run, steps=6), resume=True)
    assert resumed.step == 3
    resumed.train()
    straight = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "c", steps=6))
    straight.train()
    for p, q in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(p, q)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "c").iterdir())


def test_trim_log_drops_a_cut_off_row_and_rewrites_the_header_of_an_empty_log(tmp_path):
    from causalfusion.trainer import trim_log

    log = tmp_path / "log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")  # killed while writing row 4
    assert trim_log(log, 3) is False and log.read_text() == "step,loss\n1,0.5\n2,0.4\n3,0.3\n"
    log.write_text("")
    assert trim_log(log, 3) is True  # the trainer writes the header again
    log.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match="log.csv is not a text CSV log"):
        trim_log(log, 3)


def test_a_resume_with_new_flags_writes_them_to_config_json_only_with_its_first_checkpoint(tmp_path):
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3)).train()
    before = (tmp_path / "config.json").read_bytes()
    (tmp_path / "log.csv").write_bytes(b"\xff\xfe\x00binary")  # the resume fails in train(), before any step
    failed = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=6, lr=5e-4), resume=True)
    with pytest.raises(CheckpointError, match="not a text CSV log"):
        failed.train()
    assert (tmp_path / "config.json").read_bytes() == before  # the next resume still starts from the run's flags
    (tmp_path / "log.csv").unlink()
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=6, lr=5e-4), resume=True).train()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 5e-4


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3)).train()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["prediction"], config["plan"]["weighting"]  # as written before those fields
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model config differs .*'prediction': \('eps', 'v'\)"):
        Trainer(digits_model(prediction="v"), ARPlanConfig(), small_train(tmp_path, steps=6), resume=True)
    resumed = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=6), resume=True)  # eps, release
    resumed.train()
    assert resumed.step == 6


def test_a_resume_with_another_adam_eps_trains_with_it(tmp_path):
    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=3)).train()
    resumed = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path, steps=4, adam_eps=1e-15), resume=True)
    assert resumed.opt.param_groups[0]["eps"] == 1e-15  # not the saved param_groups' 1e-8
    resumed.train()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["adam_eps"] == 1e-15


def test_check_same_config_fills_defaults_of_fields_but_refuses_a_missing_section(tmp_path):
    from dataclasses import dataclass, field

    from causalfusion.checkpoint import check_same_config

    @dataclass
    class Toy:
        a: int = 1
        b: list = field(default_factory=lambda: [1, 2])

    check_same_config(tmp_path, "toy", {}, {"a": 1, "b": [1, 2]}, Toy)  # both written before they existed
    with pytest.raises(CheckpointError, match=r"'b': \(\[1, 2\], \[3\]\)"):
        check_same_config(tmp_path, "toy", {"a": 1}, {"a": 1, "b": [3]}, Toy)
    with pytest.raises(CheckpointError, match="its config.json has no toy section"):
        check_same_config(tmp_path, "toy", None, {"a": 1, "b": [1, 2]}, Toy)


def test_resuming_on_changed_data_is_refused():
    from causalfusion.data import EpochSampler

    saved = EpochSampler(12, 4, torch.Generator().manual_seed(0))
    saved.next_index()
    with pytest.raises(ValueError, match="has 10 items, not the 12 the checkpoint was drawing from"):
        EpochSampler(10, 4, torch.Generator()).load_state(saved.state())
    same = EpochSampler(12, 4, torch.Generator())
    same.load_state(saved.state())
    assert torch.equal(same.next_index(), saved.next_index())


def test_training_state_of_another_model_is_refused(tmp_path):
    import shutil

    Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a", steps=2, ckpt_every=2)).train()
    Trainer(digits_model(hidden_size=64), ARPlanConfig(), small_train(tmp_path / "b", steps=2, ckpt_every=2)).train()
    shutil.copy(part_path(tmp_path / "b", read_state(tmp_path / "b"), "train"),
                part_path(tmp_path / "a", read_state(tmp_path / "a"), "train"))  # same step, wider model
    with pytest.raises(CheckpointError, match="optimizer state does not fit the model"):
        Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a", steps=4), resume=True)
