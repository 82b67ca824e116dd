"""Inference folders: a model to sample, edit and evaluate, without training state.

::

    config.json         the model config (as in a run directory), the VAE it decodes with, its token order
    model.safetensors   the weights (a run's EMA weights, or converted ones)
    README.md           a short model card

``load_model`` / ``--ckpt`` take such a folder wherever they take a run directory (``--raw`` aside:
it holds one set of weights). ``export_run`` writes one from a training run; ``release_convert``
from the authors' published checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .files import check_dir_path, write_json, write_text

FORMAT = "causalfusion-inference"
WEIGHTS = "model.safetensors"
FILES = ("config.json", WEIGHTS, "README.md")
_TRAINING_FILES = ("state.json", "ema.safetensors", "train.safetensors")


def is_inference_folder(path: str | Path, config: dict | None = None) -> bool:
    """A folder whose config.json (``config``) says it is one, or that holds model.safetensors and
    neither training state nor a "train" config section (a hand-made folder). A training run torn
    before its first state.json is never taken for one: its config has a "train" section."""
    path = Path(path)
    if config is not None and config.get("format") == FORMAT:
        return True
    return ((path / WEIGHTS).is_file() and not any((path / f).exists() for f in _TRAINING_FILES)
            and config is not None and "train" not in config)


def read_folder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an inference folder's model.safetensors."""
    from .checkpoint import read_tensors

    return read_tensors(Path(path) / WEIGHTS)


def check_new_folder(out: str | Path) -> None:
    """Refuse (one line) an ``--out`` that cannot be made, or that already holds a model."""
    check_dir_path(out)
    taken = [f for f in (*FILES, *_TRAINING_FILES) if (Path(out) / f).exists()]
    if taken:
        raise ValueError(f"--out {out} already holds {taken[0]}; give a new directory")


def write_inference_folder(out: str | Path, config: dict, tensors: dict[str, torch.Tensor], card: str) -> Path:
    """Write ``config`` (marked as an inference folder), ``tensors`` and the model ``card`` into ``out``."""
    from safetensors.torch import save_file

    from .files import atomic_path

    check_new_folder(out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", {**config, "format": FORMAT}, sort_keys=True)
    write_text(out / "README.md", card)
    return out


def model_card(config: dict, title: str) -> str:
    """A short README.md: what the model is, where it came from, how to run it."""
    from .models import ModelConfig, count_parameters

    cfg = ModelConfig.from_dict(config["model"])
    ae = config.get("autoencoder") or {}
    latent = f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}"
    vae = (f"{ae['kind']} VAE latents ({latent}); VAE weights: {ae.get('path') or 'give --vae-path DIR'}"
           if ae.get("kind", "identity") != "identity" else f"pixels ({latent})")
    source = config.get("source") or {}
    origin = ", ".join(f"{k} {v}" for k, v in source.items())
    n = count_parameters(cfg)
    return "\n".join([
        "---", "library_name: causalfusion", "pipeline_tag: unconditional-image-generation",
        "tags: [causalfusion, diffusion, autoregressive, class-conditional]", "---", "",
        f"# {title}", "",
        f"CausalFusion model: {cfg.depth} layers x {cfg.hidden_size} wide x {cfg.num_heads} heads, "
        f"{n:,} parameters, {cfg.num_classes} classes, {cfg.num_cond} class tokens, "
        f"{cfg.num_tokens} image tokens of {vae}.",
        *([f"Source: {origin}."] if origin else []), "",
        "Files: `config.json` (model, VAE, token order), `model.safetensors` (weights).", "",
        "```", "causalfusion sample --ckpt THIS_FOLDER --class 0 --n 4 --ar-steps 1 --out samples.png",
        "causalfusion edit --ckpt THIS_FOLDER --image photo.png --mask center --class 0 --out edit.png", "```", ""])


def export_run(run: str | Path, out: str | Path) -> Path:
    """Write the inference folder ``out`` from the training run (or inference folder) ``run``: its
    EMA weights as model.safetensors, its config.json (VAE reference, token order) and a card."""
    from .checkpoint import read_part, read_run_config

    check_new_folder(out)
    run = Path(run)
    config = read_run_config(run)
    if is_inference_folder(run, config):
        tensors, step = read_folder_weights(run), (config.get("source") or {}).get("step")
    else:
        state, tensors, _ = read_part(run, "ema")
        step = state["step"]
    source = {**(config.get("source") or {}), "exported_from": run.resolve().name, "step": step}
    config = {**config, "source": source}
    return write_inference_folder(out, config, tensors, model_card(config, run.resolve().name))
