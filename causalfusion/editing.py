"""Zero-shot image editing: inpaint, outpaint, regenerate a region with a new class (paper Sec. 6,
Fig. 2b, 7, 8; App. D).

CausalFusion is trained to predict a random subset of tokens from a random subset of clean ones,
so a class-conditional model edits with no fine-tuning: the tokens outside the mask are the clean
tokens of a first AR step (run once through the model and committed to the KV cache, exactly as a
finished group at sampling time), and the masked tokens are generated in one or more further AR
steps, in the chosen order, conditioned on them and on a (new) class label. This is
``sampling.sample`` with a known prefix (``known``/``known_tokens``): the same noise draws, orders,
CFG and cache; the visible tokens come back bit-identical, and with nothing visible an edit *is*
plain generation with the same seed.

Masks are at pixel resolution (``edit_masks``); a token is regenerated if any of its pixels is
masked. In latent space (a run with a VAE) the image is encoded, the mask is mapped to latent
tokens through the VAE's downsampling, the visible latent tokens are kept exactly and the result
is decoded (so the visible pixels are the VAE's reconstruction of them, not the input pixels).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .autoencoders import Autoencoder
from .edit_masks import parse_mask, token_mask, token_pixels
from .generation_path import GenerationPath
from .models import CausalFusion
from .sampling import model_order, sample

GREY = 0.0  # how the masked input shows the regenerated area ([-1, 1] scale: mid grey)


def _geometry(model: CausalFusion, autoencoder: Autoencoder | None) -> tuple[int, int, int]:
    """(image side in pixels, pixels per token side, image channels) of the model (+ autoencoder)."""
    c = model.cfg
    if autoencoder is None:
        return c.image_size, c.patch_size, c.in_channels
    if autoencoder.channels != c.in_channels:
        raise ValueError(f"the autoencoder gives {autoencoder.channels}-channel latents, the model takes {c.in_channels}")
    d = autoencoder.downsample
    return c.image_size * d, c.patch_size * d, autoencoder.image_channels


def edit_region(model: CausalFusion, mask, autoencoder: Autoencoder | None = None,
                fraction: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask (region name, PNG path or bool tensor [H, W], True = regenerate) -> (tokens bool [L]
    in raster order, True = regenerated; pixels bool [H, W], the area actually regenerated, i.e.
    the mask grown to token boundaries)."""
    size, cell, _ = _geometry(model, autoencoder)
    tokens = token_mask(parse_mask(mask, size, fraction), model.cfg.grid, cell)
    return tokens, token_pixels(tokens, model.cfg.grid, cell)


def _labels(class_label, batch: int, num_classes: int) -> torch.Tensor:
    """int / None (unconditional) / one per image -> long [batch], range-checked."""
    if class_label is None:
        return torch.full((batch,), num_classes, dtype=torch.long)
    y = torch.as_tensor(class_label)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim > 1:
        raise ValueError(f"the class label must be an integer (or one per image), got {class_label!r}")
    y = y.long().reshape(-1)
    if y.numel() == 1:
        y = y.expand(batch)
    if y.numel() != batch:
        raise ValueError(f"got {y.numel()} class labels for {batch} images (give one, or one per image)")
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.numel():
        raise ValueError(f"class {int(bad[0])} is out of range: the model has classes 0..{num_classes - 1}")
    return y.clone()


