"""Shared fixtures: tiny CausalFusion models with a *random* output head.

The real head is zero-initialised (so every prediction is exactly 0), which would make any
"this input does / does not change the output" test vacuous; ``make_tiny_model`` overwrites it.
"""
from __future__ import annotations

import pytest
import torch

from causalfusion.models import CausalFusion, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                num_classes=5, class_tokens=2, class_repeat=1)
    base.update(overrides)
    return ModelConfig(**base)


def randomize_head(model: CausalFusion, seed: int = 0) -> CausalFusion:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.5)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g) * 0.1)
        # the condition positions start near zero; make the class tokens clearly distinct
        model.class_embed.weight.copy_(torch.randn(model.class_embed.weight.shape, generator=g))
    return model


def make_tiny_model(seed: int = 0, **overrides) -> CausalFusion:
    torch.manual_seed(seed)
    model = CausalFusion(tiny_config(**overrides)).eval()
    return randomize_head(model, seed)


@pytest.fixture
def tiny_model() -> CausalFusion:
    return make_tiny_model()


def one_error_line(capsys) -> str:
    """The CLI's stderr after a refused input: exactly one line (returned)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def save_run(model: CausalFusion, out):
    """A run directory holding ``model`` (as weights and EMA) at step 1, as the CLI reads it."""
    from causalfusion.checkpoint import save_checkpoint, write_config

    write_config(out, {"model": model.cfg.to_dict()})
    save_checkpoint(out, 1, model, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {})
    return out


def log_column(run, name: str = "loss") -> list[float]:
    """One column of a run's log.csv, as floats."""
    import csv

    with open(run / "log.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f)]


def save_tiny_vae(path, latent_channels=4, seed=0, attn_last=False, sample_size=16):
    """A 2-level (2x) AutoencoderKL with random weights, saved as config.json + safetensors; returns it."""
    import diffusers

    torch.manual_seed(seed)
    down = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D" if attn_last else "DownEncoderBlock2D")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=down,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size)
    vae.save_pretrained(str(path))
    return vae
