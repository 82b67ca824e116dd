"""One call from generated samples to FID, Inception Score, precision/recall and class accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .accuracy import class_accuracy
from .extractor import FeatureExtractor
from .fid import frechet_distance, gaussian_stats
from .inception_score import inception_score
from .precision_recall import precision_recall
from .preprocess import ImageBatch
from .reference import ReferenceStats, load_reference_stats


def evaluate(images: ImageBatch, labels: np.ndarray | torch.Tensor | None, extractor: FeatureExtractor,
             reference: ReferenceStats | str | Path, *, layout: str = "auto", is_splits: int = 10,
             pr_k: int = 3, pr_batch_size: int = 4096) -> dict[str, float]:
    """Metrics of generated ``images`` against ``reference`` statistics in ``extractor``'s feature space.

    images: [N, H, W, C] uint8 (ADM sample files) or [N, C, H, W] float in [-1, 1] (``layout``
    picks or guesses the channel axis). labels: the requested classes [N] of conditional samples,
    or None. reference: :class:`ReferenceStats` or a path to its .npz.

    Returns ``fid``, ``inception_score`` / ``inception_score_std`` (over ``min(is_splits, N)``
    splits), ``precision`` / ``recall`` (only if the reference holds features), ``accuracy`` (only
    if labels are given and the extractor classifies the data's own classes, ``reads_data_labels``:
    not Inception) and ``num_samples``.
    """
    ref = reference if isinstance(reference, ReferenceStats) else load_reference_stats(reference)
    if ref.extractor is not None and ref.extractor != extractor.name:
        # FIDs across feature spaces are meaningless, and silently so: refuse instead
        raise ValueError(f"reference statistics were computed with {ref.extractor!r}, "
                         f"but the extractor is {extractor.name!r}")
    if ref.dim != extractor.num_features:
        raise ValueError(f"reference has {ref.dim}-d features, extractor gives {extractor.num_features}-d")

    feats, logits = extractor.features_and_logits(images, layout)
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    out: dict[str, float] = {"num_samples": float(n)}
    out["fid"] = frechet_distance(*gaussian_stats(feats.numpy()), ref.mu, ref.sigma)
    out["inception_score"], out["inception_score_std"] = inception_score(logits.numpy(), min(is_splits, n))
    if ref.features is not None:
        # k-NN distances on the extractor's device: O(N^2 D) work that a GPU does far faster
        out["precision"], out["recall"] = precision_recall(ref.features, feats, k=pr_k, batch_size=pr_batch_size,
                                                           device=extractor.device)
    if labels is not None and extractor.reads_data_labels:
        out["accuracy"] = class_accuracy(logits, labels)
    return out
