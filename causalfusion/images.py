"""Image helpers: [-1, 1] tensors <-> uint8, PNG grids, ADM-style .npz sample files."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (what the ADM evaluator reads).

    Rounds to the nearest level after clamping. ADM's image_sample.py truncates instead
    (``((x + 1) * 127.5).clamp(0, 255).to(uint8)``), DiT's sample_ddp.py rounds (``+ 128.0`` then
    truncate). Truncation darkens every pixel by half a level on average; measured on the digits
    test split (+ noise) against the train reference it moves FID by ~0.03, far below sampling noise.
    """
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 picture [rows*(H+pad)+pad, ...], ``nrow`` images per row.

    ``scale`` enlarges each pixel (nearest) so that 8x8 digits are visible.
    """
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = arr[i]
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> None:
    """Write an [H, W, C] uint8 array as PNG (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def grid_scale(side: int) -> int:
    """Upscaling of saved pictures: 4x for images of 32 px or less (digits, shapes), else 1x."""
    return 4 if side <= 32 else 1


def grid_columns(n: int, row_length: int | None = None) -> int:
    """Images per row of a grid of ``n``: ``row_length`` (e.g. one row per class) while the grid it
    gives is at most 4 times wider than tall or taller than wide, else the near-square ceil(sqrt(n))."""
    if row_length and row_length > 0:
        rows = -(-n // row_length)
        if max(rows, row_length) <= 4 * min(rows, row_length):
            return row_length
    return max(1, math.ceil(math.sqrt(n)))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int | None = None) -> None:
    """A PNG grid of images [N, C, H, W] in [-1, 1]; ``scale`` None: ``grid_scale`` of their size."""
    scale = scale or grid_scale(images.shape[-1])
    save_png(make_grid(images, nrow, scale=scale), path)


def save_npz(images: torch.Tensor, labels: torch.Tensor, path: str | Path) -> None:
    """Images [N, C, H, W] in [-1, 1] and labels [N] as an ADM evaluator ``.npz``."""
    save_npz_uint8(to_uint8(images), labels, path)


def save_npz_uint8(arr: np.ndarray, labels: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """ADM evaluator format: ``arr_0`` uint8 [N, H, W, C] and ``labels`` int64 [N] (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    with atomic_path(path, ".tmp.npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, arr_0=arr, labels=labels.astype(np.int64))
