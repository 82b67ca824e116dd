"""`causalfusion train`: every training option; the given ones go to ``run_config.train_configs``,
its configs to the Trainer."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..ar_plan import ORDERS, WEIGHTINGS
from ..configs import PAPER_CONFIGS
from ..diffusion import PREDICTIONS
from ..models import PRESETS
from ..trainer import TrainConfig, param_count_str
from .common import ints, refuse


def _on_off(text: str) -> bool:
    """'on'/'off' (also true/false, 1/0) for the boolean fields of TrainConfig, e.g. --ema-warmup off."""
    v = text.strip().lower()
    if v not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return v in ("on", "true", "1")


TRAIN_HELP = {  # the TrainConfig fields that become flags of `train`
    "steps": "training steps (optimizer updates)",
    "batch_size": "global batch size (images per step over all processes)",
    "lr": "peak learning rate (AdamW)",
    "warmup": "linear learning-rate warm-up steps",
    "grad_clip": "gradient-norm clipping threshold",
    "ema_decay": "EMA decay of the weights that sample",
    "ema_warmup": "EMA decay min(decay, (1+step)/(10+step)) early on",
    "adam_eps": "AdamW eps",
    "label_dropout": "share of labels replaced by the null class (for classifier-free guidance)",
    "precision": "fp32 or bf16 (autocast)",
    "seed": "seed of the model init, data order, plans and noise",
    "device": "cpu or cuda (under torchrun: one GPU per process)",
    "log_every": "steps between two rows of log.csv",
    "ckpt_every": "steps between two checkpoints",
    "sample_every": "steps between two sample grids in RUN/samples/ (0 = none)",
    "sample_steps": "DDPM steps of the sample grids",
    "samples_per_class": "images per class in the sample grids",
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help="'digits' (built in), 'folder:PATH' (ImageFolder tree) or 'latents:DIR' (cache-latents output)")
    p.add_argument("--out", default="runs/train", help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--image-size", type=int, default=None, help="folder data: resize/crop to this size (default: 32)")
    p.add_argument("--channels", type=int, default=None, help="folder data: 1 (grey) or 3 (RGB, default)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="pixels (or latent cells) per token side (default: 2 up to 16 per side, else 4)")
    p.add_argument("--depth", type=int, default=None, help="override the preset's number of layers (default: the preset's)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the preset's width (default: the preset's)")
    p.add_argument("--num-heads", type=int, default=None, help="override the preset's heads (default: the preset's)")
    p.add_argument("--class-tokens", type=int, default=None, help="C in-context class tokens (default: the preset's)")
    p.add_argument("--class-repeat", type=int, default=None,
                   help="how many of the C tokens repeat one learned class embedding (default: the preset's)")
    p.add_argument("--learn-pos", action="store_true", default=None, help="learnable positional embedding (default: fixed sin-cos)")
    p.add_argument("--prediction", default=None, choices=PREDICTIONS,
                   help="what the model predicts: eps (paper, default) or v (helps small pixel images)")
    p.add_argument("--gamma", type=float, default=0.9, help="P(S) ∝ gamma^(S-1); 1 = uniform, 0 = In-context DiT")
    p.add_argument("--ar-steps", type=int, default=0, help="fixed number of AR steps with equal groups (Tab. 2; 0 = drawn with --gamma)")
    p.add_argument("--order", default="random", choices=ORDERS, help="token order of the AR steps")
    p.add_argument("--block", type=int, default=4, help="tile size of the block order")
    p.add_argument("--dilation", type=int, default=2, help="stride of the dilated order")
    p.add_argument("--lam", type=float, default=2.0, help="AR loss weight at the first step (falls to 1)")
    p.add_argument("--weighting", default="release", choices=WEIGHTINGS,
                   help="AR loss weights: release (w = lam - (lam-1)*start/L) or step (exactly 1 at the last step)")
    p.add_argument("--t-per-step", action="store_true", help="draw t per AR step instead of per sample")
    p.add_argument("--t-copies", type=int, default=1, help="K timesteps per sample sharing the clean tokens (Tab. 7)")
    for f in fields(TrainConfig):
        if f.name in ("data", "out", "image_size", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _on_off if isinstance(f.default, bool) else type(f.default) if f.default is not None else str
        shown = ("on" if f.default else "off") if kind is _on_off else f.default
        p.add_argument(flag, type=kind, default=None, metavar="on|off" if kind is _on_off else None,
                       choices=["fp32", "bf16"] if f.name == "precision" else None,
                       help=f"{TRAIN_HELP[f.name]} (default: {shown}; --config or a resumed run: theirs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scale_args(p)  # --config, --vae, --vae-path, --base-lr, --strategy, --grad-accum, --grad-ckpt
    add_eval_train_args(p)  # --eval-every and friends (in-loop evaluation)


# ---- --config (the paper's configurations), --base-lr, scale flags --------------------------------------
def add_scale_args(p: argparse.ArgumentParser) -> None:
    """Flags of the latent space, the paper presets and multi-process training."""
    g = p.add_argument_group("paper presets, latent space and scale")
    g.add_argument("--config", default=None, choices=list(PAPER_CONFIGS),
                   help="paper configuration (image size, VAE, patch, model, tokens, positions, γ, λ, lr, batch, warmup, "
                        "epochs); explicit flags win")
    g.add_argument("--vae", default=None, choices=["identity", "sd-vae", "kl16"],
                   help="latent space: identity (pixels, default), sd-vae (8x, 4 ch) or kl16 (16x, 16 ch); "
                        "with folder data the images are encoded on the fly, latents:DIR data carry their own")
    g.add_argument("--vae-path", default=None,
                   help="diffusers AutoencoderKL directory (or a cached Hugging Face repo id); never downloaded (default: none)")
    g.add_argument("--base-lr", type=float, default=None, help="learning rate per 256 images: lr = base-lr x batch / 256 (default: none, --lr is used)")
    g.add_argument("--strategy", default=None, choices=["ddp", "fsdp"],
                   help="torchrun data parallelism: ddp (default) or fsdp (FSDP2 fully_shard)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per process and step (default 1)")
    g.add_argument("--grad-ckpt", action="store_true", default=None, help="gradient (activation) checkpointing (default: off)")
    g.add_argument("--compile", action="store_true",
                   help="run the model's forward and backward through torch.compile (one process; see docs/performance.md)")


def given_flags(argv: list[str], add_args) -> dict:
    """The arguments given on the command line (rather than left at their defaults), by argparse dest,
    with their parsed values."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_args(p)
    for act in p._actions:
        act.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return vars(ns)


