"""Command line: parses arguments and calls the library. No modelling logic lives here."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
import torch

from .ar_plan import ORDERS, WEIGHTINGS, ARPlanConfig
from .checkpoint import CheckpointError, load_model, read_config
from .models import PRESETS, ModelConfig, count_parameters
from .trainer import TrainConfig, Trainer, param_count_str

USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, FloatingPointError, KeyError)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    return lo, hi


# ---- train ------------------------------------------------------------------------------------
MODEL_ARGS = ("patch_size", "class_tokens", "class_repeat", "learn_pos", "image_size", "depth", "hidden_size", "num_heads")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' (built in) or 'folder:PATH' (ImageFolder tree)")
    p.add_argument("--out", default="runs/train", help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--image-size", type=int, default=None, help="folder data: resize/crop to this size")
    p.add_argument("--channels", type=int, default=None, help="folder data: 1 (grey) or 3 (RGB, default)")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--hidden-size", type=int, default=None, help="override the preset's width")
    p.add_argument("--num-heads", type=int, default=None, help="override the preset's heads")
    p.add_argument("--class-tokens", type=int, default=None)
    p.add_argument("--class-repeat", type=int, default=None)
    p.add_argument("--learn-pos", action="store_true", default=None, help="learnable positional embedding")
    p.add_argument("--gamma", type=float, default=0.9, help="P(S) ∝ gamma^(S-1); 1 = uniform, 0 = In-context DiT")
    p.add_argument("--ar-steps", type=int, default=0, help="fixed number of AR steps with equal groups (Tab. 2)")
    p.add_argument("--order", default="random", choices=ORDERS)
    p.add_argument("--block", type=int, default=4, help="tile size of the block order")
    p.add_argument("--dilation", type=int, default=2, help="stride of the dilated order")
    p.add_argument("--lam", type=float, default=2.0, help="AR loss weight at the first step (falls to 1)")
    p.add_argument("--weighting", default="release", choices=WEIGHTINGS)
    p.add_argument("--t-per-step", action="store_true", help="draw t per AR step instead of per sample")
    p.add_argument("--t-copies", type=int, default=1, help="K timesteps per sample sharing the clean tokens (Tab. 7)")
    for f in fields(TrainConfig):
        if f.name in ("data", "out", "image_size", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(f.default) if f.default is not None else str, default=None)
    p.add_argument("--no-progress", action="store_true")


def model_config_from_args(a: argparse.Namespace, saved: dict | None, num_classes: int, image_size: int, channels: int) -> ModelConfig:
    """Model config: the saved one when resuming, overridden by what was given explicitly."""
    base = saved or {**PRESETS[a.preset or "tiny"], "image_size": image_size, "in_channels": channels,
                     "num_classes": num_classes, "patch_size": 2 if image_size <= 16 else 4}
    if saved and a.preset:
        base = {**base, **PRESETS[a.preset]}
    given = {k: getattr(a, k) for k in MODEL_ARGS if getattr(a, k) is not None}
    return ModelConfig.from_dict({**base, **given})


def cmd_train(a: argparse.Namespace) -> None:
    from .data import load_dataset

    saved = read_config(a.out) if a.resume else None
    train_kw = {**(saved or {}).get("train", {})} if saved else {}
    train_kw.update({f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None})
    train_kw.update(data=a.data if not saved else train_kw.get("data", a.data), out=a.out, progress=not a.no_progress)
    if a.image_size is not None:
        train_kw["image_size"] = a.image_size
    tc = TrainConfig.from_dict(train_kw)
    dataset = load_dataset(tc.data, tc.image_size, a.channels or 3)
    mc = model_config_from_args(a, saved and saved.get("model"), dataset.num_classes, dataset.image_size, dataset.channels)
    plan = ARPlanConfig(gamma=a.gamma, fixed_steps=a.ar_steps, order=a.order, block=a.block, dilation=a.dilation,
                        lam=a.lam, weighting=a.weighting, t_per_step=a.t_per_step, t_copies=a.t_copies)
    trainer = Trainer(mc, plan, tc, resume=a.resume, dataset=dataset)
    print(f"model {param_count_str(sum(p.numel() for p in trainer.model.parameters()))} params, "
          f"{mc.num_tokens} tokens, data {dataset.name} ({len(dataset)} images) -> {tc.out}")
    trainer.train()
    print(f"done: step {trainer.step}, checkpoint and samples in {tc.out}")


# ---- sample -----------------------------------------------------------------------------------
def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    classes = _int_list(text)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--class {text}: class ids must be in 0..{num_classes - 1}")
    return classes


def cmd_sample(a: argparse.Namespace) -> None:
    from .images import save_grid, save_npz
    from .sampling import sample_one_step

    model = load_model(a.ckpt, ema=not a.raw)
    nc = model.cfg.num_classes
    classes = [nc] if a.uncond else parse_classes(a.cls, nc)
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    labels = torch.tensor(classes).repeat(-(-a.n // len(classes)))[: a.n].sort(stable=True).values
    chunks = []
    for start in range(0, a.n, a.batch_size):
        chunks.append(sample_one_step(model, labels[start:start + a.batch_size], steps=a.steps, cfg=a.cfg,
                                      cfg_interval=a.cfg_interval, seed=a.seed, first_index=start, progress=True))
    images = torch.cat(chunks)
    nrow = a.n // len(classes) if a.n % len(classes) == 0 and len(classes) > 1 else max(1, int(a.n ** 0.5))
    save_grid(images, a.out, nrow=nrow, scale=4 if model.cfg.image_size <= 16 else 1)
    print(f"wrote {a.out}")
    if a.npz:
        save_npz(images, labels, a.npz)
        print(f"wrote {a.npz} ({a.n} images)")


# ---- params / demo ----------------------------------------------------------------------------
def cmd_params(a: argparse.Namespace) -> None:
    cfg = ModelConfig.from_preset(a.preset, image_size=a.image_size, in_channels=a.channels,
                                  patch_size=a.patch_size, num_classes=a.num_classes, class_tokens=a.class_tokens)
    n = count_parameters(cfg)
    print(f"{a.preset}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
          f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens")


def cmd_demo(a: argparse.Namespace) -> None:
    from .demo import run_demo

    res = run_demo(a.out, steps=a.steps, resume=a.resume)
    print(f"demo: {res['step']} steps; checkpoint in {res['out']} (use --ckpt {res['out']})")
    print(f"samples: {res['grid']}; per-step grids in {res['out']}/samples/")
    print(f"classifier reads {100 * res['accuracy']:.1f}% of the class-conditional samples as the requested digit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causalfusion", description="Causal Diffusion Transformers (CausalFusion)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--ckpt", required=True, help="run directory written by train/demo")
    s.add_argument("--class", dest="cls", default=None, help="class id(s), comma separated (default: all)")
    s.add_argument("--uncond", action="store_true", help="sample with the null class")
    s.add_argument("--n", type=int, default=100, help="number of images")
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--cfg-interval", type=_pair, default=(0.0, 1000.0), help="guide only for t in [LO,HI)")
    s.add_argument("--steps", type=int, default=250, help="diffusion steps (respaced DDPM)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npz", default=None, help="also write ADM-format .npz (arr_0 uint8 NHWC, labels)")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("params", help="parameter count of a preset (no weights allocated)")
    q.add_argument("--preset", default="L", choices=list(PRESETS))
    q.add_argument("--image-size", type=int, default=32, help="latent size (ImageNet 256 with SD-VAE: 32)")
    q.add_argument("--channels", type=int, default=4)
    q.add_argument("--patch-size", type=int, default=2)
    q.add_argument("--num-classes", type=int, default=1000)
    q.add_argument("--class-tokens", type=int, default=64)
    q.set_defaults(func=cmd_params)

    d = sub.add_parser("demo", help="train the digits demo and write sample grids")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"causalfusion {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
