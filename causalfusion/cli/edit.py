"""`causalfusion edit`: zero-shot inpaint / outpaint / new class (docs/editing.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..files import write_json
from .common import add_sampler_args, check_outputs, parse_classes, sample_options

def cmd_edit(a: argparse.Namespace) -> None:
    from ..checkpoint import run_autoencoder
    from ..edit_masks import load_image
    from ..editing import edit, edit_accuracy, edit_figure, edit_region, format_accuracy
    from ..images import save_grid, save_npz
    from ..sampling import sample

    if a.out is None and a.eval_digits is None:  # --eval-digits writes no grid
        a.out = str(Path(a.ckpt) / "edit.png")
    check_outputs(a.out, a.npz, a.json)
    model = load_model(a.ckpt, ema=not a.raw, device=a.device)
    opts = sample_options(a, model)
    try:
        cfgs = [float(v) for v in a.cfg.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--cfg expects a number (a comma-separated list with --eval-digits), got {a.cfg!r}") from None
    if not cfgs:
        raise ValueError(f"--cfg expects a number, got {a.cfg!r}")
    if a.eval_digits is not None:
        if opts["groups"] is not None or len(opts["steps"]) != 1:
            raise ValueError("--eval-digits takes --ar-steps and a single --sample-steps value (no --groups)")
        regions = [r for r in a.mask.split(",") if r.strip()]
        if not regions:
            raise ValueError(f"--mask expects region names (e.g. center,top), got {a.mask!r}")
        rows = edit_accuracy(model, regions=regions, num=a.eval_digits, cfgs=cfgs,
                             ar_steps=a.ar_steps, order=opts["order"], steps=opts["steps"][0], sampler=a.sampler,
                             eta=a.eta, cfg_interval=opts["cfg_interval"], block=a.block, dilation=a.dilation,
                             precision=a.precision, seed=a.seed, batch_size=a.batch_size, cache=not a.no_cache,
                             fraction=a.mask_frac, compile=a.compile)
        print(format_accuracy(rows))
        if a.json:
            write_json(a.json, rows)
            print(f"wrote {a.json}")
        return
    nc = model.cfg.num_classes
    if a.cls is None:
        raise ValueError("give --class K: the class to regenerate the masked region as")
    if len(cfgs) != 1:
        raise ValueError(f"--cfg takes one number when editing, got {a.cfg!r}")
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    classes = parse_classes(a.cls, nc, "--class")
    ae = run_autoencoder(a.ckpt, a.vae_path, device=a.device)  # identity for pixel runs
    _, pixels = edit_region(model, a.mask, ae, a.mask_frac)  # the mask is checked before any work
    size = model.cfg.image_size * ae.downsample
    if a.image:
        originals = torch.stack([load_image(p, size, ae.image_channels) for p in a.image])
    else:
        gen = torch.tensor(parse_classes(a.generate_class, nc, "--generate-class"))
        if len(classes) not in (1, len(gen)):
            raise ValueError(f"got {len(classes)} --class values for {len(gen)} originals (give one, or one per original)")
        originals = ae.decode(sample(model, gen, steps=opts["steps"][0], sampler=a.sampler, eta=a.eta, cfg=cfgs[0],
                                     cfg_interval=opts["cfg_interval"], seed=a.seed, cache=not a.no_cache,
                                     precision=a.precision, compile=a.compile))
    labels = torch.tensor(classes)
    edits = edit(model, originals, a.mask, labels, n=a.n, fraction=a.mask_frac, ar_steps=a.ar_steps,
                 groups=opts["groups"], order=opts["order"], steps=opts["steps"], sampler=a.sampler, eta=a.eta,
                 cfg=cfgs[0], cfg_interval=opts["cfg_interval"], seed=a.seed,
                 first_index=0 if a.image else len(originals),  # generated originals are samples 0..B-1
                 cache=not a.no_cache, block=a.block, dilation=a.dilation, autoencoder=ae, progress=not a.no_progress,
                 precision=a.precision, compile=a.compile)
    save_grid(edit_figure(originals, pixels, edits, a.n), a.out, nrow=a.n + 2)
    print(f"wrote {a.out}: {len(originals)} row(s) of original | masked input | {a.n} variation(s)")
    if a.npz:
        save_npz(edits, labels.expand(len(originals)).repeat_interleave(a.n), a.npz)
        print(f"wrote {a.npz} ({len(edits)} edited images)")


def add_parser(sub) -> None:
    """`edit`: regenerate a masked region with a (new) class; --eval-digits scores it (docs/editing.md)."""
    from ..edit_masks import REGIONS

    e = sub.add_parser("edit", help="zero-shot editing: regenerate a masked region (inpaint/outpaint) as a new class")
    e.add_argument("--ckpt", required=True, help="run directory written by train/demo")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", action="extend", default=None, help="image file(s) of the model's size and channels (one row each) (default: none)")
    src.add_argument("--generate-class", default=None, help="generate the original(s) first: class id(s), comma separated (default: none)")
    src.add_argument("--eval-digits", type=int, default=None, metavar="N",
                     help="digits model: edit the first N held-out test digits to new classes and print how often "
                          "the classifier reads the new class (regions from --mask, comma separated)")
    e.add_argument("--mask", default="center",
                   help=f"region ({', '.join(REGIONS)}) or a mask image file (white = regenerate)")
    e.add_argument("--mask-frac", type=float, default=None, help="fraction of the side the named region covers (default 0.5)")
    e.add_argument("--class", dest="cls", default=None, help="the new class id (one, or one per original); required unless --eval-digits (default: none)")
    e.add_argument("--n", type=int, default=4, help="variations per original")
    e.add_argument("--out", default=None,
                   help="grid: original | masked input | variations, one row per original (default: CKPT/edit.png)")
    e.add_argument("--npz", default=None, help="also write the edited images in ADM format (arr_0, labels) (default: none)")
    add_sampler_args(e, "masked tokens")
    e.add_argument("--cfg", default="1.0", help="classifier-free guidance scale (--eval-digits: a list, e.g. 1,3)")
    e.add_argument("--batch-size", type=int, default=100, help="--eval-digits: digits per batch")
    e.add_argument("--json", default=None, help="--eval-digits: also write the rows as JSON (default: none)")
    e.add_argument("--no-progress", action="store_true", help="no sampling progress bar")
    e.set_defaults(func=cmd_edit)