def add_eval_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in-loop evaluation (logged to eval.csv and TensorBoard)")
    g.add_argument("--eval-every", type=int, default=0, help="score the EMA model every N steps (0 = never)")
    g.add_argument("--eval-n", type=int, default=500, help="samples per evaluation")
    g.add_argument("--eval-ar-steps", default="1", help="S_eval value(s), comma separated")
    g.add_argument("--eval-sample-steps", type=int, default=50, help="DDPM steps per AR step of the evaluation samples")
    refuse(g, "--eval-steps", "--eval-steps: diffusion steps of the evaluation samples are --eval-sample-steps")
    g.add_argument("--eval-inception", default=None, help="Inception-v3 weights file (needed for data other than digits; default: none)")
    g.add_argument("--eval-ref", default=None, help="reference statistics .npz (default: computed from --data, cached)")


def eval_callbacks(a: argparse.Namespace, seed: int) -> list:
    """The in-loop evaluation callback asked for by --eval-every (none when 0)."""
    if not getattr(a, "eval_every", 0):
        return []
    from ..evaluation import EvalCallback

    return [EvalCallback(a.eval_every, n=a.eval_n, ar_steps=ints(a.eval_ar_steps, "--eval-ar-steps"),
                         steps=a.eval_sample_steps, seed=seed, inception=a.eval_inception, ref=a.eval_ref)]


def cmd_train(a: argparse.Namespace) -> None:
    from ..devices import finalize_distributed
    from ..distributed import make_trainer, scale_config
    from ..run_config import SETTINGS, train_configs

    settings = {k: v for k, v in given_flags(getattr(a, "argv", []), add_train_args).items() if k in SETTINGS}
    mc, plan, tc, dataset = train_configs(a.out, a.resume, progress=not a.no_progress, **settings)
    callbacks = eval_callbacks(a, tc.seed)  # checked before anything is written
    for cb in callbacks:
        cb.check_tokens(mc.num_tokens)
        cb.check_data(dataset.name)
    # --strategy / --grad-accum left out of a resume: the run's own (config.json)
    scale = scale_config(a.out, a.resume, strategy=a.strategy, grad_accum=a.grad_accum, grad_ckpt=a.grad_ckpt)
    trainer = make_trainer(mc, plan, tc, dataset, a.resume, scale, compile=a.compile)  # Trainer, or DistributedTrainer (torchrun, FSDP2, ...)
    if trainer.is_main:
        print(f"model {param_count_str(sum(p.numel() for p in trainer.model.parameters()))} params, "
              f"{mc.num_tokens} tokens, data {dataset.name} ({len(dataset)} images) -> {tc.out}")
    trainer.train(callbacks=callbacks)
    if trainer.is_main:
        print(f"done: step {trainer.step}, checkpoint and samples in {tc.out}")
    finalize_distributed()


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