@torch.no_grad()
def edit(
    model: CausalFusion,
    image: torch.Tensor,
    mask: str | Path | torch.Tensor,
    class_label: int | Sequence[int] | torch.Tensor | None,
    *,
    n: int = 1,
    fraction: float | None = None,
    ar_steps: int | None = None,
    groups: Sequence[int] | None = None,
    order: str | Sequence[int] | torch.Tensor | None = None,
    steps: int | Sequence[int] = 250,
    sampler: str = "ddpm",
    eta: float = 0.0,
    cfg: float = 1.0,
    cfg_interval: tuple[float, float] = (0, 1000),
    seed: int = 0,
    first_index: int = 0,
    cache: bool = True,
    block: int | None = None,
    dilation: int | None = None,
    autoencoder: Autoencoder | None = None,
    path: GenerationPath | None = None,
    progress: bool = False,
    precision: str = "fp32",
    compile: bool = False,
) -> torch.Tensor:
    """Regenerate the masked region of ``image`` as ``class_label``, ``n`` variations per image.

    ``image``: [C, H, W] or [B, C, H, W] in [-1, 1], pixel space (what ``autoencoder`` encodes;
    without one, the model's own space). ``mask``: a region name of ``edit_masks.REGIONS`` (sized
    by ``fraction``), a mask image file (white = regenerate) or a bool tensor [H, W] (an all-False
    tensor regenerates nothing and returns the input). ``class_label``: an int, one per image, or
    None (the null class: unconditional inpainting). ``ar_steps``/``groups`` split the *masked*
    tokens into AR steps (default 1), ``order`` orders them (a name, or a permutation of all L
    tokens whose relative order of the masked ones is used). The other options are ``sample``'s;
    sample ``first_index + i`` draws from its own generators, so with nothing visible the result
    equals ``sample`` with the same seed. Returns [B*n, C, H, W] (each image's n variations
    together; [n, C, H, W] for a single image), decoded to pixels when there is an autoencoder.
    """
    size, _, channels = _geometry(model, autoencoder)
    images = image[None] if image.ndim == 3 else image
    if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"images must be [{channels}, {size}, {size}] or [B, {channels}, {size}, {size}], "
                         f"got {list(image.shape)}")
    if n < 1:
        raise ValueError(f"the number of variations must be >= 1, got {n}")
    labels = _labels(class_label, images.shape[0], model.cfg.num_classes)
    regen, _ = edit_region(model, mask, autoencoder, fraction)
    masked = int(regen.sum())
    if masked and groups is None and ar_steps is not None and not 1 <= ar_steps <= masked:
        raise ValueError(f"the mask regenerates {masked} tokens: the number of AR steps must be in 1..{masked}, got {ar_steps}")
    known = images.float() if autoencoder is None else autoencoder.encode(images).float()
    known = known.to(next(model.parameters()).device).repeat_interleave(n, 0)
    out = sample(model, labels.repeat_interleave(n), ar_steps=ar_steps, groups=groups, order=order, steps=steps,
                 sampler=sampler, eta=eta, cfg=cfg, cfg_interval=cfg_interval, seed=seed, first_index=first_index,
                 cache=cache, block=block, dilation=dilation, path=path, progress=progress, precision=precision,
                 compile=compile, known=known, known_tokens=~regen)
    return out if autoencoder is None else autoencoder.decode(out)


