"""The configs `train` and `train-mm` build from the settings given (``run_config.train_configs``,
``multimodal.run_config.train_mm_configs``): the defaults (the flags'), the patch-size rule,
``--config`` counted on the data loaded, the resume merge (given settings over saved ones), and the
config.json a resume with other training settings writes with its first checkpoint (both trainers)."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.checkpoint import CheckpointError
from causalfusion.cli import build_parser
from causalfusion.run_config import SETTINGS, default_patch_size, train_configs
from causalfusion.trainer import PendingConfig, TrainConfig, Trainer

TINY = dict(depth=2, hidden_size=32, num_heads=4, batch_size=4, sample_every=0, progress=False, log_every=1)


def make_folder(root, size: int):
    """An ImageFolder tree of 2 classes x 3 random RGB images of ``size`` px."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    """A grey 8 px folder run with a raster plan and lr 1e-3, stopped at step 1 of 2."""
    root = tmp_path_factory.mktemp("rc")
    data = f"folder:{make_folder(root / 'imgs', 8)}"
    mc, plan, tc, ds = train_configs(str(root / "run"), data=data, image_size=8, channels=1, steps=2, order="raster",
                                     lr=1e-3, **TINY)
    trainer = Trainer(mc, plan, tc, dataset=ds)
    trainer.train_step()
    trainer.save()
    return root / "run"


def test_default_patch_size_is_2_up_to_16_cells_then_4():
    assert [default_patch_size(n) for n in (4, 8, 16, 17, 32, 256)] == [2, 2, 2, 4, 4, 4]


def test_new_run_is_the_preset_sized_to_the_data(tmp_path):
    out = str(tmp_path / "r")
    mc, plan, tc, ds = train_configs(out)  # digits: 8x8 grey, 10 classes
    assert (mc.image_size, mc.in_channels, mc.num_classes, mc.patch_size, mc.depth) == (8, 1, 10, 2, 6)
    assert plan == ARPlanConfig() and tc == TrainConfig(out=out) and ds.name == "digits"
    data = f"folder:{make_folder(tmp_path / 'imgs', 32)}"
    mc = train_configs(out, data=data, preset="S")[0]  # folder data: 32 px RGB by default
    assert (mc.image_size, mc.in_channels, mc.num_classes, mc.patch_size, mc.depth) == (32, 3, 2, 4, 12)
    mc = train_configs(out, data=data, image_size=16, depth=1, patch_size=1, channels=1)[0]  # given settings win
    assert (mc.image_size, mc.in_channels, mc.patch_size, mc.depth, mc.hidden_size) == (16, 1, 1, 1, 192)
    assert train_configs(out, data=data, image_size=16)[0].patch_size == 2
    assert not (tmp_path / "r").exists()  # nothing is written
    with pytest.raises(ValueError, match="unknown train settings: sed"):
        train_configs(out, sed=1)


def test_cli_flag_defaults_are_the_library_defaults(tmp_path):
    """Every `train` / `train-mm` flag at its default gives what no settings give (the CLI passes only
    the flags given)."""
    a = build_parser().parse_args(["train"])
    every = {k: v for k, v in vars(a).items() if k in SETTINGS}
    assert {"data", "gamma", "ar_steps", "order", "weighting", "t_copies"} <= set(every)
    assert train_configs(str(tmp_path), **every)[:3] == train_configs(str(tmp_path))[:3]
    pytest.importorskip("tokenizers")
    from causalfusion.multimodal.run_config import SETTINGS as MM_SETTINGS, train_mm_configs

    a = build_parser().parse_args(["train-mm"])
    every = {k: v for k, v in vars(a).items() if k in MM_SETTINGS}
    assert {"data", "steps", "lr", "patch_size", "image_size", "max_text_len", "image_first_prob"} <= set(every)
    assert train_mm_configs(str(tmp_path), **every) == train_mm_configs(str(tmp_path))


def test_paper_config_counts_its_epochs_on_the_data_loaded(tmp_path):
    out = str(tmp_path / "r")
    mc, plan, tc, ds = train_configs(out, config="in256-ablation", vae="identity", image_size=8, batch_size=64)
    per_epoch = -(-len(ds) // 64)  # 1437 digits: 23 steps
    assert (tc.warmup, tc.steps, tc.lr, tc.adam_eps, tc.ema_warmup, tc.precision) == \
        (40 * per_epoch, 240 * per_epoch, 1e-4 * 64 / 256, 1e-15, False, "bf16")
    assert (mc.depth, mc.hidden_size, mc.patch_size, mc.class_tokens, mc.num_classes) == (24, 1024, 2, 4, 10)  # L/2
    tc = train_configs(out, config="in256-ablation", vae="identity", image_size=8, batch_size=64, steps=5, lr=1e-3)[2]
    assert (tc.steps, tc.warmup, tc.lr) == (5, 40 * per_epoch, 1e-3)  # given settings win
    assert train_configs(out, base_lr=2e-4, batch_size=128)[2].lr == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="--base-lr needs the global batch"):
        train_configs(out, base_lr=2e-4)


def test_resume_is_the_saved_config_with_the_given_settings_on_top(grey_run):
    saved = json.loads((grey_run / "config.json").read_text())
    mc, plan, tc, ds = train_configs(str(grey_run), resume=True, lr=3e-4, config="in256-ablation")  # config: ignored
    assert mc.to_dict() == saved["model"] and asdict(plan) == saved["plan"] and plan.order == "raster"
    assert asdict(tc) == {**saved["train"], "lr": 3e-4, "progress": True}  # steps, batch, data, image size: saved
    assert ds.channels == 1 and ds.name == saved["data"]  # the grey run's images read grey again
    _, plan, tc, ds = train_configs(str(grey_run), resume=True, data="digits", order="block", preset="S", steps=9)
    assert (tc.data, ds.name, tc.steps, plan.order, plan.gamma) == ("digits", "digits", 9, "block", 0.9)
    for given, refused in ((dict(order="block"), "plan config differs"), (dict(preset="S"), "model config differs")):
        mc, plan, tc, ds = train_configs(str(grey_run), resume=True, **given)
        with pytest.raises(CheckpointError, match=refused):  # given on top, then refused by the trainer
            Trainer(mc, plan, tc, resume=True, dataset=ds)


def test_pending_config_is_written_once_and_only_when_the_training_settings_changed(tmp_path):
    saved = {"model": {"depth": 1}, "train": {"lr": 1e-3}}
    assert PendingConfig(tmp_path, saved, {"lr": 1e-3}).config is None
    pending = PendingConfig(tmp_path, saved, {"lr": 3e-4})
    pending.write()
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": {"depth": 1}, "train": {"lr": 3e-4}}
    (tmp_path / "config.json").unlink()
    pending.write()
    assert not (tmp_path / "config.json").exists()


def test_trainer_writes_a_resumes_new_settings_with_its_first_checkpoint(grey_run, tmp_path):
    run = shutil.copytree(grey_run, tmp_path / "run")
    before = (run / "config.json").read_text()
    mc, plan, tc, ds = train_configs(str(run), resume=True, lr=3e-4)
    trainer = Trainer(mc, plan, tc, resume=True, dataset=ds)
    assert (run / "config.json").read_text() == before  # a resume that fails before a checkpoint leaves it
    trainer.train_step()
    trainer.save()
    assert json.loads((run / "config.json").read_text()) == {**json.loads(before), "train": asdict(tc)}
    assert train_configs(str(run), resume=True)[2].lr == 3e-4  # the next resume starts from it


def test_train_mm_resume_merges_and_writes_new_settings_with_the_first_checkpoint(tmp_path):
    pytest.importorskip("tokenizers")
    from causalfusion.multimodal.run_config import train_mm_configs
    from causalfusion.multimodal.train import MMTrainer

    out, tiny = tmp_path / "mm", dict(depth=1, hidden_size=32, num_heads=2, max_text_len=24, batch_size=8, progress=False)
    trainer = MMTrainer(*train_mm_configs(str(out), data="shapes:train:16", steps=3, lr=1e-3, **tiny))
    assert trainer.plan_cfg == ARPlanConfig() and trainer.model_cfg.patch_size == 4
    trainer.train_step()
    trainer.save()  # stopped at step 1 of 3
    before = (out / "config.json").read_text()
    saved = json.loads(before)
    mc, text, plan, mix, tc = train_mm_configs(str(out), resume=True, lr=5e-3, gamma=0.5)
    assert (tc.lr, tc.steps, tc.batch_size, tc.data) == (5e-3, 3, 8, "shapes:train:16")  # given lr, saved rest
    assert mc.to_dict() == saved["model"] and text == {k: v for k, v in saved["text"].items() if k != "vocab_size"}
    assert (plan.gamma, asdict(mix)) == (0.5, saved["mix"])  # given on top, then refused by MMTrainer
    with pytest.raises(CheckpointError, match="plan config differs"):
        MMTrainer(mc, text, plan, mix, tc, resume=True)
    trainer = MMTrainer(*train_mm_configs(str(out), resume=True, lr=5e-3, progress=False), resume=True)
    assert (out / "config.json").read_text() == before
    trainer.train_step()
    trainer.save()
    assert json.loads((out / "config.json").read_text()) == {**saved, "train": {**saved["train"], "lr": 5e-3}}
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="not a multimodal run"):
        train_mm_configs(str(tmp_path / "cc"), resume=True)
