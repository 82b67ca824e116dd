"""Option parsing shared by the commands: text in, what the library takes out (checked there)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..ar_plan import ORDERS


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option's help that does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or "required" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "off" if action.default in (False, None) else "on"
        elif action.default is None:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Renamed(argparse.Action):
    """A flag spelling that means something else in this command: refused with a one-line hint (exit 2)."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs):
        kwargs.update(nargs="?", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.hint)


def refuse(p: argparse.ArgumentParser, flag: str, hint: str) -> None:
    """Make ``flag`` an error; ``hint`` (the whole message) names the flag to use instead."""
    p.add_argument(flag, action=Renamed, hint=hint)


STEPS_HINT = "--steps is the number of training steps; diffusion steps per AR step are --sample-steps"


def check_outputs(*paths: str | None) -> None:
    """Refuse (one line) output files that could not be written, before any work or any write:
    an existing directory, a path under an existing file, or one in a directory we may not write.
    None entries are skipped; an empty name is refused (Path('') is the current directory, and the
    write would fail only after all the work)."""
    if any(p is not None and not str(p).strip() for p in paths):
        raise ValueError("an output path is empty; give a file name")
    given = [Path(p) for p in paths if p is not None]
    for p in given:
        if p.is_dir():
            raise ValueError(f"output {p} is a directory; give a file name")
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"cannot write {p}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write {p}: no permission to write in {parent}")
    if len({p.resolve() for p in given}) < len(given):
        raise ValueError("two outputs name the same file: " + ", ".join(map(str, given)))


def finite_images(images: torch.Tensor) -> torch.Tensor:
    """Pass finite samples through; refuse NaN/inf ones (they would be written as black images)."""
    if not torch.isfinite(images).all():
        raise FloatingPointError("the samples contain NaN or inf: are the checkpoint's weights finite?")
    return images


def ints(text: str, flag: str) -> list[int]:
    """Comma-separated integers of an option; a ValueError (one line) otherwise."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


def parse_classes(text: str | None, num_classes: int, flag: str = "--class") -> list[int]:
    """Class ids from 'K' or 'K1,K2,..' (None: all classes), each checked against the model's range."""
    if text is None:
        return list(range(num_classes))
    classes = ints(text, flag)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"{flag} {text}: class {bad[0] if bad else '(none)'} is out of range: "
                         f"the model has classes 0..{num_classes - 1}")
    return classes


def fill_trained_order(a: argparse.Namespace, model: torch.nn.Module) -> None:
    """--order/--block/--dilation left out: the ones the loaded run was trained with."""
    from ..sampling import model_order

    a.order, a.block, a.dilation = model_order(model, a.order, a.block, a.dilation)


def sample_options(a: argparse.Namespace, model: torch.nn.Module) -> dict:
    """--groups/--order/--sample-steps/--cfg-interval as the library wants them (parsed here, checked there);
    fills in the run's training order where --order/--block/--dilation were left out."""
    fill_trained_order(a, model)
    order = a.order if a.permutation is None else ints(a.permutation, "--permutation")
    return dict(groups=None if a.groups is None else ints(a.groups, "--groups"), order=order,
                steps=ints(a.sample_steps, "--sample-steps"), cfg_interval=parse_interval(a.cfg_interval))


def parse_interval(text: str) -> tuple[float, float]:
    """--cfg-interval "LO,HI" -> (lo, hi) (the range itself is checked by ``sampling.check_cfg``)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval expects LO,HI (e.g. 0,700), got {text!r}") from None
    return lo, hi


def add_order_args(p: argparse.ArgumentParser) -> None:
    """--order/--block/--dilation for sampling a run; left out, they are the run's training ones."""
    p.add_argument("--order", default=None, choices=ORDERS, help="token order at inference (default: the run's training order)")
    p.add_argument("--block", type=int, default=None, help="tile size of the block order (default: the run's)")
    p.add_argument("--dilation", type=int, default=None, help="stride of the dilated order (default: the run's)")


def add_sampler_args(p: argparse.ArgumentParser, what: str = "tokens") -> None:
    """The options `sample` and `edit` share: how the generated ``what`` are split, ordered and denoised."""
    p.add_argument("--ar-steps", type=int, default=None, help=f"S: AR steps with equal groups over the {what} (default 1)")
    p.add_argument("--groups", default=None, help=f"explicit group sizes of the {what}, e.g. 4,4,8")
    add_order_args(p)
    p.add_argument("--permutation", default=None,
                   help="explicit token order instead of --order: a permutation of 0..L-1 (raster indices, comma separated)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ddpm (ancestral, as in the release) or ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--sample-steps", default="250",
                   help="diffusion steps per AR step: one number, or one per AR step (e.g. 100,50,25,25)")
    refuse(p, "--steps", STEPS_HINT)
    p.add_argument("--cfg-interval", default="0,1000", help="guide only for t in [LO,HI), 0 <= LO <= HI <= 1000")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step (reference)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: the model under autocast")
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile (needs the cache; see docs/performance.md)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sample i's noise depends on seed and i only)")
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    p.add_argument("--vae-path", default=None, help="where the run's VAE weights are now (if moved); checked by sha256")
