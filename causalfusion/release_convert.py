"""The authors' published checkpoint (CausalFusion-L/XL/H, ImageNet, KL-16 latents) -> an inference
folder this library loads (``inference_folder``), so that every command runs on it.

The release saves with ``torch.save`` either a bare state dict or a training checkpoint
``{"model", "ema", "opt", "scheduler", "train_steps", "start_epoch", "args"}`` (``args`` an
``argparse.Namespace``); the EMA weights are used when present. Its architecture is this
library's ``CausalFusion``: the weights map over by renames and reshapes only (``release_key``).
The config comes from the tensor shapes (width, depth, heads from the QK-norm size, MLP ratio,
class tokens, classes, image tokens, patch dim) and ``args`` where present. The release's image
positions are a parameter in the file, its sin-cos channels ordered [column | row]: they are
copied (``learn_pos=True``, ``pos_order="col-row"``).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from .autoencoders import DEFAULTS as AE_DEFAULTS
from .models import CausalFusion, ModelConfig
from .torch_files import load_torch_file

RELEASE_LATENT_DOWNSAMPLE = 16  # the release's sample.py/train.py: latent size = image size // 16 (KL-16)
_TOP = {"x_proj.weight": "input_proj.weight", "x_proj.bias": "input_proj.bias",
        "y_embedder.embedding_table.weight": "class_embed.weight", "cond_pos_embed": "cond_pos",
        "pos_embed": "pos_embed", "final_layer.0.weight": "final_norm.weight", "final_layer.0.bias": "final_norm.bias",
        "final_layer.1.weight": "head.weight", "final_layer.1.bias": "head.bias",
        **{f"t_embedder.mlp.{i}.{p}": f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}}
_BLOCK = {**{f"{n}.{p}": f"{n}.{p}" for n in ("norm1", "norm2", "attn.proj", "attn.q_norm", "attn.k_norm")
             for p in ("weight", "bias")},
          "attn.qkv.weight": "attn.qkv.weight",
          **{f"mlp.fc{j}.{p}": f"mlp.{2 * j - 2}.{p}" for j in (1, 2) for p in ("weight", "bias")}}
_BATCH_DIM = ("cond_pos_embed", "pos_embed")  # [1, N, D] in the release, [N, D] here


class ReleaseFormatError(ValueError):
    """A file that is not (or does not fit) the authors' CausalFusion checkpoint layout."""


