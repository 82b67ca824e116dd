"""Option parsing shared by the commands: text in, what the library takes out (checked there)."""
from __future__ import annotations

import argparse

from ..ar_plan import ORDERS


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


def sample_options(a: argparse.Namespace) -> dict:
    """--groups/--order/--steps/--cfg-interval as the library wants them (parsed here, checked there)."""
    order = a.order
    if order not in ORDERS and any(ch.isdigit() for ch in order):
        order = ints(order, "--order")
    try:
        lo, hi = (float(v) for v in a.cfg_interval.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval expects LO,HI (e.g. 0,700), got {a.cfg_interval!r}") from None
    return dict(groups=None if a.groups is None else ints(a.groups, "--groups"), order=order,
                steps=ints(a.steps, "--steps"), cfg_interval=(lo, hi))
