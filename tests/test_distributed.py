"""Multi-process training and sampling: torchrun with 2 CPU processes (gloo), DDP and FSDP2.

The global batch is drawn identically whatever the world size, so 2 processes (DDP, or FSDP2 with
accumulation and checkpointing) follow the 1-process loss curve and end at the same weights up to
float round-off; a checkpoint written by 2 processes resumes in 1; distributed sampling gives the
single-process images bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.checkpoint import CheckpointError
from causalfusion.cli import main
from causalfusion.distributed import (DistributedTrainer, ScaleConfig, make_trainer, optimizer_state_by_index,
                                      optimizer_state_by_name, sample_in_chunks, scale_config, uint8_to_images)
from causalfusion.models import ModelConfig
from causalfusion.run_config import train_configs
from causalfusion.trainer import TrainConfig, Trainer
from conftest import log_column

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "8", "--sample-every", "0",
        "--no-progress", "--log-every", "1", "--ckpt-every", "2", "--lr", "1e-3", "--warmup", "2"]


def torchrun(*args: str, nproc: int = 2, timeout: int = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "causalfusion.cli", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def losses(run) -> list[float]:
    return log_column(run, "loss")


def committed(run, part):
    from causalfusion.checkpoint import part_path, read_state

    return part_path(run, read_state(run), part)


def assert_same_weights(a, b, atol=2e-5) -> None:
    for name in ("model", "ema", "train"):
        ta, tb = load_file(str(committed(a, name))), load_file(str(committed(b, name)))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k].double(), tb[k].double(), atol=atol, rtol=1e-4, msg=f"{name}:{k}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 steps, global batch 8."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "4", *TINY]) == 0
    return out


def digits_model() -> ModelConfig:
    return ModelConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                       num_classes=10, class_tokens=2)


def small_train(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), steps=3, batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9,
                                 log_every=1, ckpt_every=3, sample_every=0, progress=False), **kw})


def test_one_process_is_the_trainer_step_for_step(tmp_path):
    """World size 1 without accumulation: exactly the single-process Trainer (same draws, same ops)."""
    plain = Trainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "a"))
    plain.train()
    dist = DistributedTrainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "b"))
    dist.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for p, q in zip(plain.ema.state_dict().values(), dist.ema.state_dict().values()):
        assert torch.equal(p, q)
    # accumulation (4 micro-batches of 2) and activation checkpointing: the same step up to round-off
    acc = DistributedTrainer(digits_model(), ARPlanConfig(), small_train(tmp_path / "c"),
                             scale=ScaleConfig(grad_accum=4, grad_ckpt=True))
    acc.train()
    assert np.allclose(losses(tmp_path / "a"), losses(tmp_path / "c"), atol=1e-5)
    assert_same_weights(tmp_path / "a", tmp_path / "c")
    # the gradient is the batch mean (micro-batch losses divided by the accumulation count): same norm
    np.testing.assert_allclose(log_column(tmp_path / "c", "grad_norm"), log_column(tmp_path / "a", "grad_norm"), rtol=1e-3)


def test_batch_must_divide_by_processes_times_accumulation(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "r"), "--steps", "1", *TINY,
                 "--grad-accum", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "divisible by processes x accumulation" in err[0]
    assert not (tmp_path / "r").exists()


def test_optimizer_state_name_index_round_trip():
    names = ["a.weight", "a.bias", "b.weight"]
    state = {"state": {0: {"step": torch.tensor(1.0)}, 2: {"step": torch.tensor(2.0)}},
             "param_groups": [{"lr": 1e-3, "params": [0, 1, 2]}]}
    by_name = optimizer_state_by_name(state, names)
    assert set(by_name["state"]) == {"a.weight", "b.weight"} and by_name["param_groups"][0]["params"] == names
    assert optimizer_state_by_index(by_name, names) == state


def test_ddp_two_processes_match_one_and_resume_in_one(reference, tmp_path):
    run = tmp_path / "ddp"
    torchrun("train", "--data", "digits", "--out", str(run), "--steps", "2", *TINY)
    # rank 0 alone logged and checkpointed, in the single-process format
    names = lambda d: sorted(p.name.replace(".2.", ".N.").replace(".4.", ".N.") for p in d.iterdir() if p.is_file())  # noqa: E731
    assert names(run) == names(reference)  # (the step in the checkpoint files' names aside)
    assert np.allclose(losses(run), losses(reference)[:2], atol=1e-5)
    # the 2-process checkpoint continues in one plain process, on the same curve
    assert main(["train", "--out", str(run), "--resume", "--steps", "4"]) == 0
    assert len(losses(run)) == 4 and np.allclose(losses(run), losses(reference), atol=1e-5)
    assert_same_weights(run, reference)


def test_fsdp2_with_accumulation_and_checkpointing_matches_one_process(reference, tmp_path):
    run = tmp_path / "fsdp"
    torchrun("train", "--data", "digits", "--out", str(run), "--steps", "4", *TINY,
             "--strategy", "fsdp", "--grad-accum", "2", "--grad-ckpt")
    assert np.allclose(losses(run), losses(reference), atol=1e-5)
    assert_same_weights(run, reference)


def test_distributed_sampling_gives_the_single_process_images(reference, tmp_path):
    args = ["sample", "--ckpt", str(reference), "--per-class", "1", "--batch-size", "3", "--sample-steps", "4",
            "--ar-steps", "2"]
    torchrun(*args, "--out", str(tmp_path / "two.png"), "--npz", str(tmp_path / "two.npz"))
    assert main([*args, "--out", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (10, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert one["labels"].tolist() == two["labels"].tolist() == list(range(10))  # --per-class: balanced, sorted


def test_sample_in_chunks_one_process_keeps_global_order():
    seen = []

    def fn(start, stop):
        seen.append((start, stop))
        return torch.full((stop - start, 1, 2, 2), start / 10)

    arr = sample_in_chunks(7, 3, fn)
    assert seen == [(0, 3), (3, 6), (6, 7)] and arr.shape == (7, 2, 2, 1) and arr.dtype == np.uint8
    back = uint8_to_images(arr)
    assert torch.allclose(back[:, 0, 0, 0], torch.tensor([0, 0, 0, 0.3, 0.3, 0.3, 0.6]), atol=1 / 127.5)


# ---- paper presets -------------------------------------------------------------------------------
def test_paper_configs_and_parameter_counts(capsys):
    from causalfusion.configs import PAPER_CONFIGS, config_table

    rows = {r["name"]: r for r in config_table()}
    assert set(rows) == set(PAPER_CONFIGS) and all(r["tokens"] == 256 for r in rows.values())
    assert all(abs(r["lr"] - 8e-4) < 1e-12 and r["batch_size"] == 2048 for r in rows.values())
    assert abs(rows["in256-ablation"]["diff_pct"]) < 1 and abs(rows["in256-system-L"]["diff_pct"]) < 1
    # XL and H: Tab. 10's architectures (= the release's for XL) count 714.0M and 1.045B, not 676M / 1B
    # (docs/scale_up.md explains); pinned so that a change of the model shows up here.
    assert rows["in256-system-XL"]["params"] == 713_988_368 and rows["in256-system-H"]["params"] == 1_045_203_856
    assert main(["params", "--config", "in256-system-L"]) == 0
    assert "paper: 368.0M (+0.4%)" in capsys.readouterr().out


def test_paper_config_gives_python_the_configs_of_train_config():
    from causalfusion.configs import get_config

    paper = get_config("in256-ablation")
    mc, plan, tc = paper.configs("folder:/data/imagenet", "runs/abl", num_images=1000, batch_size=256, seed=3)
    assert mc == paper.model_config() and (mc.depth, mc.hidden_size, mc.class_tokens, mc.patch_size) == (24, 1024, 4, 2)
    assert (plan.gamma, plan.lam, plan.order) == (0.9, 2.0, "random")
    assert (tc.data, tc.out, tc.image_size, tc.batch_size, tc.lr, tc.seed) == ("folder:/data/imagenet", "runs/abl", 256, 256, 1e-4, 3)
    assert (tc.warmup, tc.steps) == (40 * 4, 240 * 4)  # epochs of 1000 images at batch 256
    assert (tc.ema_decay, tc.ema_warmup, tc.adam_eps, tc.label_dropout, tc.precision) == (0.9999, False, 1e-15, 0.1, "bf16")
    assert paper.configs("digits", "runs/x", num_classes=10)[0].num_classes == 10  # the data's classes
    with pytest.raises(ValueError, match="not TrainConfig fields: sed"):
        paper.configs("digits", "runs/x", sed=3)


def test_config_flags_fill_in_and_explicit_flags_win():
    from types import SimpleNamespace

    from causalfusion.cli import add_train_args
    from causalfusion.cli.train import given_flags
    from causalfusion.run_config import with_paper_config

    def resolve(*argv):  # the flags given, with --config's values filled in
        return SimpleNamespace(**with_paper_config(given_flags(["train", *argv], add_train_args)))

    a = resolve("--config", "in256-system-XL")
    assert (a.image_size, a.vae, a.patch_size, a.preset, a.class_tokens, a.learn_pos) == (256, "kl16", 1, "XL", 64, True)
    assert (a.batch_size, a.lr, a.warmup, a.steps, a.gamma, a.lam) == (2048, 8e-4, 40 * 626, 800 * 626, 0.9, 2.0)
    a = resolve("--config", "in256-ablation", "--batch-size", "256", "--gamma", "1.0", "--patch-size", "4")
    assert (a.vae, a.learn_pos, a.class_tokens, a.gamma, a.patch_size) == ("sd-vae", False, 4, 1.0, 4)
    assert (a.batch_size, a.lr, a.warmup) == (256, 1e-4, 40 * 5005)  # lr by the linear rule, warmup in epochs
    a = resolve("--base-lr", "2e-4", "--batch-size", "1024")
    assert a.lr == 8e-4


def test_a_resume_that_leaves_out_grad_accum_continues_the_run_bit_identically(tmp_path):
    """--grad-accum and --strategy are kept in config.json ("scale"): `train --out RUN --resume --steps N`
    without them sums the gradient over the run's micro-batches, as the straight run does (it used to
    resume with one micro-batch: the same step only up to round-off). A given flag wins and is saved."""
    args = ["--data", "digits", *TINY, "--grad-accum", "2"]
    assert main(["train", "--out", str(tmp_path / "a"), "--steps", "4", *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--steps", "2", *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--steps", "4", "--no-progress"]) == 0
    for name in ("model", "ema", "train"):
        assert committed(tmp_path / "a", name).read_bytes() == committed(tmp_path / "b", name).read_bytes(), name
    assert json.loads((tmp_path / "b" / "config.json").read_text())["scale"] == {"strategy": "ddp", "grad_accum": 2}
    # Python: make_trainer without a scale resumes with the saved one
    mc, plan, tc, data = train_configs(str(tmp_path / "b"), resume=True, steps=5)
    assert make_trainer(mc, plan, tc, data, resume=True).scale == ScaleConfig(grad_accum=2)
    with pytest.raises(CheckpointError, match="plain Trainer"):  # it would step with one micro-batch
        Trainer(mc, plan, tc, resume=True, dataset=data)
    # one micro-batch asked for: a plain step (the Trainer's), and the next resume keeps it
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--steps", "5", "--grad-accum", "1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["scale"]["grad_accum"] == 1
    assert scale_config(tmp_path / "b", resume=True) == ScaleConfig()
    assert scale_config(tmp_path / "b", resume=True, strategy="fsdp") == ScaleConfig(strategy="fsdp")
    assert scale_config(tmp_path / "new") == ScaleConfig()  # a new run: the defaults


def test_an_fsdp_run_resumes_as_fsdp_and_not_in_a_plain_trainer(tmp_path):
    run = tmp_path / "f"
    assert main(["train", "--out", str(run), "--steps", "2", "--data", "digits", *TINY, "--strategy", "fsdp"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["scale"] == {"strategy": "fsdp", "grad_accum": 1}
    mc, plan, tc, data = train_configs(str(run), resume=True, steps=4)
    with pytest.raises(CheckpointError, match="plain Trainer"):
        Trainer(mc, plan, tc, resume=True, dataset=data)


@pytest.mark.parametrize("scale", [{"grad_accum": "2"}, {"grad_accum": 0}, {"grad_accum": None}, {"strategy": "dp"}])
def test_a_hand_edited_scale_is_one_checkpoint_error(tmp_path, scale):
    (tmp_path / "config.json").write_text(json.dumps({"scale": scale}))
    with pytest.raises(CheckpointError, match="invalid scale"):
        scale_config(tmp_path, resume=True)
