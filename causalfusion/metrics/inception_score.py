"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.

Own numpy code rather than ``torchmetrics.image.InceptionScore`` (which does accept a custom module
here): torchmetrics randomly permutes the samples before splitting (results change run to run) and
reports the unbiased std, while the original improved-GAN / ADM code splits in order and uses the
population std. We follow the original.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, xlogy


def inception_score(preds: np.ndarray, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """IS mean and std over ``splits`` contiguous chunks of ``preds`` [N, K].

    ``preds`` are logits (``from_logits=True``) or class probabilities (rows summing to 1).
    Bounds: 1 (every prediction identical) <= IS <= K (confident and uniform over classes).
    """
    preds = np.asarray(preds, dtype=np.float64)
    if preds.ndim != 2:
        raise ValueError(f"preds must be [N, K], got shape {preds.shape}")
    n = preds.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if from_logits:
        log_p = log_softmax(preds, axis=1)
        p = np.exp(log_p)
    else:
        if (preds < 0).any() or not np.allclose(preds.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probabilities must be non-negative with rows summing to 1 (or pass from_logits=True)")
        p = preds

    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        # xlogy gives 0 * log 0 = 0, so one-hot probabilities are handled exactly.
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
