"""Input normalisation shared by the extractors: any image batch -> float32 NCHW in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ImageBatch = np.ndarray | torch.Tensor


def to_nchw_float(images: ImageBatch, layout: str = "NCHW") -> torch.Tensor:
    """Image batch -> float32 [N, C, H, W] in [-1, 1] (on the input's device).

    ``images``: uint8 in [0, 255] (scaled to [-1, 1]) or float already in [-1, 1]; [N, H, W]
    (grayscale), [N, C, H, W] or [N, H, W, C]. ``layout``: "NCHW", "NHWC" or "auto" (channel axis
    guessed from which of dims 1 / -1 has size 1 or 3 -- ADM sample files are uint8 NHWC).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(1 if layout != "NHWC" else -1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
    if layout == "auto":
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if first == last:
            raise ValueError(f"cannot tell the channel axis of shape {tuple(x.shape)}; pass layout='NCHW' or 'NHWC'")
        layout = "NCHW" if first else "NHWC"
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ValueError(f"layout must be 'NCHW', 'NHWC' or 'auto', got {layout!r}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    return x.float()


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale -> RGB by repetition, RGB -> grayscale by channel mean. x: [N, C, H, W]."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def resize(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to [N, C, size, size] (no-op when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
