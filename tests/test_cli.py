"""The command line: happy paths write what they promise; bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from causalfusion.cli import main

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "8",
        "--sample-every", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "3", *TINY]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_sample_writes_grid_and_adm_npz(run_dir, tmp_path):
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run_dir), "--class", "3,7", "--n", "4", "--steps", "5",
                 "--out", str(png), "--npz", str(npz)]) == 0
    assert Image.open(png).size[0] > 8
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 8, 8, 1)
    assert data["labels"].dtype == np.int64 and sorted(data["labels"].tolist()) == [3, 3, 7, 7]


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
])
def test_bad_input_is_one_line_and_writes_nothing(argv, needle, run_dir, tmp_path, capsys):
    (tmp_path / "empty_class").mkdir()
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    assert needle in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_corrupt_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "ema.safetensors").write_bytes(b"\x00garbage")
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "corrupt" in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_resume_with_other_model_config_is_refused(run_dir, capsys):
    before = (run_dir / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "5", *TINY[:2], "--hidden-size", "64"]) == 2
    assert "model config differs" in one_error_line(capsys)
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_train_into_existing_run_without_resume_is_refused(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--steps", "5", *TINY]) == 2
    assert "already holds a checkpoint" in one_error_line(capsys)