def release_key(key: str) -> str:
    """One release parameter name -> this library's ``CausalFusion`` name; any other name is refused."""
    if key in _TOP:
        return _TOP[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m[2] in _BLOCK:
        return f"blocks.{int(m[1])}.{_BLOCK[m[2]]}"
    raise ReleaseFormatError(f"unknown key {key!r}: not a parameter of the CausalFusion release's model")


def read_release_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict, the training ``args`` as a dict ({} for a bare state dict), which weights: "ema",
    "model" or "state dict") of a release checkpoint file, read without running its pickle."""
    obj = load_torch_file(path)
    args: dict = {}
    which = "state dict"
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        which = "ema" if "ema" in obj else "model"
        raw_args = obj.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = vars(raw_args)
        elif isinstance(raw_args, dict):
            args = raw_args
        obj = obj[which]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items()):
        raise ReleaseFormatError(f"{path} is neither a state dict of tensors nor a training checkpoint with "
                                 f"'ema' or 'model' weights")
    return dict(obj), args, which


def _need(state: dict, key: str, ndim: int, path: str | Path) -> torch.Size:
    if key not in state:
        raise ReleaseFormatError(f"{path} lacks {key!r}: not a CausalFusion release checkpoint")
    shape = state[key].shape
    if len(shape) != ndim:
        raise ReleaseFormatError(f"{path}: {key} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def release_model_config(state: dict[str, torch.Tensor], args: dict | None = None, latent_channels: int = 16,
                         path: str | Path = "checkpoint") -> ModelConfig:
    """The ``ModelConfig`` of release weights, from their shapes and the training ``args`` (image size,
    classes). Without ``args`` the latents are taken to have ``latent_channels`` channels (KL-16: 16)."""
    args = args or {}
    for key in state:
        release_key(key)  # unknown names first: they say more than a missing or mis-shaped tensor
    width, patch_dim = _need(state, "x_proj.weight", 2, path)
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    head_dim = _need(state, "blocks.0.attn.q_norm.weight", 1, path)[0] if depth else 0
    mlp_hidden = _need(state, "blocks.0.mlp.fc1.weight", 2, path)[0] if depth else 4 * width
    rows, cond_width = _need(state, "y_embedder.embedding_table.weight", 2, path)
    class_tokens = _need(state, "cond_pos_embed", 3, path)[1]
    num_tokens = _need(state, "pos_embed", 3, path)[1]
    grid = math.isqrt(num_tokens)
    if depth == 0 or head_dim == 0 or width % head_dim or grid * grid != num_tokens:
        raise ReleaseFormatError(f"{path}: {depth} blocks, width {width}, head size {head_dim}, {num_tokens} image "
                                 f"tokens do not make a CausalFusion model")
    if cond_width != class_tokens * width:
        raise ReleaseFormatError(f"{path}: y_embedder.embedding_table.weight has width {cond_width}, expected "
                                 f"{class_tokens} class tokens x {width}")
    num_classes = rows - 1  # the last row is the null class of classifier-free guidance
    if "num_classes" in args and args["num_classes"] != num_classes:
        raise ReleaseFormatError(f"{path}: y_embedder.embedding_table.weight has {rows} rows, expected "
                                 f"num_classes + 1 = {args['num_classes'] + 1} (args.num_classes)")
    if "image_size" in args:  # pixels; the latents are 16x smaller
        latent = int(args["image_size"]) // RELEASE_LATENT_DOWNSAMPLE
        patch = latent // grid
        if patch < 1 or patch * grid != latent or patch_dim % (patch * patch):
            raise ReleaseFormatError(f"{path}: {num_tokens} image tokens of {patch_dim} values do not tile the "
                                     f"{latent}x{latent} latents of args.image_size {args['image_size']}")
        channels = patch_dim // (patch * patch)
    else:
        channels = latent_channels
        patch = math.isqrt(patch_dim // channels) if patch_dim % channels == 0 else 0
        if patch < 1 or patch * patch * channels != patch_dim:
            raise ReleaseFormatError(f"{path}: x_proj takes {patch_dim} values per token, not p*p*{channels} "
                                     f"for {channels}-channel latents (give the latent channels)")
    try:
        return ModelConfig(image_size=grid * patch, in_channels=channels, patch_size=patch, hidden_size=width,
                           depth=depth, num_heads=width // head_dim, mlp_ratio=mlp_hidden / width,
                           num_classes=num_classes, class_tokens=class_tokens, learn_pos=True, pos_order="col-row",
                           qk_norm=True, prediction="eps")
    except ValueError as e:
        raise ReleaseFormatError(f"{path}: {e}") from None


def convert_release_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                          path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Release weights -> this library's ``CausalFusion`` state dict for ``cfg``: every name renamed,
    [1, N, D] positions squeezed; names and shapes checked against the model (one line each)."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in CausalFusion(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = release_key(key)
        if key in _BATCH_DIM and value.ndim == 3 and value.shape[0] == 1:
            value = value[0]
        if new not in want:  # e.g. blocks.40 in a 32-block file with a gap
            raise ReleaseFormatError(f"{path}: {key} does not fit a {cfg.depth}-block model")
        if value.shape != want[new]:
            raise ReleaseFormatError(f"{path}: {key} has shape {list(state[key].shape)}, expected "
                                     f"{list(want[new])} for a {cfg.depth} x {cfg.hidden_size} model")
        out[new] = value
    missing = sorted(set(want) - set(out))
    if missing:
        raise ReleaseFormatError(f"{path} lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]}")
    return out


def release_autoencoder_spec(in_channels: int, vae: str | Path | None = None) -> dict | None:
    """The VAE entry of a converted model's config.json: MAR's KL-16 (``vae``: its diffusers folder, made
    with ``convert-vae``; checked, and its sha256 recorded) or, without ``vae``, KL-16 with no location
    yet (``--vae-path`` at sampling). None for latents that are not KL-16's 16 channels."""
    if vae is not None:
        from .autoencoders import load_autoencoder

        ae = load_autoencoder("kl16", vae)
        if ae.channels != in_channels:
            raise ReleaseFormatError(f"the VAE at {vae} has {ae.channels} latent channels, the model takes {in_channels}")
        return ae.spec()
    if in_channels != AE_DEFAULTS["kl16"]["channels"]:
        return None
    d = AE_DEFAULTS["kl16"]
    return {"kind": "kl16", "channels": d["channels"], "downsample": d["downsample"], "image_channels": 3,
            "path": None, "scale": d["scale"], "shift": 0.0}


def convert_release(ckpt: str | Path, out: str | Path, vae: str | Path | None = None,
                    latent_channels: int = 16) -> Path:
    """Convert the release checkpoint ``ckpt`` into the inference folder ``out`` (config.json,
    model.safetensors, README.md). ``vae``: the KL-16 diffusers folder to record. Returns ``out``.
    Everything is checked before anything is written."""
    from .inference_folder import check_new_folder, model_card, write_inference_folder

    check_new_folder(out)
    state, args, which = read_release_checkpoint(ckpt)
    cfg = release_model_config(state, args, latent_channels, ckpt)
    tensors = convert_release_state(state, cfg, ckpt)
    source = {"converted_from": Path(ckpt).name, "layout": "CausalFusion release", "weights": which,
              **{k: args[k] for k in ("model", "image_size", "num_classes", "train_steps") if k in args}}
    config = {"model": cfg.to_dict(), "autoencoder": release_autoencoder_spec(cfg.in_channels, vae),
              "plan": {"order": "random"},  # the release trains with a random token order per sample
              "source": source}
    title = str(args.get("model") or f"CausalFusion ({cfg.depth} x {cfg.hidden_size})")
    return write_inference_folder(out, config, tensors, model_card(config, title))
