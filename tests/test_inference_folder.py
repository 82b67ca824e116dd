"""Inference folders: `export` of a run samples bit-identically to the run; a converted release
model with a tiny random KL-16 VAE runs `sample` (RGB PNGs), `edit --image`, `params`; MAR's
kl16.ckpt as published converts to the same VAE its .safetensors form gives, and to what an
LDM-layout model computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, one_error_line, save_run, save_tiny_vae
from release_layout import release_state, save_release

from causalfusion.checkpoint import load_model
from causalfusion.cli import build_parser, main


def steps_flag() -> str:
    """The flag `sample`/`edit` take for diffusion steps per AR step."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["sample"]
    return "--sample-steps" if any("--sample-steps" in a.option_strings for a in sub._actions) else "--steps"


def test_export_samples_bit_identically_to_the_run(tmp_path, capsys):
    run = save_run(make_tiny_model(seed=2), tmp_path / "run")
    assert main(["export", str(run), "--out", str(tmp_path / "folder")]) == 0
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    arrays = []
    for ckpt in (run, tmp_path / "folder"):
        npz = tmp_path / f"{ckpt.name}.npz"
        assert main(["sample", "--ckpt", str(ckpt), "--n", "3", "--ar-steps", "2", steps_flag(), "3", "--seed", "5",
                     "--out", str(tmp_path / f"{ckpt.name}.png"), "--npz", str(npz)]) == 0
        arrays.append(np.load(npz)["arr_0"])
    assert np.array_equal(*arrays) and arrays[0].std() > 0
    a, b = load_model(run), load_model(tmp_path / "folder")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "folder"), "--raw", "--n", "1"]) == 2
    assert "--raw" in one_error_line(capsys)
    assert main(["export", str(run), "--out", str(tmp_path / "folder")]) == 2  # never overwritten
    assert "already holds" in one_error_line(capsys)


def test_a_torn_training_run_is_not_read_as_an_inference_folder(tmp_path):
    from causalfusion.checkpoint import CheckpointError, write_config

    run = save_run(make_tiny_model(), tmp_path / "run")
    write_config(run, {"model": make_tiny_model().cfg.to_dict(), "train": {"steps": 1}})
    (run / "state.json").unlink()
    for f in run.glob("*.safetensors"):  # a run torn before its first commit: one fixed-name weights file
        f.rename(run / "model.safetensors") if f.name.startswith("model.") else f.unlink()
    with pytest.raises(CheckpointError, match="state.json"):
        load_model(run)


def save_tiny_kl16(path, seed=0):
    """A random 2x AutoencoderKL with KL-16's 16 latent channels (what `--vae kl16` loads)."""
    save_tiny_vae(path, latent_channels=16, seed=seed, sample_size=8)
    return path


def test_every_command_runs_on_a_converted_release_model(tmp_path, capsys):
    from PIL import Image

    pytest.importorskip("diffusers")
    state = release_state(tokens=16, patch_dim=16)  # 16-channel 4x4 latents -> 8x8 RGB through the 2x VAE
    save_release(tmp_path / "ck.pt", state)
    vae = save_tiny_kl16(tmp_path / "vae")
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m"), "--vae-path", str(vae)]) == 0
    m = str(tmp_path / "m")
    for s in ("1", "4"):
        out = tmp_path / f"s{s}.png"
        assert main(["sample", "--ckpt", m, "--class", "1,2", "--n", "2", "--ar-steps", s, steps_flag(), "2",
                     "--cfg", "2", "--out", str(out)]) == 0
        img = Image.open(out)
        assert img.mode == "RGB" and np.asarray(img).std() > 0
    photo = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    assert main(["edit", "--ckpt", m, "--image", str(tmp_path / "photo.png"), "--mask", "center", "--class", "3",
                 "--n", "2", "--ar-steps", "2", steps_flag(), "2", "--out", str(tmp_path / "edit.png"),
                 "--npz", str(tmp_path / "edit.npz")]) == 0
    edits = np.load(tmp_path / "edit.npz")["arr_0"]
    assert edits.shape == (2, 8, 8, 3) and Image.open(tmp_path / "edit.png").mode == "RGB"
    assert main(["eval", "--ckpt", m, "--n", "4", "--ar-steps", "1,2", steps_flag(), "2",
                 "--json", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["ar_steps"] for r in rows] == [1, 2] and all(np.isfinite(r["fid"]) for r in rows)
    capsys.readouterr()
    assert main(["params", "--ckpt", m]) == 0
    assert f"{sum(v.numel() for v in state.values()):,} parameters" in capsys.readouterr().out


def test_release_model_without_a_vae_asks_for_one(tmp_path, capsys):
    save_release(tmp_path / "ck.pt", release_state())
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "m"), "--n", "1", steps_flag(), "1"]) == 2
    assert "--vae-path" in one_error_line(capsys)


def test_mar_kl16_ckpt_converts_like_its_safetensors_and_the_ldm_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from test_autoencoders import _LDMVAE, _tiny_kl16_config

    import causalfusion.autoencoders as autoencoders
    from causalfusion.autoencoders import load_autoencoder

    torch.manual_seed(0)
    ldm = _LDMVAE().eval()
    with torch.no_grad():
        for mod in ldm.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    torch.save({"model": ldm.state_dict()}, tmp_path / "kl16.ckpt")  # MAR's layout: {"model": LDM state dict}
    save_file(ldm.state_dict(), str(tmp_path / "kl16.safetensors"))
    monkeypatch.setattr(autoencoders, "kl16_config", _tiny_kl16_config)  # the CLI converts to kl16_config()
    assert main(["convert-vae", str(tmp_path / "kl16.ckpt"), "--out", str(tmp_path / "a")]) == 0
    assert main(["convert-vae", "--ldm", str(tmp_path / "kl16.safetensors"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_autoencoder("kl16", tmp_path / "a"), load_autoencoder("kl16", tmp_path / "b")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x)) and torch.equal(a.decode(z), b.decode(z))
        torch.testing.assert_close(a.encode(x), ldm.encode_mean(x) * 0.2325, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.decode(z * 0.2325), ldm.decode(z).clamp(-1, 1), atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    data = (tmp_path / "kl16.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    assert main(["convert-vae", str(tmp_path / "cut.ckpt"), "--out", str(tmp_path / "c")]) == 2
    assert "truncated" in one_error_line(capsys) and not (tmp_path / "c").exists()