def masked_view(images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The images with the regenerated area shown grey (the 'masked input' column)."""
    return torch.where(pixels.to(images.device), torch.full_like(images, GREY), images)


def edit_figure(originals: torch.Tensor, pixels: torch.Tensor, edits: torch.Tensor, n: int) -> torch.Tensor:
    """One row per original: [original | masked input | n variations] (the paper's figure layout).
    Returns the images in grid order; save with ``images.save_grid(..., nrow=n + 2)``."""
    b = originals.shape[0]
    if edits.shape[0] != b * n:
        raise ValueError(f"expected {b * n} edits ({n} per original), got {edits.shape[0]}")
    rows = [torch.cat([originals[i:i + 1], masked_view(originals[i:i + 1], pixels), edits[i * n:(i + 1) * n]])
            for i in range(b)]
    return torch.cat(rows).cpu().float()


# ---- evaluation on the digits model ---------------------------------------------------------
def new_classes(labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """A different class for every image, cycling through all the others: (y + 1 + i mod (K-1)) mod K."""
    i = torch.arange(len(labels))
    return (labels + 1 + i % (num_classes - 1)) % num_classes


@torch.no_grad()
def edit_accuracy(
    model: CausalFusion,
    *,
    regions: Sequence[str] = ("top", "bottom"),
    num: int = 100,
    cfgs: Sequence[float] = (1.0,),
    ar_steps: int | None = None,
    order: str | None = None,
    steps: int = 50,
    sampler: str = "ddpm",
    eta: float = 0.0,
    cfg_interval: tuple[float, float] = (0, 1000),
    block: int | None = None,
    dilation: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 100,
    cache: bool = True,
    fraction: float | None = None,
    progress: bool = False,
    compile: bool = False,
) -> list[dict]:
    """Edit held-out digits to a new class and ask the digits classifier what it reads.

    The first ``num`` images of ``load_digits_split("test")`` get a new class each (``new_classes``);
    for every region and CFG scale the region is regenerated as the new class. Each row reports how
    often the classifier reads the new class on the edited images (``edited_new``), on the unedited
    images (``baseline_new``, the baseline), how often it still reads the old class after the edit
    (``edited_old``), and, for reference, how often it reads the new class on plain samples of it
    (``generated_new``: S=1, same steps, CFG and seed, no visible context). ``order``/``block``/
    ``dilation`` None: the model's training ones; the sampler options are ``sample``'s.
    """
    from .data import load_digits_split
    from .digits_check import classify_digits

    c = model.cfg
    if (c.in_channels, c.image_size, c.num_classes) != (1, 8, 10):
        raise ValueError("edit accuracy needs the 8x8 one-channel 10-class digits model")
    if num < 1 or batch_size < 1:
        raise ValueError(f"the number of digits and the batch size must be >= 1, got {num} and {batch_size}")
    x, y = load_digits_split("test")
    if num > len(y):
        raise ValueError(f"the digits test split has {len(y)} images, asked for {num}")
    x, y = x[:num], y[:num]
    target = new_classes(y, c.num_classes)
    read = classify_digits(x)
    baseline_new = float((read == target.numpy()).mean())
    baseline_old = float((read == y.numpy()).mean())
    order, block, dilation = model_order(model, order, block, dilation)
    kw = dict(steps=steps, sampler=sampler, eta=eta, cfg_interval=cfg_interval, seed=seed, cache=cache,
              progress=progress, precision=precision, compile=compile)
    rows = []
    for cfg in cfgs:
        gen = torch.cat([sample(model, target[s:s + batch_size], cfg=cfg, first_index=s, **kw)
                         for s in range(0, num, batch_size)])
        generated_new = float((classify_digits(gen) == target.numpy()).mean())
        for region in regions:
            out = torch.cat([edit(model, x[s:s + batch_size], region, target[s:s + batch_size], fraction=fraction,
                                  ar_steps=ar_steps, order=order, block=block, dilation=dilation, cfg=cfg,
                                  first_index=s, **kw)
                             for s in range(0, num, batch_size)])
            pred = classify_digits(out)
            rows.append(dict(region=region, cfg=float(cfg), ar_steps=ar_steps or 1, order=order, steps=steps, n=num,
                             baseline_new=baseline_new, baseline_old=baseline_old,
                             edited_new=float((pred == target.numpy()).mean()),
                             edited_old=float((pred == y.numpy()).mean()), generated_new=generated_new))
    return rows


def format_accuracy(rows: list[dict]) -> str:
    """The rows of ``edit_accuracy`` as a Markdown table (percentages)."""
    head = ("| region | CFG | AR steps | digits | unedited read as new class (baseline) | edited read as new class "
            "| edited still read as old class | plain samples of the new class read as it |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['region']} | {r['cfg']:g} | {r['ar_steps']} ({r['order']}) | {r['n']} | "
                     f"{100 * r['baseline_new']:.1f}% | {100 * r['edited_new']:.1f}% | {100 * r['edited_old']:.1f}% | "
                     f"{100 * r['generated_new']:.1f}% |")
    return "\n".join(lines)
