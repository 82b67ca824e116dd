"""Are the samples the digits they were asked to be? A scikit-learn SVC trained on the digits
train split (98-99% test accuracy on real digits) reads each sample; we report how often it reads
the requested class. This is the acceptance measure of the demo (README), not a training signal.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .data import load_digits_split


@lru_cache(maxsize=1)
def digits_svc():
    """RBF SVC on the raw 64 pixel values of the train split (fits in well under a second)."""
    from sklearn.svm import SVC

    x, y = load_digits_split("train")
    return SVC(gamma="scale", C=10.0).fit(x.view(len(x), -1).numpy(), y.numpy())


def classify_digits(images: torch.Tensor) -> np.ndarray:
    """[N, 1, 8, 8] in [-1, 1] -> predicted class ids [N]."""
    if images.shape[1:] != (1, 8, 8):
        raise ValueError(f"digit images must be [N, 1, 8, 8], got {list(images.shape)}")
    return digits_svc().predict(images.float().clamp(-1, 1).reshape(len(images), -1).cpu().numpy())


def class_agreement(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the classifier reads as their requested label."""
    return float((classify_digits(images) == labels.cpu().numpy()).mean())
