"""Reference statistics of a real dataset: Gaussian fit (mu, sigma) for FID plus features for precision/recall.

File format: ``.npz`` with ``mu`` [D] and ``sigma`` [D, D] (float64), as in the ADM evaluation suite's
reference batches, plus optional ``features`` [N, D] (float32, for precision/recall) and ``extractor``
(the feature space's name, a unicode scalar). ADM's own reference files (which also hold images
``arr_0`` and spatial stats) load fine; they simply have no features, so precision/recall are skipped.
Loaded with ``allow_pickle=False``.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from .extractor import FeatureExtractor
from .fid import gaussian_stats
from .preprocess import ImageBatch


@dataclass
class ReferenceStats:
    """mu [D], sigma [D, D], features [N, D] or None, extractor name or None (unknown feature space)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    extractor: str | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def reference_from_features(features: np.ndarray | torch.Tensor, extractor: str | None = None,
                            keep_features: int | None = None, seed: int = 0) -> ReferenceStats:
    """Statistics of ``features`` [N, D]; ``keep_features`` caps the rows kept for precision/recall.

    The Gaussian fit always uses all N rows; only the stored subset (seeded random choice) is capped,
    because k-NN precision/recall costs O(N^2) while the fit is cheap.
    """
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    mu, sigma = gaussian_stats(feats)
    kept = feats
    if keep_features is not None and keep_features < len(feats):
        kept = feats[np.sort(np.random.default_rng(seed).choice(len(feats), keep_features, replace=False))]
    return ReferenceStats(mu, sigma, kept.astype(np.float32), extractor)


def compute_reference_stats(images: ImageBatch, extractor: FeatureExtractor, layout: str = "auto",
                            keep_features: int | None = None) -> ReferenceStats:
    """Reference statistics of real ``images`` (uint8 [0, 255] or float [-1, 1]; NCHW or NHWC)."""
    feats, _ = extractor.features_and_logits(images, layout)
    return reference_from_features(feats, extractor.name, keep_features)


def save_reference_stats(stats: ReferenceStats, path: str | Path) -> None:
    """Write ``stats`` as .npz (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    if stats.extractor is not None:
        arrays["extractor"] = np.array(stats.extractor)  # unicode dtype, loadable without pickle
    with atomic_path(path, ".tmp.npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, **arrays)


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """Read a reference .npz (ours or ADM's); needs at least ``mu`` and ``sigma``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(6)
    # np.load takes any file that is neither zip nor .npy for a pickle ("holds pickled objects" for a
    # text file): tell the two apart first
    if not magic.startswith((b"PK\x03\x04", b"\x93NUMPY")):
        raise ValueError(f"{path} is not a reference-statistics .npz: not a NumPy file (no zip or .npy header)")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a single array, not an .npz archive")
        with data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}; expected an .npz with 'mu' and 'sigma'")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            features = data["features"] if "features" in data.files else None
            extractor = str(data["extractor"]) if "extractor" in data.files else None
    except ValueError as e:
        if str(path) in str(e):
            raise
        # np.load's own text for object arrays invites unpickling: say what is wrong instead
        why = "holds pickled objects (refused)" if "pickle" in str(e) else str(e).splitlines()[0]
        raise ValueError(f"{path} is not a reference-statistics .npz: {why}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a [D] / [D, D] pair")
    for name, arr in (("mu", mu), ("sigma", sigma)) + ((("features", features),) if features is not None else ()):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"{path} holds non-finite values (NaN or inf in array {name!r})")
    return ReferenceStats(mu, sigma, features, extractor)
