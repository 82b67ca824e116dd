"""A small CNN on scikit-learn's 8x8 digits: the evaluation network for the digits experiments.

Trained on the digits train split in a few seconds on CPU and cached as
``<cache_dir>/digits_cnn_v1.safetensors`` (weights) + ``digits_cnn_v1.json`` (architecture, training
settings, test accuracy, SHA-256 of the weights). Its 64-d penultimate activations play the role of
Inception pool3 features (FID, precision/recall), its 10 logits that of the Inception logits (IS,
class accuracy). Numbers are only comparable between runs that use the same cached network; the
weights hash is in the JSON and in :attr:`DigitsExtractor.meta`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path
from .extractor import FeatureExtractor, default_cache_dir
from .preprocess import match_channels, resize

CACHE_NAME = "digits_cnn_v1"
FORMAT_VERSION = 1
ARCH = {"width": 32, "feat_dim": 64, "num_classes": 10}
TRAIN = {"seed": 0, "epochs": 15, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "max_shift": 1}


def _load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images [N, 1, 8, 8] in [-1, 1] and labels [N]: ``causalfusion.data.load_digits_split``
    (imported here, not at the top, so importing the metrics package does not import the data module)."""
    from ..data import load_digits_split

    return load_digits_split(split)


class DigitsNet(nn.Module):
    """conv3x3(32) -> conv3x3(64) -> maxpool -> fc(64) [features] -> fc(10) [logits]. x: [N, 1, 8, 8]."""

    def __init__(self, width: int = 32, feat_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, feat_dim)
        self.fc2 = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        feats = F.relu(self.fc1(h.flatten(1)))
        return feats, self.fc2(feats)


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1).

    Generated digits are rarely perfectly centred; a classifier that tolerates a one-pixel offset
    judges them on shape rather than position.
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.inference_mode()
def _accuracy(model: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images)[1].argmax(1) == labels).float().mean())


def train_digits_classifier(device: torch.device | str = "cpu") -> tuple[DigitsNet, dict]:
    """Train :class:`DigitsNet` on the digits train split (settings in ``TRAIN``) -> (model, metadata)."""
    start = time.perf_counter()
    x_tr, y_tr = _load_digits_split("train")
    x_te, y_te = _load_digits_split("test")
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    # fork_rng: seed the weight init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN["seed"])
        model = DigitsNet(**ARCH)
    model.to(device).train()
    # A net this small gains nothing from intra-op threads; on a shared CPU they make each step ~10x
    # slower (measured 90 ms vs 10 ms on 2 busy cores), so train single-threaded and restore after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(model, x_tr, y_tr, gen, device)
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    meta = {
        "format": FORMAT_VERSION, "arch": ARCH, "train": TRAIN,
        "train_accuracy": _accuracy(model, x_tr.to(device), y_tr.to(device)),
        "test_accuracy": _accuracy(model, x_te.to(device), y_te.to(device)),
        "train_seconds": round(time.perf_counter() - start, 3),
        "torch": torch.__version__,
    }
    return model, meta


def _fit(model: DigitsNet, x_tr: torch.Tensor, y_tr: torch.Tensor, gen: torch.Generator,
         device: torch.device | str) -> None:
    """AdamW + one-cycle schedule over ``TRAIN["epochs"]`` shuffled epochs with random shifts."""
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    steps_per_epoch = -(-len(x_tr) // TRAIN["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["lr"], total_steps=TRAIN["epochs"] * steps_per_epoch)
    for _ in range(TRAIN["epochs"]):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), TRAIN["batch_size"]):
            idx = perm[i:i + TRAIN["batch_size"]]
            x = _random_shift(x_tr[idx], TRAIN["max_shift"], gen).to(device)
            loss = F.cross_entropy(model(x)[1], y_tr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _try_load(weights: Path, meta_path: Path, device: torch.device | str) -> tuple[DigitsNet, dict] | None:
    """The cached classifier, or None if absent, stale (other architecture/settings) or corrupt."""
    from safetensors.torch import load_file

    if not (weights.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("format") != FORMAT_VERSION or meta.get("arch") != ARCH or meta.get("train") != TRAIN
                or meta.get("weights_sha256") != _sha256(weights)):
            return None
        model = DigitsNet(**ARCH)
        model.load_state_dict(load_file(str(weights)))
    except Exception:  # unreadable JSON/weights: retraining takes seconds, so just redo it
        return None
    return model.to(device).eval().requires_grad_(False), meta


def load_digits_classifier(cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                           retrain: bool = False) -> tuple[DigitsNet, dict, bool]:
    """(model, metadata, trained_now): the cached digits classifier, training and caching it if needed.

    ``cache_dir`` defaults to $CAUSALFUSION_CACHE or ~/.cache/causalfusion.
    """
    from safetensors.torch import save_file

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights, meta_path = cache / f"{CACHE_NAME}.safetensors", cache / f"{CACHE_NAME}.json"
    if not retrain and (loaded := _try_load(weights, meta_path, device)) is not None:
        return loaded[0], loaded[1], False
    model, meta = train_digits_classifier(device)
    cache.mkdir(parents=True, exist_ok=True)
    # write-then-rename (pid-suffixed temp names) so concurrent runs never read a half-written file;
    # the JSON goes last (the outer context exits last) and carries the weights' hash, so a
    # mismatched pair is detected and retrained.
    with atomic_path(meta_path) as tmp_m, atomic_path(weights) as tmp_w:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
        meta["weights_sha256"] = _sha256(tmp_w)
        tmp_m.write_text(json.dumps(meta, indent=2))
    return model, meta, True


class DigitsExtractor(FeatureExtractor):
    """Digits CNN: features [N, 64] (penultimate ReLU layer) and logits [N, 10].

    Inputs other than 1x8x8 are converted to grayscale and resized (antialiased) to 8x8.
    ``trained_now`` says whether constructing it had to train the network (no usable cache).
    """

    def __init__(self, cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 1024, retrain: bool = False):
        super().__init__(device, batch_size)
        self.model, self.meta, self.trained_now = load_digits_classifier(cache_dir, self.device, retrain)
        # the weights hash is part of the name: reference statistics computed with one trained copy
        # must not be compared against features of another (a retrain gives different features)
        self.name = f"{CACHE_NAME}-{self.meta['weights_sha256'][:12]}"
        self.num_features = ARCH["feat_dim"]
        self.num_classes = ARCH["num_classes"]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(resize(match_channels(x, 1), 8, antialias=True))
