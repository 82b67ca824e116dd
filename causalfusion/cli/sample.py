"""`causalfusion sample`: next-token(s) diffusion from a checkpoint to a PNG grid, an .npz and a GIF."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..checkpoint import load_model
from .common import add_sampler_args, check_outputs, finite_images, parse_classes, sample_options

GRID_MAX = 1024  # images in the PNG grid of `sample` (an FID run's 50k would not fit in memory)


def cmd_sample(a: argparse.Namespace) -> None:
    import time

    from ..autoencoders import decode_in_batches
    from ..checkpoint import run_autoencoder
    from ..devices import finalize_distributed, init_distributed
    from ..distributed import sample_in_chunks, uint8_to_images
    from ..generation_path import GenerationPath
    from ..images import grid_columns, save_grid, save_npz_uint8
    from ..sampling import resolve_groups, sample

    a.out = a.out if a.out is not None else str(Path(a.ckpt) / "samples.png")
    check_outputs(a.out, a.npz, a.path_gif)
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
    check_fits_memory(a.n, model.cfg.image_size * ae.downsample, ae.image_channels)
    if a.check_digits and (a.uncond or (model.cfg.in_channels, model.cfg.image_size) != (1, 8)):
        raise ValueError("--check-digits needs class-conditional samples of an 8x8 one-channel digits model")
    if a.path_gif and model.cfg.in_channels not in (1, 3):
        raise ValueError(f"--path-gif needs 1- or 3-channel images, the model has {model.cfg.in_channels}")
    opts = sample_options(a, model)
    groups = resolve_groups(model.cfg.num_tokens, a.ar_steps, opts["groups"])
    labels = torch.tensor(classes).repeat(-(-a.n // len(classes)))[: a.n].sort(stable=True).values
    path = GenerationPath() if a.path_gif else None
    kw = dict(opts, groups=groups, sampler=a.sampler, eta=a.eta, cfg=a.cfg, seed=a.seed, cache=not a.no_cache,
              block=a.block, dilation=a.dilation, precision=a.precision, compile=a.compile)
    t0 = time.perf_counter()
    arr = sample_in_chunks(a.n, a.batch_size, lambda s, e: finite_images(decode_in_batches(ae, sample(
        model, labels[s:e], first_index=s, progress=env.is_main and not a.no_progress, path=path if s == 0 else None, **kw))), env)
    finalize_distributed()
    if arr is None:  # a rank > 0 of torchrun: rank 0 has gathered everything and writes the files
        return
    images = uint8_to_images(arr[:GRID_MAX])  # the grid and the digits check look at the first GRID_MAX
    print(f"sampled {a.n} images in {time.perf_counter() - t0:.1f}s: S={len(groups)} AR steps "
          f"(groups {','.join(map(str, groups))}), order {kw['order'] if isinstance(kw['order'], str) else 'explicit'}, "
          f"{a.sampler} x {','.join(map(str, kw['steps']))} steps, cache {'off' if a.no_cache else 'on'}")
    if a.check_digits:
        from ..digits_check import class_agreement

        print(f"classifier reads {100 * class_agreement(images, labels[:len(images)]):.1f}% of the samples as the requested digit")
    per_class = a.n // len(classes) if a.n % len(classes) == 0 and len(classes) > 1 else None
    save_grid(images, a.out, nrow=grid_columns(len(images), per_class))  # one row per class where not too narrow
    print(f"wrote {a.out}")
    if a.npz:
        save_npz_uint8(arr, labels, a.npz)
        print(f"wrote {a.npz} ({a.n} images)")
    if path is not None:
        path.save_gif(a.path_gif)
        print(f"wrote {a.path_gif} ({len(path.frames)} frames of the generation path)")


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--ckpt", required=True, help="run directory written by train/demo")
    s.add_argument("--class", dest="cls", default=None, help="class id(s), comma separated (default: all)")
    s.add_argument("--uncond", action="store_true", help="sample with the null class")
    s.add_argument("--n", type=int, default=100, help="number of images")
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    add_sampler_args(s)  # --ar-steps --groups --order --sampler --sample-steps --cfg-interval --no-cache --seed ...
    s.add_argument("--batch-size", type=int, default=256, help="images per sampling batch (global under torchrun)")
    s.add_argument("--out", default=None, help="PNG grid of the samples (default: CKPT/samples.png)")
    s.add_argument("--npz", default=None, help="also write ADM-format .npz (arr_0 uint8 NHWC, labels)")
    s.add_argument("--per-class", type=int, default=None, help="N images of every class (sets --n; e.g. 50 for FID-50k; default: use --n)")
    s.add_argument("--path-gif", default=None, help="also write an animated GIF of the generation path (default: none)")
    s.add_argument("--check-digits", action="store_true", help="digits models: print the classifier agreement")
    s.add_argument("--no-progress", action="store_true", help="no sampling progress bar")
    s.set_defaults(func=cmd_sample)


def check_fits_memory(n: int, size: int, channels: int) -> None:
    """Refuse an --n whose uint8 samples ([n, size, size, channels], held for the grid and .npz)
    would take more than half of this machine's memory."""
    need = n * size * size * channels
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total // 2:
        raise ValueError(f"--n {n} needs {need / 2**30:.1f} GiB for the {size}x{size}x{channels} samples in memory, "
                         f"more than half of this machine's {total / 2**30:.1f} GiB; sample in several runs with --seed")
