"""``shapes``: a captioned image set that needs no download and whose captions a program can check.

Each image (RGB, 16 px by default, black background) holds one or two coloured shapes, each in
its own quadrant ("top left", ...), with a little jitter of place and size. Every image comes with
several paraphrased captions built from templates. Everything is a pure function of
(seed, split, index), so a split is the same on every machine.

Held-out split: the (colour, shape) pairs of ``HELD_OUT`` never appear in ``train`` / ``test``;
every ``heldout`` image contains at least one of them (unseen attribute combinations, each
attribute seen on its own).

``detect_objects`` is the colour-segmentation checker used for text-to-image accuracy: per
quadrant, the majority colour of the bright pixels, and the shape from how much of its bounding
box the blob fills (square ~1, circle ~pi/4, triangle ~1/2).
"""
from __future__ import annotations

import re

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
    "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SPLITS = {"train": 0, "test": 1, "heldout": 2}  # stream ids mixed into the seed

Obj = tuple[str, str, str]  # (colour, shape, position)

ONE = ["a {0} {1} at the {2}", "a {0} {1} in the {2} corner", "there is a {0} {1} at the {2}",
       "{2}: a {0} {1}", "a small {0} {1} in the {2}"]
TWO = ["a {0} {1} at the {2} and a {3} {4} at the {5}", "{0} {1} in the {2} corner, {3} {4} in the {5} corner",
       "there is a {0} {1} at the {2} and a {3} {4} at the {5}", "two shapes: a {0} {1} ({2}) and a {3} {4} ({5})",
       "a {3} {4} at the {5} and a {0} {1} at the {2}"]


def captions_for(objs: list[Obj]) -> list[str]:
    """All paraphrases of an image's objects (1 or 2 objects)."""
    if len(objs) == 1:
        return [t.format(*objs[0]) for t in ONE]
    return [t.format(*objs[0], *objs[1]) for t in TWO]


def coverage(shape: str, size: int, cy: float, cx: float, r: float, aa: int = 4) -> np.ndarray:
    """Fraction of each pixel of a [size, size] canvas covered by a shape of radius r at (cy, cx)."""
    n = size * aa
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / aa
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        inside = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "square":
        inside = (np.abs(dy) <= r * 0.9) & (np.abs(dx) <= r * 0.9)
    else:  # upward isosceles triangle: apex at the top, base at the bottom
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return inside.reshape(size, aa, size, aa).mean(axis=(1, 3))


def draw(objs: list[Obj], size: int = 16, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render objects -> float image [3, size, size] in [0, 1] (4x supersampled edges).

    With ``rng`` each shape's centre moves by up to size/16 px and its size by +-10%."""
    q = size / 2
    img = np.zeros((3, size, size))
    for colour, shape, pos in objs:
        row, col = POSITIONS.index(pos) // 2, POSITIONS.index(pos) % 2
        cy, cx, r = (row + 0.5) * q, (col + 0.5) * q, 0.36 * q
        if rng is not None:
            cy, cx = cy + rng.uniform(-1, 1) * size / 16, cx + rng.uniform(-1, 1) * size / 16
            r *= rng.uniform(0.9, 1.1)
        cov = coverage(shape, size, cy, cx, r)
        for ch, v in enumerate(COLOURS[colour]):
            img[ch] = img[ch] * (1 - cov) + v * cov
    return img


def sample_objects(rng: np.random.Generator, split: str) -> list[Obj]:
    """One or two objects in distinct quadrants, respecting the split's (colour, shape) rule."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    seen = [p for p in pairs if p not in HELD_OUT]
    k = int(rng.integers(1, 3))
    quads = rng.permutation(len(POSITIONS))[:k]
    while True:
        pool = seen if split != "heldout" else pairs
        chosen = [pool[i] for i in rng.integers(0, len(pool), size=k)]
        if split != "heldout" or any(p in HELD_OUT for p in chosen):
            return [(c, s, POSITIONS[q]) for (c, s), q in zip(chosen, quads)]


def make_shapes(split: str = "train", n: int = 4096, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[list[str]], list[list[Obj]]]:
    """-> images [n, 3, size, size] in [-1, 1], captions (5 per image), objects per image."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {', '.join(SPLITS)}")
    if size < 8 or size % 2:
        raise ValueError(f"shapes images must be an even size >= 8, got {size}")
    images, caps, objs = np.zeros((n, 3, size, size), np.float32), [], []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        o = sample_objects(rng, split)
        images[i] = draw(o, size, rng)
        objs.append(o)
        caps.append(captions_for(o))
    return torch.from_numpy(images) * 2 - 1, caps, objs


