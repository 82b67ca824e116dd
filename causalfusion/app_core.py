"""What the web app does, without the web: controls in, the library's sampling and editing called,
pictures out (``causalfusion.app`` is the gradio page around these functions).

Every control arrives as the page gives it (text or a number) and is checked here; a bad value is a
``ValueError`` whose one line the page shows. Pictures for the page are uint8 arrays [H, W, 3],
each model image enlarged by an integer factor (nearest) so that small images can be seen and
painted on (``display_scale``), with ``PAD`` white pixels between the images of a grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .ar_plan import ORDERS
from .autoencoders import Autoencoder, decode_in_batches
from .checkpoint import load_model, read_config, run_autoencoder
from .cli.common import finite_images, ints, parse_classes
from .data import center_crop_resize, image_to_tensor, open_image
from .edit_masks import REGIONS, parse_mask
from .editing import edit, edit_figure, edit_region
from .generation_path import GenerationPath
from .images import make_grid
from .models import CausalFusion
from .sampling import model_order, sample

DISPLAY_SIDE = 256  # shown images are enlarged to about this many pixels per side
PAD = 2  # white pixels between the images of a shown grid
PAINTED = "painted"  # the mask choice that reads the brush strokes instead of a named region
MASK_CHOICES = (PAINTED, *REGIONS)
PAINT_COVER = 0.25  # a model pixel is masked when at least this share of its enlarged block is painted
MAX_IMAGES = 64  # images per request: a page request should answer in seconds, not minutes


@dataclass
class AppModel:
    """A loaded run: the model (EMA weights), its autoencoder (identity for pixel runs), its class names."""

    model: CausalFusion
    autoencoder: Autoencoder
    ckpt: str
    class_names: list[str] | None = None

    @property
    def size(self) -> int:
        """Image side in pixels (after decoding, for latent runs)."""
        return self.model.cfg.image_size * self.autoencoder.downsample

    @property
    def channels(self) -> int:
        """Image channels in pixels."""
        return self.autoencoder.image_channels

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes

    @property
    def trained_order(self) -> str:
        """The token order the run was trained with (the page's default order)."""
        order = model_order(self.model)[0]
        return order if isinstance(order, str) else "random"

    @property
    def scale(self) -> int:
        return display_scale(self.size)


def load_app_model(ckpt: str | Path, vae_path: str | Path | None = None, device: str = "cpu") -> AppModel:
    """A run directory (trained, converted or exported; latent runs with their VAE) -> ``AppModel``."""
    model = load_model(ckpt, ema=True, device=device)
    ae = run_autoencoder(ckpt, vae_path, device=device)
    if ae.channels != model.cfg.in_channels:
        raise ValueError(f"the autoencoder gives {ae.channels}-channel latents, the model takes {model.cfg.in_channels}")
    names = read_config(ckpt).get("classes")
    names = [str(n) for n in names] if isinstance(names, list) and len(names) == model.cfg.num_classes else None
    return AppModel(model, ae, str(ckpt), names)


def display_scale(side: int) -> int:
    """Integer enlargement that shows an image of ``side`` pixels at about ``DISPLAY_SIDE`` pixels."""
    return max(1, DISPLAY_SIDE // side)


def to_picture(images: torch.Tensor, nrow: int, scale: int) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] (C = 1 or 3) -> one uint8 RGB grid [rows*(H*scale+PAD)+PAD, ..., 3]."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"only 1- or 3-channel images can be shown, got {images.shape[1]} channels")
    pic = make_grid(images.cpu().float(), nrow=nrow, pad=PAD, scale=scale)
    return np.repeat(pic, 3, axis=2) if pic.shape[2] == 1 else pic


# ---- controls -------------------------------------------------------------------------------------
def _int(value, name: str, lo: int, hi: int | None = None) -> int:
    """A whole number from a page field (gradio numbers arrive as floats), range-checked."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    v = int(f)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}" if hi is not None else f"{name} must be >= {lo}, got {v}")
    return v


def _float(value, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def parse_sampler_controls(am: AppModel, *, ar_steps, groups: str | None, order: str | None, sample_steps,
                           cfg, cfg_interval: str, seed) -> dict:
    """The page's sampler fields -> keyword arguments of ``sampling.sample`` / ``editing.edit``.

    ``ar_steps`` S (ignored when ``groups`` "4,4,8" is given); ``order`` a name of ``ORDERS`` or
    empty for the run's own; ``sample_steps`` diffusion steps per AR step, one number or one per AR
    step ("20,10"); ``cfg_interval`` "LO,HI"."""
    groups_list = ints(groups, "group sizes") if groups and groups.strip() else None
    if groups_list is not None and not groups_list:
        raise ValueError(f"group sizes expects comma-separated integers, got {groups!r}")
    order = (order or "").strip() or None
    if order is not None and order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    steps = ints(str(sample_steps), "diffusion steps")
    if not steps:
        raise ValueError("diffusion steps expects a number (or one per AR step, comma separated)")
    try:
        lo, hi = (float(v) for v in str(cfg_interval).split(","))
    except ValueError:
        raise ValueError(f"CFG interval expects LO,HI (e.g. 0,1000), got {cfg_interval!r}") from None
    return dict(ar_steps=None if groups_list else _int(ar_steps, "AR steps", 1), groups=groups_list, order=order,
                steps=steps, cfg=_float(cfg, "CFG scale"), cfg_interval=(lo, hi), seed=_int(seed, "seed", 0))


def _path_for(am: AppModel, n: int) -> GenerationPath | None:
    """A recorder of the generation path, where the model's images can be shown (1 or 3 channels)."""
    return GenerationPath(max_images=min(n, 16)) if am.model.cfg.in_channels in (1, 3) else None


def _save_path(path: GenerationPath | None, gif: str | Path | None, am: AppModel) -> str | None:
    if path is None or gif is None or not path.frames:
        return None
    return str(path.save_gif(gif, scale=max(1, am.scale // 2)))


# ---- sampling -------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    images: torch.Tensor  # [N, C, H, W] pixels in [-1, 1]
    labels: list[int]
    picture: np.ndarray  # the grid shown, uint8 [H, W, 3]
    nrow: int
    gif: str | None  # the generation-path animation (None: not recorded)
    message: str


def run_sample(am: AppModel, *, classes: str | None, n, gif: str | Path | None = None, progress: bool = True,
               **sampler_fields) -> SampleResult:
    """Sample ``n`` images of ``classes`` ("3" or "0,1,2"; empty: every class in turn), sorted by
    class; ``sampler_fields`` are ``parse_sampler_controls``'s. ``gif``: where to write the path."""
    n = _int(n, "number of images", 1, MAX_IMAGES)
    kw = parse_sampler_controls(am, **sampler_fields)
    text = classes.strip() if classes else ""
    wanted = parse_classes(text or None, am.num_classes, "class")
    labels = torch.tensor(wanted).repeat(-(-n // len(wanted)))[:n].sort(stable=True).values
    path = _path_for(am, n)
    latents = sample(am.model, labels, path=path, progress=progress, **kw)
    images = finite_images(decode_in_batches(am.autoencoder, latents))
    per_class = n // len(wanted) if n % len(wanted) == 0 and len(wanted) > 1 else 0
    nrow = per_class or math.ceil(math.sqrt(n))
    num_ar = len(kw["groups"]) if kw["groups"] else kw["ar_steps"]
    msg = (f"{n} sample(s) of class {', '.join(map(str, sorted(set(labels.tolist()))))}: {num_ar} AR step(s), "
           f"order {kw['order'] or am.trained_order}, {','.join(map(str, kw['steps']))} diffusion step(s), "
           f"CFG {kw['cfg']:g}, seed {kw['seed']}")
    return SampleResult(images, labels.tolist(), to_picture(images, nrow, am.scale), nrow, _save_path(path, gif, am), msg)


# ---- editing inputs ---------------------------------------------------------------------------------
def prepare_upload(path: str | Path, am: AppModel) -> tuple[torch.Tensor, str]:
    """An uploaded file -> (image [C, size, size] in [-1, 1], a line saying what was done to it).

    A picture of another size is centre-cropped to a square and resized to the model's size (the
    training crop); colour is converted to the model's channels (grey or RGB)."""
    if am.channels not in (1, 3):
        raise ValueError(f"the model's images have {am.channels} channels: only grey or RGB models take an uploaded picture")
    name = Path(path).name
    try:
        img = open_image(path, "the upload")
    except ValueError:
        raise ValueError(f"the upload {name} is not an image PIL can read (give a PNG or JPEG)") from None
    except Image.DecompressionBombError:
        raise ValueError(f"the upload {name} has too many pixels to open safely") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"the upload {name} has no pixels")
    steps = []
    if w != h:
        steps.append(f"centre-cropped to {min(w, h)}x{min(w, h)}")
    if min(w, h) != am.size:
        steps.append(f"resized to {am.size}x{am.size}")
    picture = center_crop_resize(img, am.size)
    done = " and ".join(steps) if steps else "used as it is"
    return image_to_tensor(picture, am.channels), f"{name} ({w}x{h}): {done}"


def painted_mask(layers: list[np.ndarray] | None, size: int) -> torch.Tensor:
    """Brush layers of the editor (each [H, W, 4] RGBA, or [H, W, 3] / [H, W] where any non-zero
    pixel is paint) -> bool [size, size] pixel mask: a model pixel is masked when at least
    ``PAINT_COVER`` of its block of the layer is painted. The layers must be square multiples of
    ``size`` (the editor shows the image enlarged by an integer factor)."""
    if not layers:
        return torch.zeros(size, size, dtype=torch.bool)
    paint = None
    for layer in layers:
        a = np.asarray(layer)
        a = a[..., 3] > 0 if a.ndim == 3 and a.shape[2] == 4 else (a.reshape(*a.shape[:2], -1) > 0).any(axis=2)
        paint = a if paint is None else paint | a
    h, w = paint.shape
    if h != w or h % size:
        raise ValueError(f"the painted layer is {w}x{h}; expected a square a whole multiple of {size} pixels "
                         f"(reload the image into the editor)")
    k = h // size
    cover = paint.reshape(size, k, size, k).mean(axis=(1, 3))
    return torch.from_numpy(cover >= PAINT_COVER)


def build_mask(am: AppModel, choice: str, fraction, layers: list[np.ndarray] | None) -> torch.Tensor:
    """The mask field -> bool [size, size] pixel mask (True = regenerate): a named region sized by
    ``fraction``, or the painted strokes (``PAINTED``). An empty mask is refused."""
    if choice == PAINTED:
        mask = painted_mask(layers, am.size)
        if not mask.any():
            raise ValueError("the mask is empty: paint over the region to regenerate (or pick a preset mask)")
        return mask
    if choice not in REGIONS:
        raise ValueError(f"unknown mask {choice!r}; choose one of {', '.join(MASK_CHOICES)}")
    return parse_mask(choice, am.size, _float(fraction, "mask fraction"))


def editor_background(image: torch.Tensor, am: AppModel) -> np.ndarray:
    """The image [C, H, W] as the editor shows it (enlarged, RGB uint8), to paint the mask on."""
    return to_picture(image[None], 1, am.scale)[PAD:-PAD, PAD:-PAD]


# ---- editing -------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    edits: torch.Tensor  # [n, C, H, W] pixels in [-1, 1]
    regenerated: torch.Tensor  # bool [H, W]: the mask grown to token boundaries
    picture: np.ndarray  # original | masked input | n variations, uint8 [H, W, 3]
    gif: str | None
    message: str


def run_edit(am: AppModel, image: torch.Tensor | None, mask: torch.Tensor, *, new_class, n,
             gif: str | Path | None = None, progress: bool = True, **sampler_fields) -> EditResult:
    """Regenerate ``mask`` (bool [H, W]) of ``image`` [C, H, W] as ``new_class``, ``n`` variations;
    ``sampler_fields`` are ``parse_sampler_controls``'s (AR steps split the masked tokens)."""
    if image is None:
        raise ValueError("no image to edit: sample one, or upload a picture")
    n = _int(n, "variations", 1, MAX_IMAGES)
    label = _int(new_class, "new class", 0, am.num_classes - 1)
    kw = parse_sampler_controls(am, **sampler_fields)
    _, pixels = edit_region(am.model, mask, am.autoencoder)
    path = _path_for(am, n)
    edits = finite_images(edit(am.model, image, mask, label, n=n, autoencoder=am.autoencoder, path=path,
                               progress=progress, **kw))
    picture = to_picture(edit_figure(image[None], pixels, edits, n), n + 2, am.scale)
    kept = int((~pixels).sum())
    msg = (f"{n} variation(s) as class {label}: {int(pixels.sum())} pixels regenerated, {kept} kept; "
           f"{','.join(map(str, kw['steps']))} diffusion step(s), seed {kw['seed']}")
    return EditResult(edits, pixels, picture, _save_path(path, gif, am), msg)

