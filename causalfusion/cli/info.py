"""`params`, `configs`, `cache-latents`, `convert-vae` and `demo`: model sizes, paper presets, data prep."""
from __future__ import annotations

import argparse
import dataclasses

from ..configs import PAPER_CONFIGS
from ..models import PRESETS, ModelConfig, count_parameters
from ..trainer import param_count_str
from .common import refuse

def cmd_params(a: argparse.Namespace) -> None:
    if a.depth is not None and a.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {a.depth}")
    if a.ckpt:  # a run directory or an inference folder: the model in its config.json
        from ..checkpoint import CheckpointError, read_run_config

        try:
            cfg = ModelConfig.from_dict(read_run_config(a.ckpt)["model"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{a.ckpt}/config.json has no valid model config ({e})") from None
        n = count_parameters(cfg)
        print(f"{a.ckpt}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
              f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens, "
              f"{cfg.num_classes} classes")
        return
    if a.config:  # a paper configuration: its model, and the count the paper states
        from ..configs import PAPER_PARAMS, get_config

        cfg = get_config(a.config).model_config()
        if a.depth is not None:  # e.g. the release's 48-layer H
            cfg = dataclasses.replace(cfg, depth=a.depth)
        n, paper = count_parameters(cfg), PAPER_PARAMS[a.config]
        print(f"{a.config}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
              f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens; "
              f"paper: {param_count_str(int(paper))} ({100 * (n - paper) / paper:+.1f}%)")
        return
    cfg = ModelConfig.from_preset(a.preset, image_size=a.input_size, in_channels=a.input_channels,
                                  patch_size=a.patch_size, num_classes=a.num_classes, class_tokens=a.class_tokens,
                                  **({"depth": a.depth} if a.depth is not None else {}))
    n = count_parameters(cfg)
    print(f"{a.preset}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
          f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens")


def cmd_configs(a: argparse.Namespace) -> None:
    from ..configs import PAPER_CONFIGS, config_table

    for row in config_table():
        print(PAPER_CONFIGS[row["name"]].describe())
        print(f"    {param_count_str(row['params'])} parameters (paper {param_count_str(int(row['paper_params']))}, "
              f"{row['diff_pct']:+.1f}%); source: {row['source']}")


def cmd_cache_latents(a: argparse.Namespace) -> None:
    from ..configs import get_config
    from ..latent_cache import cache_dataset

    image_size, vae = a.image_size, a.vae
    if a.config:  # the paper configuration's image size and VAE, where not given
        paper = get_config(a.config)
        image_size, vae = image_size or paper.image_size, vae or paper.vae
    index = cache_dataset(a.data, a.out, image_size=image_size, vae=vae, vae_path=a.vae_path,
                          channels=a.channels, flip=not a.no_flip, shard_size=a.shard_size, batch_size=a.batch_size,
                          dtype=a.dtype, device=a.device, progress=not a.no_progress, posterior=not a.means_only)
    if index is not None:
        c, h, w = index["latent_shape"]
        print(f"cached {index['num_images']} images ({index['image_size']}px, {index['autoencoder']['kind']}) as "
              f"{c}x{h}x{w} latents{' + flips' if index['flip'] else ''}{' (posterior mean + std)' if index['posterior'] else ''} in {len(index['shards'])} shards -> {a.out}")


def cmd_convert_vae(a: argparse.Namespace) -> None:
    from ..autoencoders import convert_ldm_vae

    if (a.src is None) == (a.ldm is None):
        raise ValueError("give the VAE weights once: convert-vae kl16.ckpt --out DIR")
    out = convert_ldm_vae(a.src or a.ldm, a.out)
    print(f"wrote {out} (use --vae kl16 --vae-path {out})")


def cmd_demo(a: argparse.Namespace) -> None:
    from ..demo import run_demo

    res = run_demo(a.out, steps=a.steps, resume=a.resume)
    print(f"demo: {res['step']} steps; checkpoint in {res['out']} (use --ckpt {res['out']})")
    print(f"samples: {res['grid']}; per-step grids in {res['out']}/samples/")
    print(f"classifier reads {100 * res['accuracy']:.1f}% of the class-conditional samples as the requested digit")


def add_parser(sub) -> None:
    q = sub.add_parser("params", help="parameter count of a preset (no weights allocated)")
    q.add_argument("--preset", default="L", choices=list(PRESETS), help="model size")
    q.add_argument("--input-size", type=int, default=32, help="side of the model's input grid (ImageNet 256 with SD-VAE latents: 32)")
    q.add_argument("--input-channels", type=int, default=4, help="channels of the model's input (SD-VAE latents: 4)")
    refuse(q, "--image-size", "--image-size means pixels elsewhere; the model's input side here is --input-size")
    refuse(q, "--channels", "--channels means image channels elsewhere; the model's input channels here are --input-channels")
    q.add_argument("--patch-size", type=int, default=2, help="pixels (or latent cells) per token side")
    q.add_argument("--num-classes", type=int, default=1000, help="number of classes")
    q.add_argument("--class-tokens", type=int, default=64, help="C in-context class tokens")
    q.add_argument("--depth", type=int, default=None, help="override the number of layers (e.g. 48: the release's H; default: the preset's)")
    q.add_argument("--config", default=None, choices=list(PAPER_CONFIGS),
                   help="count a paper configuration instead (compared with the paper's number)")
    q.add_argument("--ckpt", default=None, help="count the model of a run directory or inference folder instead")
    q.set_defaults(func=cmd_params)

    g = sub.add_parser("configs", help="list the paper configurations (--config) with parameter counts")
    g.set_defaults(func=cmd_configs)

    c = sub.add_parser("cache-latents", help="encode a dataset once into a latent cache (sharded safetensors)")
    c.add_argument("--data", required=True, help="'folder:PATH' (ImageFolder tree) or 'digits'")
    c.add_argument("--out", required=True, help="cache directory (an unfinished cache there is continued)")
    c.add_argument("--config", default=None, choices=list(PAPER_CONFIGS), help="take image size and VAE from a paper config")
    c.add_argument("--image-size", type=int, default=None, help="center-crop size in pixels (ADM crop; default: --config's, else 32)")
    c.add_argument("--vae", default=None, choices=["identity", "sd-vae", "kl16"],
                   help="the autoencoder (default: --config's, else identity)")
    c.add_argument("--vae-path", default=None, help="diffusers AutoencoderKL directory or cached repo id (default: none)")
    c.add_argument("--channels", type=int, default=3, help="image channels: 1 (grey) or 3 (RGB)")
    c.add_argument("--no-flip", action="store_true", help="do not also cache the horizontally flipped images")
    c.add_argument("--means-only", action="store_true",
                   help="store only the posterior means (half the disk; training then sees no posterior noise)")
    c.add_argument("--shard-size", type=int, default=2048, help="images per shard file")
    c.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage type of the latents")
    c.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_cache_latents)

    v = sub.add_parser("convert-vae", help="MAR's kl16.ckpt (or LDM VAE weights as .safetensors) -> diffusers directory")
    v.add_argument("src", nargs="?", default=None, metavar="WEIGHTS",
                   help="MAR's kl16.ckpt as published, or an LDM-format state dict as .safetensors")
    v.add_argument("--ldm", default=None, help="the same as WEIGHTS (default: none)")
    v.add_argument("--out", required=True, help="output directory (config.json + diffusion_pytorch_model.safetensors)")
    v.set_defaults(func=cmd_convert_vae)

    d = sub.add_parser("demo", help="train the digits demo and write sample grids")
    d.add_argument("--out", default="runs/demo", help="run directory")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 1200)")
    d.add_argument("--resume", action="store_true", help="continue the demo in --out (or re-write its grid)")
    d.set_defaults(func=cmd_demo)
