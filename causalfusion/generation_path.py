"""The generation path as an animated GIF (the picture of the paper's Fig. 1).

``GenerationPath`` is handed to ``sampling.sample(..., path=...)``. At a few diffusion steps of
every AR step it keeps a picture of a handful of samples: the groups of finished AR steps as
clean tokens, the current group as the model's current prediction of its clean tokens (x0,
default) or its noisy state (x_t), and the groups still to come in a flat colour. A bar along
the bottom shows the progress over AR steps x diffusion steps. ``save_gif`` writes the frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_path
from .images import grid_scale, make_grid

PENDING_RGB = (40, 56, 104)  # tokens not generated yet
BAR_RGB = (230, 120, 30)


class GenerationPath:
    def __init__(self, max_images: int = 16, frames_per_ar_step: int = 8, max_frames: int = 240,
                 show: str = "x0"):
        if show not in ("x0", "xt"):
            raise ValueError(f"the path GIF shows 'x0' (prediction) or 'xt' (noisy state), got {show!r}")
        if max_images < 1 or frames_per_ar_step < 1 or max_frames < 1:
            raise ValueError("max_images, frames_per_ar_step and max_frames must be >= 1")
        self.max_images, self.frames_per_ar_step, self.max_frames, self.show = max_images, frames_per_ar_step, max_frames, show
        self.frames: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # images, pending mask, progress
        self.final: torch.Tensor | None = None
        self._pick: torch.Tensor | None = None

    def wants(self, s: int, num_ar_steps: int, i: int, num_diffusion_steps: int) -> bool:
        """Keep diffusion index i of AR step s? A few evenly spaced ones, always the last (i=0)."""
        per = max(1, min(self.frames_per_ar_step, self.max_frames // num_ar_steps, num_diffusion_steps))
        if num_ar_steps > self.max_frames:  # very many AR steps: only some of them, each once
            stride = -(-num_ar_steps // self.max_frames)
            return i == 0 and (s % stride == stride - 1 or s == num_ar_steps - 1)
        keep = {round(k * (num_diffusion_steps - 1) / max(per - 1, 1)) for k in range(per)} if per > 1 else {0}
        return i in keep

    def _select(self, images: torch.Tensor) -> torch.Tensor:
        if self._pick is None:  # evenly spread over the batch (one per class when sorted by class)
            n = images.shape[0]
            k = min(n, self.max_images)
            self._pick = torch.linspace(0, n - 1, k).round().long()
        return images[self._pick.to(images.device)].cpu()

    def add(self, images: torch.Tensor, pending: torch.Tensor, s: int, num_ar_steps: int, i: int) -> None:
        """images [B, C, H, W]; pending [B, 1, H, W] bool mask of the pixels not generated yet."""
        if images.shape[1] not in (1, 3):
            raise ValueError(f"the path GIF needs 1- or 3-channel images, got {images.shape[1]} channels")
        done_steps = s + 1 if i == 0 else s + 0.5
        self.frames.append((self._select(images).float(), self._select(pending), done_steps / num_ar_steps))

    def finish(self, images: torch.Tensor) -> None:
        if images.shape[1] in (1, 3) and self._pick is not None:
            self.final = self._select(images).float()

    def render(self, images: torch.Tensor, pending: torch.Tensor, progress: float, scale: int) -> np.ndarray:
        rgb = images.clamp(-1, 1).expand(-1, 3, -1, -1).clone()
        colour = torch.tensor(PENDING_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
        rgb = torch.where(pending, colour, rgb)
        nrow = max(1, int(round(len(rgb) ** 0.5)))
        pic = make_grid(rgb, nrow=nrow, scale=scale)
        bar = np.full((max(2, scale), pic.shape[1], 3), 255, dtype=np.uint8)
        bar[:, : int(round(progress * pic.shape[1]))] = BAR_RGB
        return np.concatenate([pic, bar], axis=0)

    def save_gif(self, path: str | Path, scale: int | None = None, frame_ms: int = 80, hold_ms: int = 2000) -> Path:
        """Write the frames (then the final images, held) as a looping GIF (``scale`` None: ``grid_scale``)."""
        from PIL import Image

        if not self.frames:
            raise ValueError("no frames were recorded (was the path passed to sample()?)")
        scale = scale or grid_scale(self.frames[0][0].shape[-1])
        pics = [self.render(im, pend, prog, scale) for im, pend, prog in self.frames]
        if self.final is not None:
            pics.append(self.render(self.final, torch.zeros_like(self.frames[-1][1]), 1.0, scale))
        frames = [Image.fromarray(p).convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for p in pics]
        durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return path
