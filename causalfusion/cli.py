"""Command line: parses arguments and calls the library. No modelling logic lives here."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
import torch

from .ar_plan import ORDERS, WEIGHTINGS, ARPlanConfig
from .checkpoint import CheckpointError, load_model, read_config
from .configs import PAPER_CONFIGS, add_scale_args
from .models import PRESETS, ModelConfig, count_parameters
from .trainer import TrainConfig, param_count_str

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
    p.add_argument("--data", default="digits",
                   help="'digits' (built in), 'folder:PATH' (ImageFolder tree) or 'latents:DIR' (cache-latents output)")
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
    add_scale_args(p)  # --config, --vae, --vae-path, --base-lr, --strategy, --grad-accum, --grad-ckpt
    add_eval_train_args(p)  # --eval-every and friends (in-loop evaluation)


def add_eval_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in-loop evaluation (logged to eval.csv and TensorBoard)")
    g.add_argument("--eval-every", type=int, default=0, help="score the EMA model every N steps (0 = never)")
    g.add_argument("--eval-n", type=int, default=500, help="samples per evaluation")
    g.add_argument("--eval-ar-steps", default="1", help="S_eval value(s), comma separated")
    g.add_argument("--eval-steps", type=int, default=50, help="DDPM steps per AR step of the evaluation samples")
    g.add_argument("--eval-inception", default=None, help="Inception-v3 weights file (needed for data other than digits)")
    g.add_argument("--eval-ref", default=None, help="reference statistics .npz (default: computed from --data, cached)")


def eval_callbacks(a: argparse.Namespace, seed: int) -> list:
    """The in-loop evaluation callback asked for by --eval-every (none when 0)."""
    if not getattr(a, "eval_every", 0):
        return []
    from .evaluation import EvalCallback

    return [EvalCallback(a.eval_every, n=a.eval_n, ar_steps=_ints(a.eval_ar_steps, "--eval-ar-steps"),
                         steps=a.eval_steps, seed=seed, inception=a.eval_inception, ref=a.eval_ref)]


def model_config_from_args(a: argparse.Namespace, saved: dict | None, num_classes: int, image_size: int, channels: int) -> ModelConfig:
    """Model config: the saved one when resuming, overridden by what was given explicitly."""
    base = saved or {**PRESETS[a.preset or "tiny"], "image_size": image_size, "in_channels": channels,
                     "num_classes": num_classes, "patch_size": 2 if image_size <= 16 else 4}
    if saved and a.preset:
        base = {**base, **PRESETS[a.preset]}
    given = {k: getattr(a, k) for k in MODEL_ARGS if getattr(a, k) is not None}
    return ModelConfig.from_dict({**base, **given})


def cmd_train(a: argparse.Namespace) -> None:
    from .configs import apply_paper_config, explicit_dests, finish_paper_config, make_trainer, training_dataset
    from .distributed import finalize_distributed

    if a.resume:
        a.config = None  # a resumed run keeps its saved configuration
    given = explicit_dests(getattr(a, "argv", []), add_train_args)
    apply_paper_config(a, given)
    saved = read_config(a.out) if a.resume else None
    train_kw = {**(saved or {}).get("train", {})} if saved else {}
    train_kw.update({f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None})
    data = a.data if not saved or "data" in given else saved.get("train", {}).get("data", a.data)  # resume: saved data
    train_kw.update(data=data, out=a.out, progress=not a.no_progress)
    if a.image_size is not None:
        train_kw["image_size"] = a.image_size
    tc = TrainConfig.from_dict(train_kw)
    dataset = training_dataset(a, tc.data, tc.image_size, saved, tc.device)  # pixels, VAE on the fly, or a cache
    finish_paper_config(a, given, tc, len(dataset))  # --config: epochs counted on this dataset
    a.image_size = dataset.image_size  # the model's image size is the latent size
    mc = model_config_from_args(a, saved and saved.get("model"), dataset.num_classes, dataset.image_size, dataset.channels)
    plan = ARPlanConfig(gamma=a.gamma, fixed_steps=a.ar_steps, order=a.order, block=a.block, dilation=a.dilation,
                        lam=a.lam, weighting=a.weighting, t_per_step=a.t_per_step, t_copies=a.t_copies)
    callbacks = eval_callbacks(a, tc.seed)  # checked before anything is written
    trainer = make_trainer(mc, plan, tc, a, dataset)  # Trainer, or DistributedTrainer under torchrun / FSDP2 / accumulation
    if trainer.is_main:
        print(f"model {param_count_str(sum(p.numel() for p in trainer.model.parameters()))} params, "
              f"{mc.num_tokens} tokens, data {dataset.name} ({len(dataset)} images) -> {tc.out}")
    trainer.train(callbacks=callbacks)
    if trainer.is_main:
        print(f"done: step {trainer.step}, checkpoint and samples in {tc.out}")
    finalize_distributed()


# ---- sample -----------------------------------------------------------------------------------
def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    classes = _int_list(text)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--class {text}: class ids must be in 0..{num_classes - 1}")
    return classes


def _ints(text: str, flag: str) -> list[int]:
    """Comma-separated integers of a sample option; a ValueError (one line) otherwise."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _sample_options(a: argparse.Namespace) -> dict:
    """--groups/--order/--steps/--cfg-interval as the library wants them (parsed here, checked there)."""
    order = a.order
    if order not in ORDERS and any(ch.isdigit() for ch in order):
        order = _ints(order, "--order")
    try:
        lo, hi = (float(v) for v in a.cfg_interval.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval expects LO,HI (e.g. 0,700), got {a.cfg_interval!r}") from None
    return dict(groups=None if a.groups is None else _ints(a.groups, "--groups"), order=order,
                steps=_ints(a.steps, "--steps"), cfg_interval=(lo, hi))


GRID_MAX = 1024  # images in the PNG grid of `sample` (an FID run's 50k would not fit in memory)


def cmd_sample(a: argparse.Namespace) -> None:
    import time

    from .autoencoders import decode_in_batches, run_autoencoder
    from .distributed import finalize_distributed, init_distributed, sample_in_chunks, save_npz_uint8, uint8_to_images
    from .generation_path import GenerationPath
    from .images import save_grid
    from .sampling import resolve_groups, sample

    env = init_distributed(a.device)  # under torchrun: every rank samples its share, rank 0 writes the files
    model = load_model(a.ckpt, ema=not a.raw, device=a.device)
    ae = run_autoencoder(a.ckpt, a.vae_path, device=a.device)  # latents -> pixels (identity for pixel runs)
    nc = model.cfg.num_classes
    classes = [nc] if a.uncond else parse_classes(a.cls, nc)
    if a.per_class is not None:  # exactly balanced classes, e.g. 50 x 1000 for FID-50k
        if a.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {a.per_class}")
        a.n = a.per_class * len(classes)
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.check_digits and (a.uncond or (model.cfg.in_channels, model.cfg.image_size) != (1, 8)):
        raise ValueError("--check-digits needs class-conditional samples of an 8x8 one-channel digits model")
    if a.path_gif and model.cfg.in_channels not in (1, 3):
        raise ValueError(f"--path-gif needs 1- or 3-channel images, the model has {model.cfg.in_channels}")
    opts = _sample_options(a)
    groups = resolve_groups(model.cfg.num_tokens, a.ar_steps, opts["groups"])
    labels = torch.tensor(classes).repeat(-(-a.n // len(classes)))[: a.n].sort(stable=True).values
    path = GenerationPath() if a.path_gif else None
    kw = dict(opts, groups=groups, sampler=a.sampler, eta=a.eta, cfg=a.cfg, seed=a.seed, cache=not a.no_cache,
              block=a.block, dilation=a.dilation)
    t0 = time.perf_counter()
    arr = sample_in_chunks(a.n, a.batch_size, lambda s, e: decode_in_batches(ae, sample(
        model, labels[s:e], first_index=s, progress=env.is_main, path=path if s == 0 else None, **kw)), env)
    finalize_distributed()
    if arr is None:  # a rank > 0 of torchrun: rank 0 has gathered everything and writes the files
        return
    images = uint8_to_images(arr[:GRID_MAX])  # the grid and the digits check look at the first GRID_MAX
    print(f"sampled {a.n} images in {time.perf_counter() - t0:.1f}s: S={len(groups)} AR steps "
          f"(groups {','.join(map(str, groups))}), order {kw['order'] if isinstance(kw['order'], str) else 'explicit'}, "
          f"{a.sampler} x {','.join(map(str, kw['steps']))} steps, cache {'off' if a.no_cache else 'on'}")
    if a.check_digits:
        from .digits_check import class_agreement

        print(f"classifier reads {100 * class_agreement(images, labels[:len(images)]):.1f}% of the samples as the requested digit")
    nrow = a.n // len(classes) if a.n % len(classes) == 0 and len(classes) > 1 else max(1, int(a.n ** 0.5))
    scale = 4 if model.cfg.image_size <= 16 else 1
    save_grid(images, a.out, nrow=nrow, scale=scale)
    print(f"wrote {a.out}")
    if a.npz:
        save_npz_uint8(arr, labels, a.npz)
        print(f"wrote {a.npz} ({a.n} images)")
    if path is not None:
        path.save_gif(a.path_gif, scale=scale)
        print(f"wrote {a.path_gif} ({len(path.frames)} frames of the generation path)")


# ---- eval / ablate / probe ---------------------------------------------------------------------
def cmd_eval(a: argparse.Namespace) -> None:
    import json

    from .evaluation import evaluate_checkpoint, evaluate_npz, format_metrics, format_rows

    if a.npz:
        m = evaluate_npz(a.npz, a.data or "digits", a.inception, a.ref, a.device)
        print(format_metrics(m))
        rows = [m]
    else:
        rows = evaluate_checkpoint(a.ckpt, n=a.n, ar_steps=_ints(a.ar_steps, "--ar-steps"), order=a.order,
                                   steps=a.steps, cfg=a.cfg, seed=a.seed, data=a.data, inception=a.inception,
                                   ref=a.ref, raw=a.raw, device=a.device, batch_size=a.batch_size, block=a.block,
                                   dilation=a.dilation)
        print(format_rows(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {a.json}")


def cmd_ablate(a: argparse.Namespace) -> None:
    import shlex

    if a.suite == "multimodal":  # Tab. 6a, vision-language: causalfusion/multimodal/ablation.py
        from .multimodal.ablation import run_from_args
        return run_from_args(a, "causalfusion " + shlex.join(a.argv))
    from .ablation import AblationSettings, run_suite

    st = AblationSettings(data=a.data, seed=a.seed, steps=a.steps, budget=a.budget, batch_size=a.batch_size, lr=a.lr,
                          depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, eval_n=a.eval_n,
                          eval_steps=a.eval_steps, precision=a.precision, inception=a.inception, ref=a.ref,
                          s_eval=tuple(_ints(a.s_eval, "--s-eval")) if a.s_eval else None, progress=a.progress)
    configs = [c for c in a.configs.split(",") if c] if a.configs else None
    command = "causalfusion " + shlex.join(a.argv)
    report = run_suite(a.suite, st, a.out, configs, command, log=lambda msg: print(msg, flush=True))
    print(f"wrote {report} and {report.parent / (a.suite + '.png')}")


def cmd_probe(a: argparse.Namespace) -> None:
    from .probe import format_probe, probe_checkpoint

    results = []
    for ckpt in a.ckpt:
        res = probe_checkpoint(ckpt, a.data, a.mode, a.raw, a.device)
        results.append(res)
        plan = f"fixed S_train={res['fixed_steps']}" if res["fixed_steps"] else f"gamma {res['gamma']}"
        print(f"{ckpt} (step {res['step']}, {plan}):")
        print("  " + format_probe(res).replace("\n", "\n  "))


# ---- params / demo ----------------------------------------------------------------------------
def cmd_params(a: argparse.Namespace) -> None:
    if a.config:  # a paper configuration: its model, and the count the paper states
        from .configs import PAPER_PARAMS, get_config

        cfg = get_config(a.config).model_config()
        n, paper = count_parameters(cfg), PAPER_PARAMS[a.config]
        print(f"{a.config}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
              f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens; "
              f"paper: {param_count_str(int(paper))} ({100 * (n - paper) / paper:+.1f}%)")
        return
    cfg = ModelConfig.from_preset(a.preset, image_size=a.image_size, in_channels=a.channels,
                                  patch_size=a.patch_size, num_classes=a.num_classes, class_tokens=a.class_tokens)
    n = count_parameters(cfg)
    print(f"{a.preset}: {n:,} parameters ({param_count_str(n)}), {cfg.depth} layers x {cfg.hidden_size} wide x "
          f"{cfg.num_heads} heads, {cfg.num_tokens} image tokens, {cfg.num_cond} class tokens")


def cmd_configs(a: argparse.Namespace) -> None:
    from .configs import PAPER_CONFIGS, config_table

    for row in config_table():
        print(PAPER_CONFIGS[row["name"]].describe())
        print(f"    {param_count_str(row['params'])} parameters (paper {param_count_str(int(row['paper_params']))}, "
              f"{row['diff_pct']:+.1f}%); source: {row['source']}")


def cmd_cache_latents(a: argparse.Namespace) -> None:
    from .latent_cache import cache_dataset

    index = cache_dataset(a.data, a.out, image_size=a.image_size, vae=a.vae, vae_path=a.vae_path, config=a.config,
                          channels=a.channels, flip=not a.no_flip, shard_size=a.shard_size, batch_size=a.batch_size,
                          dtype=a.dtype, device=a.device, progress=not a.no_progress)
    if index is not None:
        c, h, w = index["latent_shape"]
        print(f"cached {index['num_images']} images ({index['image_size']}px, {index['autoencoder']['kind']}) as "
              f"{c}x{h}x{w} latents{' + flips' if index['flip'] else ''} in {len(index['shards'])} shards -> {a.out}")


def cmd_convert_vae(a: argparse.Namespace) -> None:
    from .autoencoders import convert_ldm_vae

    out = convert_ldm_vae(a.ldm, a.out)
    print(f"wrote {out} (use --vae kl16 --vae-path {out})")


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
    s.add_argument("--cfg-interval", default="0,1000", help="guide only for t in [LO,HI), 0 <= LO <= HI <= 1000")
    s.add_argument("--ar-steps", type=int, default=None, help="S: AR steps with equal groups (default 1)")
    s.add_argument("--groups", default=None, help="explicit group sizes, e.g. 4,4,8 (sum L)")
    s.add_argument("--order", default="random",
                   help=f"token order: {', '.join(ORDERS)} or a permutation of 0..L-1 (comma separated)")
    s.add_argument("--block", type=int, default=4, help="tile size of the block order")
    s.add_argument("--dilation", type=int, default=2, help="stride of the dilated order")
    s.add_argument("--sampler", default="ddpm", help="ddpm (ancestral, as in the release) or ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--steps", default="250",
                   help="diffusion steps per AR step: one number, or one per AR step (e.g. 100,50,25,25)")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step (reference)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npz", default=None, help="also write ADM-format .npz (arr_0 uint8 NHWC, labels)")
    s.add_argument("--per-class", type=int, default=None, help="N images of every class (sets --n; e.g. 50 for FID-50k)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    s.add_argument("--vae-path", default=None, help="where the run's VAE weights are now (if moved); checked by sha256")
    s.add_argument("--path-gif", default=None, help="also write an animated GIF of the generation path")
    s.add_argument("--check-digits", action="store_true", help="digits models: print the classifier agreement")
    s.set_defaults(func=cmd_sample)

    q = sub.add_parser("params", help="parameter count of a preset (no weights allocated)")
    q.add_argument("--preset", default="L", choices=list(PRESETS))
    q.add_argument("--image-size", type=int, default=32, help="latent size (ImageNet 256 with SD-VAE: 32)")
    q.add_argument("--channels", type=int, default=4)
    q.add_argument("--patch-size", type=int, default=2)
    q.add_argument("--num-classes", type=int, default=1000)
    q.add_argument("--class-tokens", type=int, default=64)
    q.add_argument("--config", default=None, choices=list(PAPER_CONFIGS),
                   help="count a paper configuration instead (compared with the paper's number)")
    q.set_defaults(func=cmd_params)

    g = sub.add_parser("configs", help="list the paper configurations (--config) with parameter counts")
    g.set_defaults(func=cmd_configs)

    c = sub.add_parser("cache-latents", help="encode a dataset once into a latent cache (sharded safetensors)")
    c.add_argument("--data", required=True, help="'folder:PATH' (ImageFolder tree) or 'digits'")
    c.add_argument("--out", required=True, help="cache directory (an unfinished cache there is continued)")
    c.add_argument("--config", default=None, choices=list(PAPER_CONFIGS), help="take image size and VAE from a paper config")
    c.add_argument("--image-size", type=int, default=None, help="center-crop size in pixels (ADM crop)")
    c.add_argument("--vae", default=None, choices=["identity", "sd-vae", "kl16"])
    c.add_argument("--vae-path", default=None, help="diffusers AutoencoderKL directory or cached repo id")
    c.add_argument("--channels", type=int, default=3)
    c.add_argument("--no-flip", action="store_true", help="do not also cache the horizontally flipped images")
    c.add_argument("--shard-size", type=int, default=2048, help="images per shard file")
    c.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_cache_latents)

    v = sub.add_parser("convert-vae", help="LDM/MAR KL-16 VAE weights (.safetensors) -> diffusers directory")
    v.add_argument("--ldm", required=True, help="the LDM-format state dict as .safetensors (e.g. MAR's kl16)")
    v.add_argument("--out", required=True, help="output directory (config.json + diffusion_pytorch_model.safetensors)")
    v.set_defaults(func=cmd_convert_vae)

    d = sub.add_parser("demo", help="train the digits demo and write sample grids")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", action="store_true")
    d.set_defaults(func=cmd_demo)
    add_eval_parsers(sub)
    add_edit_parser(sub)  # zero-shot editing (docs/editing.md)
    from .multimodal.cli import add_commands as add_multimodal_commands  # train-mm, t2i, caption, eval-mm
    add_multimodal_commands(sub)
    return p


def add_eval_parsers(sub) -> None:
    """`eval`, `ablate` and `probe` (docs/evaluation.md)."""
    from .ablation import SUITES

    e = sub.add_parser("eval", help="FID / IS / precision / recall / accuracy of a checkpoint or an .npz of samples")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory: sample it at every --ar-steps value and score each")
    src.add_argument("--npz", help="ADM-format samples (arr_0 uint8 NHWC, optional labels) to score")
    e.add_argument("--data", default=None, help="reference data: digits or folder:PATH (default: the run's; --npz: digits)")
    e.add_argument("--n", type=int, default=2000, help="samples per inference setting (balanced classes)")
    e.add_argument("--ar-steps", default="1", help="S_eval value(s), comma separated, e.g. 1,2,4,8")
    e.add_argument("--order", default="random", choices=ORDERS, help="token order at inference")
    e.add_argument("--block", type=int, default=4, help="tile size of the block order")
    e.add_argument("--dilation", type=int, default=2, help="stride of the dilated order")
    e.add_argument("--steps", type=int, default=250, help="DDPM steps per AR step")
    e.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    e.add_argument("--inception", default=None, help="Inception-v3 weights file (the feature space for non-digits data)")
    e.add_argument("--ref", default=None, help="reference statistics .npz (mu, sigma[, features]); default: from --data")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", default=None, help="also write the numbers as JSON")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("ablate", help="train + evaluate one of the paper's ablation suites; writes a Markdown report")
    b.add_argument("--suite", required=True, choices=list(SUITES) + ["multimodal"])
    b.add_argument("--data", default="digits")
    b.add_argument("--out", default="runs/ablate", help="the report goes to OUT/SUITE/report.md")
    budget = b.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=float, default=None, help="wall seconds for the whole suite (picks --steps)")
    budget.add_argument("--steps", type=int, default=None, help="training steps per config")
    b.add_argument("--configs", default=None, help="only these configs of the suite (comma separated names)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--lr", type=float, default=5e-4)
    b.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    b.add_argument("--depth", type=int, default=4)
    b.add_argument("--hidden-size", type=int, default=128)
    b.add_argument("--num-heads", type=int, default=4)
    b.add_argument("--eval-n", type=int, default=500, help="samples per S_eval")
    b.add_argument("--eval-steps", type=int, default=50, help="DDPM steps per AR step")
    b.add_argument("--s-eval", default=None, help="S_eval values (default: the suite's, e.g. 1,2,4,8)")
    b.add_argument("--inception", default=None, help="Inception-v3 weights (data other than digits)")
    b.add_argument("--ref", default=None, help="reference statistics .npz (data other than digits)")
    b.add_argument("--progress", action="store_true", help="show training progress bars")
    b.set_defaults(func=cmd_ablate)

    r = sub.add_parser("probe", help="linear-probe accuracy of a checkpoint's pooled last-layer features (Tab. 6b)")
    r.add_argument("--ckpt", required=True, nargs="+", help="run directory (several to compare)")
    r.add_argument("--data", default=None, help="digits or folder:PATH (default: the run's data)")
    r.add_argument("--mode", default="t0", choices=["t0", "clean"],
                   help="t0: S=1 input with x_t = x_0 and t = 0 (default); clean: the clean-token path")
    r.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=cmd_probe)


# ---- edit (zero-shot inpaint / outpaint / new class; docs/editing.md) ----------------------------
def _edit_classes(text: str, flag: str, num_classes: int) -> list[int]:
    classes = _ints(text, flag)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"{flag} {text}: class {bad[0] if bad else '(none)'} is out of range: the model has classes 0..{num_classes - 1}")
    return classes


def cmd_edit(a: argparse.Namespace) -> None:
    from .autoencoders import run_autoencoder
    from .edit_masks import load_image
    from .editing import edit, edit_accuracy, edit_figure, edit_region, format_accuracy
    from .images import save_grid, save_npz
    from .sampling import sample

    model = load_model(a.ckpt, ema=not a.raw, device=a.device)
    opts = _sample_options(a)
    try:
        cfgs = [float(v) for v in a.cfg.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--cfg expects a number (a comma-separated list with --eval-digits), got {a.cfg!r}") from None
    if not cfgs:
        raise ValueError(f"--cfg expects a number, got {a.cfg!r}")
    if a.eval_digits is not None:
        import json

        if opts["groups"] is not None or len(opts["steps"]) != 1:
            raise ValueError("--eval-digits takes --ar-steps and a single --steps value (no --groups)")
        rows = edit_accuracy(model, regions=[r for r in a.mask.split(",") if r], num=a.eval_digits, cfgs=cfgs,
                             ar_steps=a.ar_steps, order=opts["order"], steps=opts["steps"][0], seed=a.seed,
                             batch_size=a.batch_size, cache=not a.no_cache, fraction=a.mask_frac)
        print(format_accuracy(rows))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
            print(f"wrote {a.json}")
        return
    nc = model.cfg.num_classes
    if a.cls is None:
        raise ValueError("give --class K: the class to regenerate the masked region as")
    if len(cfgs) != 1:
        raise ValueError(f"--cfg takes one number when editing, got {a.cfg!r}")
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    classes = _edit_classes(a.cls, "--class", nc)
    ae = run_autoencoder(a.ckpt, a.vae_path, device=a.device)  # identity for pixel runs
    _, pixels = edit_region(model, a.mask, ae, a.mask_frac)  # the mask is checked before any work
    size = model.cfg.image_size * ae.downsample
    if a.image:
        originals = torch.stack([load_image(p, size, ae.image_channels) for p in a.image])
    else:
        gen = torch.tensor(_edit_classes(a.generate_class, "--generate-class", nc))
        if len(classes) not in (1, len(gen)):
            raise ValueError(f"got {len(classes)} --class values for {len(gen)} originals (give one, or one per original)")
        originals = ae.decode(sample(model, gen, steps=opts["steps"][0], sampler=a.sampler, eta=a.eta, cfg=cfgs[0],
                                     cfg_interval=opts["cfg_interval"], seed=a.seed, cache=not a.no_cache))
    labels = torch.tensor(classes)
    edits = edit(model, originals, a.mask, labels, n=a.n, fraction=a.mask_frac, ar_steps=a.ar_steps,
                 groups=opts["groups"], order=opts["order"], steps=opts["steps"], sampler=a.sampler, eta=a.eta,
                 cfg=cfgs[0], cfg_interval=opts["cfg_interval"], seed=a.seed,
                 first_index=0 if a.image else len(originals),  # generated originals are samples 0..B-1
                 cache=not a.no_cache, block=a.block, dilation=a.dilation, autoencoder=ae, progress=True)
    scale = 4 if size <= 16 else 1
    save_grid(edit_figure(originals, pixels, edits, a.n), a.out, nrow=a.n + 2, scale=scale)
    print(f"wrote {a.out}: {len(originals)} row(s) of original | masked input | {a.n} variation(s)")
    if a.npz:
        save_npz(edits, labels.expand(len(originals)).repeat_interleave(a.n), a.npz)
        print(f"wrote {a.npz} ({len(edits)} edited images)")


def add_edit_parser(sub) -> None:
    """`edit`: regenerate a masked region with a (new) class; --eval-digits scores it (docs/editing.md)."""
    from .edit_masks import REGIONS

    e = sub.add_parser("edit", help="zero-shot editing: regenerate a masked region (inpaint/outpaint) as a new class")
    e.add_argument("--ckpt", required=True, help="run directory written by train/demo")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", default=None, help="image file(s) of the model's size and channels (one row each)")
    src.add_argument("--generate-class", default=None, help="generate the original(s) first: class id(s), comma separated")
    src.add_argument("--eval-digits", type=int, default=None, metavar="N",
                     help="digits model: edit the first N held-out test digits to new classes and print how often "
                          "the classifier reads the new class (regions from --mask, comma separated)")
    e.add_argument("--mask", default="center",
                   help=f"region ({', '.join(REGIONS)}) or a mask image file (white = regenerate)")
    e.add_argument("--mask-frac", type=float, default=None, help="fraction of the side the named region covers (default 0.5)")
    e.add_argument("--class", dest="cls", default=None, help="the new class id (one, or one per original)")
    e.add_argument("--n", type=int, default=4, help="variations per original")
    e.add_argument("--out", default="edit.png", help="grid: original | masked input | variations, one row per original")
    e.add_argument("--npz", default=None, help="also write the edited images in ADM format (arr_0, labels)")
    e.add_argument("--ar-steps", type=int, default=None, help="AR steps over the masked tokens (default 1)")
    e.add_argument("--groups", default=None, help="explicit group sizes of the masked tokens, e.g. 2,2,4")
    e.add_argument("--order", default="random",
                   help=f"order of the masked tokens: {', '.join(ORDERS)} or a permutation of 0..L-1")
    e.add_argument("--block", type=int, default=4, help="tile size of the block order")
    e.add_argument("--dilation", type=int, default=2, help="stride of the dilated order")
    e.add_argument("--sampler", default="ddpm", help="ddpm or ddim")
    e.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    e.add_argument("--steps", default="250", help="diffusion steps per AR step (one number, or one per AR step)")
    e.add_argument("--cfg", default="1.0", help="classifier-free guidance scale (--eval-digits: a list, e.g. 1,3)")
    e.add_argument("--cfg-interval", default="0,1000", help="guide only for t in [LO,HI)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-cache", action="store_true", help="uncached reference sampler")
    e.add_argument("--batch-size", type=int, default=100, help="--eval-digits: digits per batch")
    e.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    e.add_argument("--device", default="cpu")
    e.add_argument("--vae-path", default=None, help="where the run's VAE weights are now (if moved)")
    e.add_argument("--json", default=None, help="--eval-digits: also write the rows as JSON")
    e.set_defaults(func=cmd_edit)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to tell explicit flags from defaults (--config)
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
