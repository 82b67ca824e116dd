"""`convert-release` and `export`: inference folders from the authors' checkpoint or a training run
(docs/pretrained.md)."""
from __future__ import annotations

import argparse


def cmd_convert_release(a: argparse.Namespace) -> None:
    from ..release_convert import convert_release

    out = convert_release(a.ckpt_file, a.out, vae=a.vae_path, latent_channels=a.latent_channels)
    print(f"wrote {out} (use --ckpt {out}{'' if a.vae_path else ' --vae-path KL16_DIR'})")


def cmd_export(a: argparse.Namespace) -> None:
    from ..inference_folder import export_run

    out = export_run(a.run, a.out)
    print(f"wrote {out} (use --ckpt {out})")


def add_parser(sub) -> None:
    r = sub.add_parser("convert-release", help="the authors' CausalFusion checkpoint (.pt) -> inference folder")
    r.add_argument("ckpt_file", metavar="CKPT", help="the release's checkpoint file (a bare state dict or a training checkpoint)")
    r.add_argument("--out", required=True, help="new folder: config.json, model.safetensors, README.md")
    r.add_argument("--vae-path", default=None,
                   help="KL-16 VAE folder from `convert-vae`, recorded in the folder (default: none, give --vae-path when sampling)")
    r.add_argument("--latent-channels", type=int, default=16,
                   help="latent channels, used when the file has no training args (default: 16, KL-16)")
    r.set_defaults(func=cmd_convert_release)

    e = sub.add_parser("export", help="a training run's EMA weights -> inference folder (no training state)")
    e.add_argument("run", metavar="RUN", help="run directory written by train/demo")
    e.add_argument("--out", required=True, help="new folder: config.json, model.safetensors, README.md")
    e.set_defaults(func=cmd_export)
