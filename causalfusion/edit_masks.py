"""Edit masks and inputs: which pixels to regenerate, mapped to the model's tokens.

A mask is a bool tensor [H, W] at *pixel* resolution, True = regenerate. It comes from a named
region (``REGIONS``, sized by a fraction of the side) or from a PNG file (white = regenerate,
grey levels >= 128 count as white). The model works on tokens, so a pixel mask is mapped to
tokens: a token is regenerated if *any* of its pixels is masked (the regenerated area is the mask
grown to token boundaries). A token covers ``patch_size`` x ``patch_size`` cells of the model's
input; in latent space every cell is ``downsample`` x ``downsample`` pixels of the image.

Named regions, ``f`` the fraction (default 0.5), ``H`` the image side in pixels:

* ``top`` / ``bottom``: the first / last ``round(f*H)`` rows; ``left`` / ``right`` the columns;
* ``center``: the centred square of side ``round(f*H)`` (inpainting);
* ``outer``: everything outside the centred square of side ``H - round(f*H)`` (outpainting: a
  border of total thickness ``f*H``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import open_image as _open_image  # one clear line for a missing or damaged file

REGIONS = ("center", "top", "bottom", "left", "right", "outer")
DEFAULT_FRACTION = 0.5


def region_mask(name: str, size: int, fraction: float | None = None) -> torch.Tensor:
    """Named region -> bool [size, size] pixel mask (True = regenerate)."""
    if name not in REGIONS:
        raise ValueError(f"unknown mask region {name!r}; choose one of {', '.join(REGIONS)} or give a PNG mask file")
    f = DEFAULT_FRACTION if fraction is None else float(fraction)
    if not 0 < f <= 1:
        raise ValueError(f"the mask fraction must be in (0, 1], got {f:g}")
    k = int(round(f * size))
    m = torch.zeros(size, size, dtype=torch.bool)
    if name == "top":
        m[:k] = True
    elif name == "bottom":
        m[size - k:] = True
    elif name == "left":
        m[:, :k] = True
    elif name == "right":
        m[:, size - k:] = True
    elif name == "center":
        a = (size - k) // 2
        m[a:a + k, a:a + k] = True
    else:  # outer
        inner = size - k
        a = (size - inner) // 2
        m[:] = True
        m[a:a + inner, a:a + inner] = False
    if not m.any():
        raise ValueError(f"the mask is empty: region {name} with fraction {f:g} covers no pixel of a {size}x{size} image")
    return m


def load_mask_png(path: str | Path, size: int) -> torch.Tensor:
    """PNG (any image file) -> bool [size, size]; white (>= 128 grey) = regenerate."""
    img = _open_image(path, "mask file")
    if img.size != (size, size):
        raise ValueError(f"mask {path} is {img.size[0]}x{img.size[1]}, the images are {size}x{size} pixels")
    arr = np.asarray(img.convert("L"))
    return torch.from_numpy(arr >= 128)


def parse_mask(spec: str | Path | torch.Tensor, size: int, fraction: float | None = None) -> torch.Tensor:
    """A region name, a mask file path, or a bool/0-1 tensor [size, size] -> checked bool pixel mask.

    An empty named or file mask is refused (nothing to edit is a mistake there); an all-False
    tensor is accepted (the API's "whole image visible" case)."""
    if fraction is not None and not (isinstance(spec, str) and spec in REGIONS):
        raise ValueError("a mask fraction applies to named regions only, not to a mask file or tensor")
    if isinstance(spec, torch.Tensor):
        m = spec
        if m.dtype != torch.bool:
            if m.is_floating_point() and not ((m == 0) | (m == 1)).all():
                raise ValueError("a mask tensor must be bool or hold only 0 and 1")
            m = m != 0
        if tuple(m.shape) != (size, size):
            raise ValueError(f"the mask is {'x'.join(map(str, m.shape))}, the images are {size}x{size} pixels")
        return m.bool()  # an all-False tensor is allowed here: nothing is regenerated
    if isinstance(spec, str) and spec in REGIONS:
        return region_mask(spec, size, fraction)
    if isinstance(spec, str) and not Path(spec).exists() and "/" not in spec and "." not in spec:
        raise ValueError(f"unknown mask region {spec!r}; choose one of {', '.join(REGIONS)} or give a PNG mask file")
    m = load_mask_png(spec, size)
    if not m.any():
        raise ValueError(f"mask {spec} is empty: no pixel is white (white = regenerate)")
    return m


def token_mask(pixel_mask: torch.Tensor, grid: tuple[int, int], cell: int) -> torch.Tensor:
    """bool [H, W] pixel mask -> bool [L] in raster token order: a token is regenerated if any of
    its ``cell`` x ``cell`` pixels is masked."""
    gh, gw = grid
    if tuple(pixel_mask.shape) != (gh * cell, gw * cell):
        raise ValueError(f"the mask is {'x'.join(map(str, pixel_mask.shape))}, the images are {gh * cell}x{gw * cell} pixels")
    return pixel_mask.reshape(gh, cell, gw, cell).any(dim=3).any(dim=1).flatten()


def token_pixels(tokens: torch.Tensor, grid: tuple[int, int], cell: int) -> torch.Tensor:
    """bool [L] (raster) -> bool [H, W]: the pixels of the marked tokens (the area actually regenerated)."""
    gh, gw = grid
    return tokens.view(gh, 1, gw, 1).expand(gh, cell, gw, cell).reshape(gh * cell, gw * cell)


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """An image file -> [channels, size, size] in [-1, 1]. No resizing and no colour conversion: a
    file of another size or channel count is refused (one line)."""
    img = _open_image(path, "image")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    bands = len(img.getbands())
    if bands != channels:
        want = {1: "grey (L)", 3: "RGB"}.get(channels, f"{channels}-channel")
        raise ValueError(f"image {path} has {bands} channels ({img.mode}); the model's images are {want}")
    if img.size != (size, size):
        raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]}, the model's images are {size}x{size} pixels")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr / 127.5 - 1.0
