"""`causalfusion app`: the local web app for sampling and zero-shot editing (docs/app.md)."""
from __future__ import annotations

import argparse
import os


def cmd_app(a: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the app needs gradio: pip install 'causalfusion[app]'") from None
    from ..app import serve
    from ..app_core import load_app_model

    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {a.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing is sent anywhere
    am = load_app_model(a.ckpt, a.vae_path, device=a.device)
    print(f"serving {a.ckpt} on http://{a.host}:{a.port} (Ctrl+C stops)", flush=True)
    serve(am, a.host, a.port)


def add_parser(sub) -> None:
    p = sub.add_parser("app", help="local web app: sample and edit (paint a mask, pick a new class)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by train/demo (or a converted/exported one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--vae-path", default=None, help="where the run's VAE weights are now (if moved); checked by sha256")
    p.set_defaults(func=cmd_app)
