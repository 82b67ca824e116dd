"""Training data: scikit-learn's digits (built in, no download) and ImageFolder trees.

Images are float tensors in [-1, 1], NCHW. Batches are drawn by a ``BatchStream`` whose only state
is a torch.Generator, so a resumed run draws exactly the batches the uninterrupted run would.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DIGITS_SPLIT_SEED = 0  # fixed train/test split, shared by training, the classifier check and metrics


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits: images [N, 1, 8, 8] in [-1, 1] and labels [N] (train 80% / test 20%, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    images = torch.from_numpy(x.astype(np.float32)).view(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    return images, torch.from_numpy(y.astype(np.int64))


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and decode an image file; a ValueError (one line) for a missing or damaged one.

    16-bit greyscale (PIL modes ``I;16*`` and ``I``) is rescaled to 8 bits (``L``): PIL's own
    ``convert("L")`` clips those values at 255 instead, which turns almost every pixel white.
    Floating-point images (mode ``F``) have no agreed range and are refused."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {p} not found")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {p} is not an image ({type(e).__name__})") from None
    if img.mode == "I" or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    elif img.mode == "F":
        raise ValueError(f"{what} {p} has floating-point pixels (mode F); save it as an 8- or 16-bit image")
    return img


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with BOX while large, resize the short side to ``size`` (BICUBIC), crop.

    Any mode but L and RGB is converted to RGB first, as ADM/DiT convert every image to RGB before
    cropping: PIL resizes palette (P) and bilevel (1) images with NEAREST whatever filter is asked
    for, and LA/RGBA ones with premultiplied alpha (transparent pixels turn black), so converting
    after the resize would give other pixels. L stays L: BOX and BICUBIC act on each band alone, so
    a grey image resized and then made RGB equals the RGB image resized."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """PIL image -> [C, H, W] float in [-1, 1]."""
    img = img.convert("L" if channels == 1 else "RGB")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr / 127.5 - 1.0


@dataclass
class Dataset:
    """A labelled image set held as tensors (digits) or as file paths (folders, loaded per batch)."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    labels: torch.Tensor  # [N]
    images: torch.Tensor | None = None  # [N, C, H, W] when held in memory
    paths: list[Path] | None = None
    classes: list[str] | None = None
    flip: bool = False  # random horizontal flip (never for digits: a mirrored 3 is not a 3)
    posterior: bool = False  # VAE latents: ``get`` draws from the posterior when given seeds

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: torch.Tensor, flip: torch.Tensor | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Images [len(index), C, H, W]; ``flip`` (bool [len(index)]) mirrors the marked ones horizontally.

        Subclasses (latent caches, on-the-fly VAE encoding) override this, flip semantics included;
        with ``posterior`` they draw latents from the VAE posterior with ``seeds`` (int64 [len(index)]),
        and without seeds return its mean. Pixels ignore ``seeds``.
        """
        if self.images is not None:
            x = self.images[index]
        else:
            read = lambda i: image_to_tensor(center_crop_resize(open_image(self.paths[i]), self.image_size),  # noqa: E731
                                             self.channels)
            x = torch.stack(list(_decode_pool().map(read, index.tolist())))  # in order; PIL decodes outside the GIL
        return x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)


@functools.cache
def _decode_pool() -> ThreadPoolExecutor:
    """Threads that open, crop and resize a batch's image files side by side."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def load_folder(root: str | Path, image_size: int, channels: int = 3) -> Dataset:
    """ImageFolder layout: ``root/<class name>/<image>``; classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for ci, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(ci)
    if not paths:
        raise ValueError(f"no images found under {root} (expected {root}/<class>/<image>.png)")
    return Dataset(f"folder:{root}", len(classes), image_size, channels, torch.tensor(labels),
                   paths=paths, classes=classes, flip=True)


def load_dataset(spec: str, image_size: int | None = None, channels: int = 3) -> Dataset:
    """``digits`` (8x8x1, 10 classes) or ``folder:PATH`` (resized/cropped to ``image_size``). A
    ``latents:DIR`` cache is opened by ``latent_cache.open_latent_cache`` (or ``training_dataset``)."""
    if spec == "digits":
        if image_size not in (None, 8):
            raise ValueError(f"digits images are 8x8, got --image-size {image_size}")
        images, labels = load_digits_split("train")
        return Dataset("digits", 10, 8, 1, labels, images=images, classes=[str(i) for i in range(10)])
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    if spec.startswith("folder:"):
        if not spec[len("folder:"):].strip():
            raise ValueError("folder: needs a path, e.g. folder:/data/imagenet/train")
        return load_folder(spec[len("folder:"):], image_size or 32, channels)
    if spec.startswith("latents:"):  # latent_cache builds on this module, so it is not imported here
        raise ValueError(f"{spec!r} is a latent cache: read it with causalfusion.latent_cache.training_dataset")
    raise ValueError(f"unknown dataset {spec!r}; use 'digits', 'folder:PATH' or 'latents:DIR'")


class EpochSampler:
    """Indices of random batches: a fresh permutation of 0..N-1 per epoch (a batch may span two),
    drawn from ``generator``; ``state``/``load_state`` make a resumed run draw the same batches."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator, name: str = "the dataset"):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if num_items < 1:  # next() would never fill a batch
            raise ValueError(f"{name} holds no images: nothing to train on")
        self.num_items, self.batch_size, self.gen, self.name = num_items, batch_size, generator, name
        self._perm, self._pos = torch.empty(0, dtype=torch.long), 0

    def next_index(self) -> torch.Tensor:
        """-> the next batch's indices [B]."""
        take, need = [], self.batch_size
        while need > 0:
            if self._pos >= len(self._perm):
                self._perm, self._pos = torch.randperm(self.num_items, generator=self.gen), 0
            chunk = self._perm[self._pos:self._pos + need]
            self._pos += len(chunk)
            need -= len(chunk)
            take.append(chunk)
        return torch.cat(take)

    def state(self) -> dict[str, torch.Tensor]:
        return {"perm": self._perm.clone(), "pos": torch.tensor(self._pos)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        perm, pos = state["perm"], int(state["pos"])
        if len(perm) and (not torch.equal(perm.sort().values, torch.arange(self.num_items)) or not 0 <= pos <= len(perm)):
            raise ValueError(f"{self.name} has {self.num_items} items, not the {len(perm)} the checkpoint was "
                             f"drawing from: the data changed since it was saved")
        self._perm, self._pos = perm.clone(), pos


class BatchStream(EpochSampler):
    """Random batches of a ``Dataset`` (images, labels), driven by one generator."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator):
        super().__init__(len(dataset), batch_size, generator, dataset.name)
        self.dataset = dataset

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images [B, C, H, W], labels [B]."""
        index, flip, seeds = self.next_indices()
        return self.dataset.get(index, flip, seeds), self.dataset.labels[index]

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draw the next batch's dataset indices [B], flips [B] (None without flip augmentation) and
        posterior seeds [B] (None unless the dataset samples VAE latents), loading nothing: a
        distributed run draws the global batch on every rank, loads its share."""
        index = self.next_index()
        flip = torch.rand(len(index), generator=self.gen) < 0.5 if self.dataset.flip else None
        seeds = torch.randint(0, 2**62, (len(index),), generator=self.gen) if self.dataset.posterior else None
        return index, flip, seeds
