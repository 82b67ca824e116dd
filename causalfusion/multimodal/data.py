"""Captioned image data: the built-in ``shapes`` set, or an image folder + a JSONL of captions.

Specs accepted by :func:`load_captioned`:

* ``shapes`` / ``shapes:SPLIT`` / ``shapes:SPLIT:N`` -- procedural, see ``shapes.py``
  (splits train / test / heldout; N images, default 4096 for train, 512 otherwise);
* ``jsonl:FILE`` -- one JSON object per line, ``{"image": "rel/path.png", "caption": "..."}`` or
  ``"captions": [...]``; image paths are relative to the JSONL's folder. Images are
  centre-cropped and resized to ``image_size`` (ADM crop) once, at load time.

No horizontal flip here (unlike class-conditional training): captions say "left" and "right".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import EpochSampler, center_crop_resize, image_to_tensor, open_image
from .shapes import make_shapes


@dataclass
class CaptionDataset:
    """Images [N, 3, H, W] in [-1, 1] and a non-empty list of captions per image."""

    name: str
    images: torch.Tensor
    captions: list[list[str]]
    objects: list | None = None  # shapes only: the true (colour, shape, position) triples
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def all_captions(self) -> list[str]:
        return [c for caps in self.captions for c in caps]


def load_jsonl(path: str | Path, image_size: int = 16) -> CaptionDataset:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption file {path} not found")
    try:  # read_text's UnicodeDecodeError names neither the file nor what it should be
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (a JSONL of captions): {e.reason} at byte {e.start}") from None
    images, captions = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:  # RecursionError: json's own error for deeply nested arrays, a traceback otherwise
            rec = json.loads(line)
            caps = rec["captions"] if "captions" in rec else [rec["caption"]]
            file = path.parent / rec["image"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}:{i}: expected {{\"image\": ..., \"caption(s)\": ...}} ({e})") from None
        if isinstance(caps, str):  # "captions": "a red circle" is one caption, not 12 one-letter ones
            caps = [caps]
        if not isinstance(caps, list):
            raise ValueError(f"{path}:{i}: captions must be a list of strings")
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            raise ValueError(f"{path}:{i}: no non-empty caption")
        try:  # a corrupt or truncated image is one line naming the file, not a PIL traceback
            img = open_image(file, "image")
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
        images.append(image_to_tensor(center_crop_resize(img, image_size), 3))
        captions.append(caps)
    if not images:
        raise ValueError(f"{path} holds no captioned images")
    return CaptionDataset(f"jsonl:{path}", torch.stack(images), captions)


def load_captioned(spec: str, image_size: int | None = None, seed: int = 0) -> CaptionDataset:
    """``shapes[:SPLIT[:N]]`` or ``jsonl:FILE`` (see the module docstring)."""
    if spec == "shapes" or spec.startswith("shapes:"):
        parts = spec.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        try:
            n = int(parts[2]) if len(parts) > 2 else (4096 if split == "train" else 512)
        except ValueError:
            raise ValueError(f"bad shapes spec {spec!r}: use shapes:SPLIT:N with N an integer") from None
        if n < 1:  # an empty set would make the batch stream loop forever
            raise ValueError(f"bad shapes spec {spec!r}: N must be >= 1 images, got {n}")
        images, caps, objs = make_shapes(split, n, image_size or 16, seed)
        return CaptionDataset(f"shapes:{split}:{n}", images, caps, objs, {"seed": seed})
    if spec.startswith("jsonl:"):
        return load_jsonl(spec[len("jsonl:"):], image_size or 16)
    raise ValueError(f"unknown captioned dataset {spec!r}; use 'shapes', 'shapes:SPLIT:N' or 'jsonl:FILE'")


class CaptionStream(EpochSampler):
    """Random (image, caption) batches: a fresh image permutation per epoch and one of the image's
    captions drawn per use, all from one generator (its state is the whole stream state)."""

    def __init__(self, data: CaptionDataset, ids: torch.Tensor, lens: torch.Tensor, batch_size: int,
                 generator: torch.Generator):
        """ids [M, T], lens [M]: every caption of ``data`` tokenized, in ``all_captions`` order."""
        super().__init__(len(data), batch_size, generator, data.name)
        self.data, self.ids, self.lens = data, ids, lens
        counts = torch.tensor([len(c) for c in data.captions])
        self.first, self.count = torch.cumsum(counts, 0) - counts, counts

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> images [B, 3, H, W], text ids [B, T], text lengths [B]."""
        index = self.next_index()
        pick = (torch.rand(len(index), generator=self.gen) * self.count[index]).long()
        cap = self.first[index] + pick
        return self.data.images[index], self.ids[cap], self.lens[cap]
