"""The command line: happy paths write what they promise; bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from causalfusion.cli import main
from conftest import log_column, one_error_line

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "8",
        "--sample-every", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "3", *TINY]) == 0
    return out


def test_sample_writes_grid_and_adm_npz(run_dir, tmp_path):
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run_dir), "--class", "3,7", "--n", "4", "--sample-steps", "5",
                 "--out", str(png), "--npz", str(npz)]) == 0
    assert Image.open(png).size[0] > 8
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 8, 8, 1)
    assert data["labels"].dtype == np.int64 and sorted(data["labels"].tolist()) == [3, 3, 7, 7]


@pytest.mark.parametrize("command", [
    ["sample", "--class", "3", "--n", "2", "--out", "{tmp}/s.png"],
    ["edit", "--generate-class", "1", "--class", "2", "--n", "1", "--out", "{tmp}/e.png"],
    ["eval", "--n", "10", "--batch-size", "10"],
])
def test_no_progress_turns_the_sampling_bars_off(run_dir, tmp_path, monkeypatch, command):
    """sample, edit and eval show sampling progress unless --no-progress (seen by ``sample`` itself)."""
    import causalfusion.editing as editing
    import causalfusion.sampling as sampling

    seen, real = [], sampling.sample
    spy = lambda *a, **kw: seen.append(kw.get("progress", False)) or real(*a, **kw)  # noqa: E731
    for module in (sampling, editing):
        monkeypatch.setattr(module, "sample", spy)
    args = [x.replace("{tmp}", str(tmp_path)) for x in command]
    base = [args[0], "--ckpt", str(run_dir), *args[1:], "--sample-steps", "2"]
    assert main(base) == 0 and any(seen)
    seen.clear()
    assert main([*base, "--no-progress"]) == 0 and seen and not any(seen)


def test_params_counts_without_weights(capsys):
    assert main(["params", "--preset", "L"]) == 0
    out = capsys.readouterr().out
    millions = int(out.split(":")[1].split("parameters")[0].replace(",", "")) / 1e6
    assert abs(millions - 368) / 368 < 0.02
    assert main(["params", "--config", "in256-system-H", "--depth", "48"]) == 0  # the release's H
    assert "1,235,635,088 parameters" in capsys.readouterr().out
    assert main(["params", "--depth", "0"]) == 2 and "--depth must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--ckpt", "/nonexistent/run", "--out", "{tmp}/x.png"], "does not exist"),
    (["sample", "--ckpt", "{run}", "--class", "12", "--out", "{tmp}/x.png"], "the model has classes 0..9"),
    (["sample", "--ckpt", "{run}", "--class", "-1", "--out", "{tmp}/x.png"], "the model has classes 0..9"),
    (["sample", "--ckpt", "{run}", "--cfg-interval", "0,2000", "--cfg", "2", "--out", "{tmp}/x.png"], "CFG interval"),
    (["train", "--data", "digits", "--precision", "fp16", "--out", "{tmp}/r"], "fp16"),
    (["train", "--data", "folder:{tmp}", "--out", "{tmp}/r", "--image-size", "8"], "no images found"),
    (["train", "--data", "imagenet", "--out", "{tmp}/r"], "unknown dataset"),
    (["sample", "--ckpt", "{run}", "--n", "1", "--out", "{tmp}/empty_class"], "is a directory"),
    (["sample", "--ckpt", "{run}", "--n", "1", "--out", "{tmp}/x.png", "--npz", "{tmp}/a_file/x.npz"], "is a file"),
    (["sample", "--ckpt", "{run}", "--n", "1", "--cfg", "nan", "--out", "{tmp}/x.png"], "finite"),
    (["sample", "--ckpt", "{run}", "--n", "1", "--device", "tpu", "--out", "{tmp}/x.png"], "unknown device"),
    (["sample", "--ckpt", "{tmp}/a_file", "--out", "{tmp}/x.png"], "is a file, not a run directory"),
    (["eval", "--ckpt", "{run}", "--json", "{tmp}/empty_class"], "is a directory"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--ckpt-every", "0", "--steps", "1"], "--ckpt-every must be >= 1"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--label-dropout", "2", "--steps", "1"], "--label-dropout"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--depth", "0", "--steps", "1"], "model depth must be an integer >= 1"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--order", "block", "--block", "0", "--steps", "1"], "block"),
    (["train", "--data", "digits", "--out", "{tmp}/r", "--eval-every", "1", "--eval-ar-steps", "99", "--steps", "1"], "--eval-ar-steps 99"),
    (["train", "--data", "digits", "--out", "{tmp}/a_file", "--steps", "1"], "is a file"),
    (["params", "--patch-size", "0"], "patch_size must be an integer >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, needle, run_dir, tmp_path, capsys):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:  # refused by the parser (a value outside the flag's choices)
        rc = e.code
    assert rc == 2
    assert needle in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def copy_run(run_dir, dst):
    """A copy of a run directory's files, to damage."""
    dst.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def ema_file(run):
    """The EMA file the run's state.json names."""
    from causalfusion.checkpoint import part_path, read_state

    return part_path(run, read_state(run), "ema")