def redraw(objs: list[list[Obj]], size: int = 16, seed: int = 1) -> torch.Tensor:
    """The same objects drawn again with fresh jitter -> images [N, 3, size, size] in [-1, 1]: what
    a perfect text-to-image model would produce from these images' captions."""
    out = np.stack([draw(o, size, np.random.default_rng([seed, 99, i])) for i, o in enumerate(objs)])
    return torch.from_numpy(out).float() * 2 - 1


# ---- checking -----------------------------------------------------------------------------------
_COLOUR_RE = "|".join(COLOURS)
_OBJ_RE = re.compile(rf"\b({_COLOUR_RE})\s+({'|'.join(SHAPES)})\b")
_POS_RE = re.compile(r"\b(top|bottom)\s+(left|right)\b")


def parse_caption(text: str) -> set[Obj]:
    """The (colour, shape, position) triples a caption names: the i-th "colour shape" goes with
    the i-th "top/bottom left/right" that follows the previous object (templates name the object first)."""
    text = text.lower()
    objs = list(_OBJ_RE.finditer(text))
    out = set()
    for i, m in enumerate(objs):
        end = objs[i + 1].start() if i + 1 < len(objs) else len(text)
        p = _POS_RE.search(text, m.end(), end)
        if p is None:  # "top left: a red circle" names the position first
            before = list(_POS_RE.finditer(text, objs[i - 1].end() if i else 0, m.start()))
            p = before[-1] if before else None
        if p is not None:
            out.add((m.group(1), m.group(2), f"{p.group(1)} {p.group(2)}"))
    return out


_TEMPLATES: dict[int, tuple[np.ndarray, list[str]]] = {}


def _templates(q: int) -> tuple[np.ndarray, list[str]]:
    """Coverage templates [K, q, q] of every shape over a grid of centre shifts and sizes in a
    q x q quadrant (cached per q), and the shape of each."""
    if q not in _TEMPLATES:
        shifts = np.linspace(-1.5, 1.5, 7) * q / 8
        out, names = [], []
        for shape in SHAPES:
            for dy in shifts:
                for dx in shifts:
                    for f in (0.8, 0.9, 1.0, 1.1, 1.2):
                        out.append(coverage(shape, q, q / 2 + dy, q / 2 + dx, 0.36 * q * f))
                        names.append(shape)
        _TEMPLATES[q] = (np.stack(out), names)
    return _TEMPLATES[q]


def detect_objects(image: torch.Tensor | np.ndarray, min_frac: float = 1 / 16) -> set[Obj]:
    """Colour-segmentation checker. image [3, H, W] in [-1, 1] -> the objects it shows.

    A pixel is foreground if its brightest channel is over half intensity; its colour is the set
    of channels over half of that maximum. A quadrant holds an object if at least ``min_frac`` of
    it is foreground; its colour is the majority colour, its shape that of the coverage template
    (any shift and size, see ``_templates``) closest in L2 to the quadrant's brightness map."""
    x = ((torch.as_tensor(image).float().clamp(-1, 1) + 1) / 2).numpy()
    _, h, w = x.shape
    names = {v: k for k, v in COLOURS.items()}
    templates, shape_of = _templates(h // 2)
    found = set()
    for qi, pos in enumerate(POSITIONS):
        r0, c0 = (qi // 2) * h // 2, (qi % 2) * w // 2
        quad = x[:, r0:r0 + h // 2, c0:c0 + w // 2]
        peak = quad.max(axis=0)
        fg = peak > 0.5
        if fg.sum() < min_frac * fg.size:
            continue
        bits = (quad > 0.5 * peak[None])[:, fg].T.astype(int)  # [n_fg, 3] colour code of each pixel
        values, counts = np.unique(bits, axis=0, return_counts=True)
        code = tuple(int(v) for v in values[counts.argmax()])
        if code not in names:
            continue
        dist = ((templates - peak[None]) ** 2).sum(axis=(1, 2))
        found.add((names[code], shape_of[int(dist.argmin())], pos))
    return found


def chance_exact(objs: list[list[Obj]]) -> float:
    """Exact-match accuracy of a guesser that knows how many objects there are and picks distinct
    quadrants and (colour, shape) pairs uniformly: 1/72 for one object, 1/(6*18^2) for two."""
    pairs = len(COLOURS) * len(SHAPES)
    p = {1: 1 / (len(POSITIONS) * pairs), 2: 1 / (6 * pairs ** 2)}
    return float(np.mean([p[len(o)] for o in objs]))
