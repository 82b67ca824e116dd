"""Multimodal subcommands (train-mm, t2i, caption, eval-mm): parse and call.

``causalfusion ablate --suite multimodal`` is parsed in ``cli/evaluate.py`` and runs
``causalfusion.multimodal.ablation.run_suite``.

``add_commands(sub)`` registers them on the main ``causalfusion`` parser; errors are ValueErrors
(or CheckpointErrors) that ``causalfusion.cli.main`` prints as one line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..ar_plan import ORDERS
from ..diffusion import PREDICTIONS
from ..models import PRESETS
from ..devices import check_device
from .common import STEPS_HINT, add_order_args, check_outputs, fill_trained_order, ints, parse_interval, refuse
from .train import given_flags


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size")
    p.add_argument("--depth", type=int, default=None, help="override the preset's number of layers (default: the preset's)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the preset's width (default: the preset's)")
    p.add_argument("--num-heads", type=int, default=None, help="override the preset's heads (default: the preset's)")
    p.add_argument("--patch-size", type=int, default=4, help="pixels per token side")
    p.add_argument("--image-size", type=int, default=16, help="image side in pixels")
    p.add_argument("--prediction", default="eps", choices=PREDICTIONS,
                   help="eps (paper) or v; v is what makes 16-px pixel-space shapes train in minutes")
    p.add_argument("--max-text-len", type=int, default=35, help="text slot T incl. <bos>/<eos> (paper: 35)")
    p.add_argument("--tie-head", action="store_true", help="tie the LM head to the token embedding")
    p.add_argument("--transfusion", action="store_true",
                   help="Transfusion baseline: image-first captions attend to the noised image tokens, and images "
                        "train under the standard diffusion loss (--gamma 0 --lam 1 unless given)")
    p.add_argument("--image-first-prob", type=float, default=0.1, help="share of image-first (captioning) sequences")
    p.add_argument("--text-weight", type=float, default=0.01, help="text loss weight relative to the image loss")
    p.add_argument("--gamma", type=float, default=None,
                   help="P(S) ∝ gamma^(S-1) (0: plain diffusion; default 0.9, with --transfusion 0)")
    p.add_argument("--order", default="random", choices=ORDERS, help="token order of the image's AR steps")
    p.add_argument("--lam", type=float, default=None, help="AR loss weight of the first step (default 2, with --transfusion 1)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="shapes", help="'shapes', 'shapes:SPLIT:N' or 'jsonl:FILE' (image paths relative to it)")
    p.add_argument("--out", default="runs/mm", help="run directory (checkpoints, logs, tokenizer.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: train a BPE on the captions)")
    p.add_argument("--bpe-vocab", type=int, default=512, help="vocabulary size of the BPE trained on the captions")
    p.add_argument("--steps", type=int, default=2000, help="training steps (optimizer updates)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights that sample")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps (the release's class-conditional train.py: 1e-15)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 (autocast)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order, plans and noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between two checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)


def cmd_train_mm(a: argparse.Namespace) -> None:
    from ..multimodal.run_config import SETTINGS, train_mm_configs
    from ..multimodal.train import MMTrainer

    given = given_flags(getattr(a, "argv", []), add_train_args)  # flags typed, not left at their defaults
    settings = {k: v for k, v in given.items() if k in SETTINGS}
    configs = train_mm_configs(a.out, a.resume, progress=not a.no_progress, **settings)
    trainer = MMTrainer(*configs, resume=a.resume)
    n = sum(p.numel() for p in trainer.model.parameters())
    print(f"model {n / 1e6:.2f}M params, {trainer.model_cfg.num_tokens} image tokens + {trainer.text_cfg.max_text_len} "
          f"text slots, vocab {trainer.text_cfg.vocab_size}, {'Transfusion' if trainer.text_cfg.transfusion else 'CausalFusion'}"
          f" captions, data {trainer.dataset.name} -> {trainer.out}")
    trainer.train()
    print(f"done: step {trainer.step}; checkpoint and tokenizer.json in {trainer.out}")


def check_sampling(a: argparse.Namespace) -> None:
    """t2i/eval-mm's --n, --sample-steps and --cfg, before the checkpoint loads (and eval-mm's FID net trains)."""
    from ..sampling import check_cfg

    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    if a.sample_steps < 1:
        raise ValueError(f"--sample-steps must be >= 1 (diffusion steps per AR step), got {a.sample_steps}")
    check_cfg(a.cfg, (0, 1000))


def cmd_t2i(a: argparse.Namespace) -> None:
    from ..images import grid_columns, save_grid
    from ..multimodal.generate import text_to_image
    from ..multimodal.train import load_multimodal

    a.out = a.out if a.out is not None else str(Path(a.ckpt) / "t2i.png")
    check_outputs(a.out)
    check_sampling(a)
    check_device(a.device)
    groups = ints(a.groups, "--groups") if a.groups is not None else None
    interval = parse_interval(a.cfg_interval)
    model, tok = load_multimodal(a.ckpt, ema=not a.raw, device=a.device)
    fill_trained_order(a, model)
    prompts = [p for p in a.prompt for _ in range(a.n)]
    images = text_to_image(model, tok, prompts, cfg=a.cfg, cfg_interval=interval,
                           ar_steps=a.ar_steps, groups=groups, order=a.order, block=a.block, dilation=a.dilation,
                           steps=a.sample_steps, sampler=a.sampler, seed=a.seed, cache=not a.no_cache).cpu()
    save_grid(images, a.out, nrow=grid_columns(len(images), a.n))  # one row per prompt where not too narrow
    print(f"wrote {a.out}: {len(a.prompt)} prompt(s) x {a.n} (one row per prompt)")
    if a.check_shapes:
        from ..multimodal.shapes import detect_objects, parse_caption

        for i, p in enumerate(a.prompt):
            want = parse_caption(p)
            ok = sum(detect_objects(img) == want for img in images[i * a.n:(i + 1) * a.n])
            print(f"checker: {ok}/{a.n} images show exactly {sorted(want) or 'nothing it can parse'} for {p!r}")


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG/JPEG -> [3, size, size] in [-1, 1]; refuses other sizes (no silent resizing)."""
    from ..data import open_image

    img = open_image(path, "image").convert("RGB")  # not-an-image / truncated: one line, not a PIL traceback
    if img.size != (size, size):
        raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]}; this model captions {size}x{size} images")
    return torch.from_numpy(np.asarray(img, np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def cmd_caption(a: argparse.Namespace) -> None:
    from ..multimodal.generate import caption, check_decoding
    from ..multimodal.train import load_multimodal

    if a.top_k is not None and a.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (leave it out for all tokens), got {a.top_k}")
    check_decoding(a.temperature, a.top_k or 0)
    check_device(a.device)
    model, tok = load_multimodal(a.ckpt, ema=not a.raw, device=a.device)
    images = torch.stack([load_image(p, model.cfg.image_size) for p in a.image])
    texts = caption(model, tok, images, temperature=a.temperature, top_k=a.top_k or 0, seed=a.seed)
    for path, text in zip(a.image, texts):
        print(f"{path}\t{text}")


def cmd_eval_mm(a: argparse.Namespace) -> None:
    from ..multimodal.evaluate import ShapesExtractor, evaluate_model
    from ..multimodal.train import load_multimodal

    check_sampling(a)
    check_device(a.device)
    model, tok = load_multimodal(a.ckpt, device=a.device)
    ext = ShapesExtractor(model.cfg.image_size, device=a.device) if a.fid else None
    metrics, _, _ = evaluate_model(model, tok, a.split, a.n, cfg=a.cfg, steps=a.sample_steps, ar_steps=a.ar_steps,
                                     seed=a.seed, extractor=ext)
    print(json.dumps(metrics, indent=2))


def add_commands(sub) -> None:
    t = sub.add_parser("train-mm", help="train a multimodal (text + image) CausalFusion")
    add_train_args(t)
    t.set_defaults(func=cmd_train_mm)

    s = sub.add_parser("t2i", help="text-to-image with a multimodal checkpoint")
    s.add_argument("--ckpt", required=True, help="run directory written by train-mm")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several; required)")
    s.add_argument("--n", type=int, default=8, help="images per prompt")
    s.add_argument("--cfg", type=float, default=3.0, help="guidance against the text-free image model (1 = none)")
    s.add_argument("--cfg-interval", default="0,1000", help="guide only for t in [LO,HI)")
    s.add_argument("--ar-steps", type=int, default=None, help="S AR steps, equal groups (default 1)")
    s.add_argument("--groups", default=None, help="explicit group sizes, e.g. 4,4,8 (default: none, --ar-steps)")
    add_order_args(s)
    s.add_argument("--sample-steps", type=int, default=50, help="diffusion steps per AR step")
    refuse(s, "--steps", STEPS_HINT)
    s.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ddpm (ancestral) or ddim")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step (reference)")
    s.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    s.add_argument("--check-shapes", action="store_true", help="shapes prompts: run the colour-segmentation checker")
    refuse(s, "--check", "--check: the shapes checker is --check-shapes")
    s.add_argument("--out", default=None, help="PNG grid, one row per prompt (default: CKPT/t2i.png)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.set_defaults(func=cmd_t2i)

    c = sub.add_parser("caption", help="caption images with a multimodal checkpoint")
    c.add_argument("--ckpt", required=True, help="run directory written by train-mm")
    c.add_argument("--image", action="extend", nargs="+", required=True,
                   help="image(s) of the model's size: --image a.png b.png, or --image repeated")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (default: all)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (--temperature > 0)")
    c.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    c.add_argument("--device", default="cpu", help="cpu or cuda")
    c.set_defaults(func=cmd_caption)

    e = sub.add_parser("eval-mm", help="shapes metrics of a multimodal checkpoint (T2I/caption accuracy, CIDEr, FID)")
    e.add_argument("--ckpt", required=True, help="run directory written by train-mm")
    e.add_argument("--split", default="test", choices=["test", "heldout", "train"], help="which shapes prompts and images")
    e.add_argument("--n", type=int, default=256, help="number of prompts and of images")
    e.add_argument("--cfg", type=float, default=3.0, help="guidance against the text-free image model (1 = none)")
    e.add_argument("--sample-steps", type=int, default=50, help="diffusion steps per AR step")
    refuse(e, "--steps", STEPS_HINT)
    e.add_argument("--ar-steps", type=int, default=None, help="S AR steps for the T2I samples (default 1)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--fid", action="store_true", help="also FID (trains/caches the small feature CNN once)")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.set_defaults(func=cmd_eval_mm)