def test_corrupt_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    bad = copy_run(run_dir, tmp_path / "bad")
    ema_file(bad).write_bytes(b"\x00garbage")
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "corrupt" in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_checkpoint_json_that_is_not_an_object_and_nan_weights(run_dir, tmp_path, capsys):
    """A config.json holding a list is one line; NaN weights are refused on loading, one line."""
    from safetensors.torch import load_file, save_file

    bad = copy_run(run_dir, tmp_path / "bad")
    good_config = (bad / "config.json").read_text()
    (bad / "config.json").write_text("[1, 2]")
    assert main(["sample", "--ckpt", str(bad), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "not an object" in one_error_line(capsys)
    (bad / "config.json").write_text(good_config)
    ema = load_file(str(ema_file(bad)))
    meta = {"step": json.loads((bad / "state.json").read_text())["step"]}
    save_file({k: torch.full_like(v, float("nan")) for k, v in ema.items()}, str(ema_file(bad)),
              metadata={"step": str(meta["step"])})
    assert main(["sample", "--ckpt", str(bad), "--n", "1", "--sample-steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (after the progress bar)
    assert len(errors) == 1 and f"{ema_file(bad).name} holds non-finite values" in errors[0]  # refused on loading
    assert not (tmp_path / "x.png").exists()


def test_resume_with_other_model_config_is_refused(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "5", *TINY[:2], "--hidden-size", "64"]) == 2
    assert "model config differs" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_resume_keeps_the_runs_ar_plan(tmp_path, capsys):
    """A run trained with a non-default plan resumes with that plan, not the flags' defaults."""
    plan = ["--ar-steps", "4", "--order", "raster", "--lam", "1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", "--data", "digits", "--out", str(straight), "--steps", "6", *TINY, *plan]) == 0
    assert main(["train", "--data", "digits", "--out", str(cut), "--steps", "3", "--ckpt-every", "3", *TINY, *plan]) == 0
    assert main(["train", "--out", str(cut), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert log_column(cut, "ar_steps") == [4.0] * 6  # the defaults would draw S from gamma 0.9
    assert log_column(cut) == log_column(straight)
    files = {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()}
    assert main(["train", "--out", str(cut), "--resume", "--steps", "8", "--order", "block", "--no-progress"]) == 2
    assert "plan config differs" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()} == files


def test_sample_defaults_to_the_runs_training_order(tmp_path, capsys):
    run = tmp_path / "block"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "2", *TINY, "--order", "block",
                 "--block", "1"]) == 0  # block 1 = raster, not the block default of 4 tiles
    arrays = {}
    for name, extra in [("default", []), ("explicit", ["--order", "block", "--block", "1"]),
                        ("random", ["--order", "random"])]:
        npz = tmp_path / f"{name}.npz"
        assert main(["sample", "--ckpt", str(run), "--n", "2", "--sample-steps", "3", "--ar-steps", "4",
                     "--out", str(tmp_path / f"{name}.png"), "--npz", str(npz), *extra]) == 0
        arrays[name] = np.load(npz)["arr_0"]
    assert "order block" in capsys.readouterr().out
    assert np.array_equal(arrays["default"], arrays["explicit"])
    assert not np.array_equal(arrays["default"], arrays["random"])
    # the Python API: load_model records the training order, sample defaults to it
    from causalfusion.checkpoint import load_model
    from causalfusion.sampling import sample

    model = load_model(run)
    assert model.trained_order == {"order": "block", "block": 1, "dilation": 2}
    labels = torch.tensor([3, 5])
    assert torch.equal(sample(model, labels, ar_steps=4, steps=2),
                       sample(model, labels, ar_steps=4, steps=2, order="block", block=1))


def test_sampling_a_multimodal_run_says_which_commands_take_it(run_dir, tmp_path, capsys):
    import shutil

    mm = tmp_path / "mm"
    shutil.copytree(run_dir, mm)
    config = json.loads((mm / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({**config, "kind": "multimodal"}))
    assert main(["sample", "--ckpt", str(mm), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "is a multimodal run: use t2i, caption or eval-mm" in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_resume_to_an_earlier_step_is_refused(run_dir, capsys):
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "already at step 3" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--ckpt"], "expected one argument"),
    (["bogus"], "invalid choice"),
    (["sample", "--ckpt", "x", "--n", "two"], "invalid int value"),
    (["train", "--no-such-flag"], "unrecognized arguments"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys)
    assert needle in line and "--help" in line


def test_train_into_existing_run_without_resume_is_refused(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--steps", "5", *TINY]) == 2
    assert "already holds a checkpoint" in one_error_line(capsys)


def test_an_output_directory_without_write_permission_is_refused_before_sampling(run_dir, tmp_path, monkeypatch, capsys):
    import causalfusion.cli.common as common

    monkeypatch.setattr(common.os, "access", lambda path, mode: False)  # (as root, chmod would not stop us)
    assert main(["sample", "--ckpt", str(run_dir), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "no permission to write in" in one_error_line(capsys) and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("file, edit, needle", [
    ("state.json", {"step": None}, "state.json is corrupt (step None)"),
    ("state.json", {"param_groups": "x"}, "param_groups do not fit the optimizer"),
    ("config.json", {"model": []}, "config.json is corrupt ('model' has the wrong type)"),
    ("config.json", {"autoencoder": "x"}, "config.json is corrupt ('autoencoder' has the wrong type)"),
    ("config.json", {"train": "x"}, "config.json is corrupt ('train' has the wrong type)"),
])
def test_run_json_fields_of_the_wrong_type_are_one_line(run_dir, tmp_path, file, edit, needle, capsys):
    bad = copy_run(run_dir, tmp_path / "bad")
    (bad / file).write_text(json.dumps({**json.loads((bad / file).read_text()), **edit}))
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    assert main(["train", "--out", str(bad), "--resume", "--steps", "5", "--no-progress"]) == 2
    assert needle in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before
