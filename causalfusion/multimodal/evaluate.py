"""Evaluation on ``shapes``: program-checked T2I accuracy, caption accuracy, CIDEr and FID.

* T2I accuracy: ``shapes.detect_objects`` on each generated image must find exactly the
  prompt's (colour, shape, position) triples ("exact"); "object" counts prompt objects found;
  "colour_pos" counts prompt objects whose quadrant holds the named colour (any shape). The
  ``shuffled/`` versions score the same images against the next image's prompt: what
  generation that ignores the prompt would score (an empirical chance level).
* Caption accuracy: ``shapes.parse_caption`` of the generated caption must equal the truth
  ("exact"); "attribute" is the mean correctness of colour, shape and position per true object.
* CIDEr(-D): pycocoevalcap's scorer (the maintained COCO implementation; pip install
  pycocoevalcap), all paraphrases of an image as references, lower-case word tokens (our
  captions need no PTB tokenizer, so no Java at evaluation time).
* FID: ``causalfusion.metrics.fid_from_features`` on the 64-d features of ``ShapesExtractor``, a
  small CNN trained for a few seconds (seeded, cached) to name each quadrant's object.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..metrics import FeatureExtractor, default_cache_dir, fid_from_features
from .shapes import COLOURS, POSITIONS, SHAPES, Obj, chance_exact, detect_objects, make_shapes, parse_caption

if TYPE_CHECKING:
    from .model import MultimodalCausalFusion
    from .tokenizer import TextTokenizer


# ---- accuracies -----------------------------------------------------------------------------------
def t2i_accuracy(images: torch.Tensor, truth: list[list[Obj]]) -> dict[str, float]:
    """images [N, 3, H, W] in [-1, 1] generated from prompts naming ``truth`` -> exact / object accuracy."""
    found = [detect_objects(img) for img in images]
    exact = np.mean([f == set(t) for f, t in zip(found, truth)])
    obj = np.mean([o in f for f, t in zip(found, truth) for o in t])
    colour_pos = np.mean([(c, p) in {(fc, fp) for fc, _, fp in f} for f, t in zip(found, truth) for c, _, p in t])
    return {"t2i_exact": float(exact), "t2i_object": float(obj), "t2i_colour_pos": float(colour_pos)}


def caption_accuracy(captions: list[str], truth: list[list[Obj]]) -> dict[str, float]:
    """Generated captions vs the true objects -> exact-set accuracy and per-attribute accuracy."""
    exact, attr = [], []
    for text, objs in zip(captions, truth):
        pred = parse_caption(text)
        exact.append(pred == set(objs))
        for c, s, p in objs:
            # a caption may name two objects at one position: credit the better one (a dict over the
            # parsed set would keep whichever the per-process string hash happens to put last)
            named = [(pc, ps) for pc, ps, pp in pred if pp == p]
            attr.append(max((np.mean([1, pc == c, ps == s]) for pc, ps in named), default=0.0))
    return {"caption_exact": float(np.mean(exact)), "caption_attribute": float(np.mean(attr))}


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(references: list[list[str]], candidates: list[str]) -> float:
    """Corpus CIDEr-D (x1, as COCO reports it x100 elsewhere) of one candidate per image."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ValueError("CIDEr needs pycocoevalcap: pip install pycocoevalcap") from None
    if len(references) != len(candidates) or not candidates:
        raise ValueError(f"need one candidate per reference list, got {len(candidates)} and {len(references)}")
    gts = {i: [_words(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_words(c)] for i, c in enumerate(candidates)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ---- the FID feature extractor ----------------------------------------------------------------------
NUM_QUAD_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # empty, or one (colour, shape) pair


def quadrant_labels(objs: list[list[Obj]]) -> torch.Tensor:
    """Objects -> class of each quadrant [N, 4] (0 = empty, 1 + colour * 3 + shape)."""
    colours, out = list(COLOURS), torch.zeros(len(objs), len(POSITIONS), dtype=torch.long)
    for i, o in enumerate(objs):
        for c, s, p in o:
            out[i, POSITIONS.index(p)] = 1 + colours.index(c) * len(SHAPES) + SHAPES.index(s)
    return out


class ShapesNet(nn.Module):
    """conv(32) -> conv(64, /2) -> conv(64, /2) -> fc 64 [features] -> 4 x 19 quadrant logits."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 64, 3, 2, 1)
        self.fc = nn.Linear(64 * (size // 4) ** 2, 64)
        self.out = nn.Linear(64, len(POSITIONS) * NUM_QUAD_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        feat = F.relu(self.fc(h.flatten(1)))
        return feat, self.out(feat)


def train_shapes_net(size: int = 16, n: int = 3000, epochs: int = 4, seed: int = 0) -> ShapesNet:
    """Train on all attribute combinations (train + heldout pairs), fixed seed (~seconds on CPU)."""
    torch.manual_seed(seed)
    xa, _, oa = make_shapes("train", n, size, seed=1000 + seed)
    xb, _, ob = make_shapes("heldout", n // 4, size, seed=1000 + seed)
    x, y = torch.cat([xa, xb]), quadrant_labels(oa + ob)
    net = ShapesNet(size)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            _, logits = net(x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g))
            loss = F.cross_entropy(logits.view(-1, NUM_QUAD_CLASSES), y[idx].view(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


class ShapesExtractor(FeatureExtractor):
    """64-d features of ``ShapesNet`` (trained once, cached in ``default_cache_dir()``)."""

    num_features = 64
    num_classes = len(POSITIONS) * NUM_QUAD_CLASSES

    def __init__(self, size: int = 16, device: str = "cpu", batch_size: int = 256, cache_dir: str | Path | None = None):
        super().__init__(device, batch_size)
        self.name = f"shapes_cnn_v1_{size}px"
        path = Path(cache_dir or default_cache_dir()) / f"{self.name}.safetensors"
        self.net = ShapesNet(size)
        if path.is_file():
            self.net.load_state_dict(load_file(str(path)))
        else:
            self.net = train_shapes_net(size)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(self.net.state_dict(), str(path))
        self.net = self.net.to(self.device).eval()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)


def fid(real: torch.Tensor, fake: torch.Tensor, extractor: FeatureExtractor) -> float:
    """FID between two image sets [N, 3, H, W] in [-1, 1] in ``extractor``'s feature space."""
    return fid_from_features(extractor.features(real).numpy(), extractor.features(fake).numpy())


# ---- one model on one split -----------------------------------------------------------------------
def evaluate_model(model: MultimodalCausalFusion, tokenizer: TextTokenizer, split: str = "test", n: int = 256, *, cfg: float = 3.0, steps: int = 50,
                   ar_steps: int | None = None, seed: int = 0, extractor: FeatureExtractor | None = None,
                   batch_size: int = 128) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """T2I + captioning metrics of ``model`` on ``n`` images of a shapes split (seed 0 data).

    Prompt i is paraphrase i mod 5 of image i's captions. Returns (metrics, generated images
    [n, 3, H, W], generated captions)."""
    from ..sampling import check_cfg
    from .generate import caption, text_to_image

    if n < 1:  # else torch.cat([]) or make_shapes(-n) fails with a torch message
        raise ValueError(f"the number of evaluation images must be >= 1, got {n}")
    check_cfg(cfg, (0, 1000))
    images, caps, objs = make_shapes(split, n, model.cfg.image_size, seed=0)
    prompts = [c[i % len(c)] for i, c in enumerate(caps)]
    gen = torch.cat([text_to_image(model, tokenizer, prompts[s:s + batch_size], cfg=cfg, steps=steps,
                                   ar_steps=ar_steps, seed=seed, first_index=s)
                     for s in range(0, n, batch_size)]).clamp(-1, 1).cpu()  # a GPU model's samples: the checker reads numpy
    texts = [t for s in range(0, n, batch_size) for t in caption(model, tokenizer, images[s:s + batch_size])]
    shuffled = t2i_accuracy(gen, objs[1:] + objs[:1])
    out = {**t2i_accuracy(gen, objs), **{f"shuffled/{k}": v for k, v in shuffled.items()},
           **caption_accuracy(texts, objs), "cider": cider(caps, texts), "chance_exact": chance_exact(objs)}
    if extractor is not None:
        out["fid"] = fid(images, gen, extractor)
    return out, gen, texts

