"""The interface every feature extractor implements: batched features [N, D] and logits [N, K]."""
from __future__ import annotations

import abc
import os
from pathlib import Path

import torch

from .preprocess import ImageBatch, to_nchw_float


class FeatureExtractor(abc.ABC):
    """A frozen network mapping images to features (FID, precision/recall) and logits (IS, accuracy).

    Subclasses set ``name`` (identifies the feature space; stored with reference statistics so FIDs
    from different networks are never compared), ``num_features``, ``num_classes`` and implement
    :meth:`_forward`. Inputs are uint8 [0, 255] or float [-1, 1] images, NCHW.
    """

    name: str
    num_features: int
    num_classes: int
    # whether the logits are over the *data's* classes, so that "does it read the requested label"
    # (class accuracy) means something; an ImageNet classifier scoring folder / digit labels does not
    reads_data_labels: bool = True

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [B, C, H, W] in [-1, 1] on ``self.device`` -> (features [B, D], logits [B, K])."""

    @torch.inference_mode()
    def features_and_logits(self, images: ImageBatch, layout: str = "NCHW") -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, D], logits [N, K]) as float32 CPU tensors, computed ``batch_size`` images at a time."""
        feats, logits = [], []
        n = images.shape[0]
        for i in range(0, n, self.batch_size):
            # convert per batch: a uint8 -> float32 copy of a whole evaluation set can be large
            x = to_nchw_float(images[i:i + self.batch_size], layout).to(self.device)
            f, lg = self._forward(x)
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        if not feats:
            return torch.empty(0, self.num_features), torch.empty(0, self.num_classes)
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: ImageBatch, layout: str = "NCHW") -> torch.Tensor:
        """Features [N, num_features] (float32, CPU)."""
        return self.features_and_logits(images, layout)[0]

    def logits(self, images: ImageBatch, layout: str = "NCHW") -> torch.Tensor:
        """Class logits [N, num_classes] (float32, CPU)."""
        return self.features_and_logits(images, layout)[1]


def default_cache_dir() -> Path:
    """Where downloaded/trained evaluation networks live: $CAUSALFUSION_CACHE or ~/.cache/causalfusion."""
    env = os.environ.get("CAUSALFUSION_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "causalfusion"
    if path.exists() and not path.is_dir():
        raise ValueError(f"the cache directory {path} ({'$CAUSALFUSION_CACHE' if env else 'default'}) is a file")
    return path
