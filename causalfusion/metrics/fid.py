"""Fréchet distance between Gaussian fits of feature sets (FID when the features are Inception pool3).

Implemented with numpy/scipy rather than ``torchmetrics.image.FrechetInceptionDistance``: that class
does accept a custom ``nn.Module`` here (checked with torchmetrics 1.9 / torch 2.13, no torchvision),
but it keeps its statistics inside a streaming ``Metric`` with no way to plug in precomputed
``mu``/``sigma`` (the ADM ``.npz`` reference batches), and torchmetrics is only an optional extra.
The formula below follows the reference TF/ADM/pytorch-fid code path (``scipy.linalg.sqrtm`` of
``sigma1 @ sigma2``, an ``eps * I`` retry for singular products); the tests cross-check it against
torchmetrics' eigenvalue formula when torchmetrics is installed.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D], N >= 2."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape [N>=2, D], got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ``|mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between N(mu1, S1) and N(mu2, S2).

    mu: [D]; sigma: [D, D]. Returns a Python float (>= 0 up to round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means of size {mu1.shape[0]}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns when S1 S2 is singular (common: dead ReLU units, N < D); the reference code
        # silences this too (``disp=False``) and checks the result for finiteness instead.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # S1 S2 is singular (e.g. fewer samples than dimensions): nudge both diagonals, as the
        # reference implementations do, instead of returning inf/nan.
        warnings.warn(f"FID: product of covariances is singular; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real in exact arithmetic; a small imaginary part is
        # round-off, a large one means the inputs were not covariance matrices.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
