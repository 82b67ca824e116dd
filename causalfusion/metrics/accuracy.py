"""Class accuracy of class-conditional samples: does a fixed classifier recognise the requested label?"""
from __future__ import annotations

import numpy as np
import torch


def class_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of samples whose classifier argmax equals the requested label. logits [N, K], labels [N]."""
    logits = np.asarray(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        # e.g. ImageNet labels scored with a 10-class classifier: the number would be meaningless
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for a {logits.shape[1]}-class classifier")
    return float((logits.argmax(axis=1) == labels).mean()) if labels.size else float("nan")
