"""Sample-quality metrics: FID, Inception Score, precision/recall (Kynkäänniemi et al.), class accuracy.

Metrics are computed on features/logits of a pluggable :class:`FeatureExtractor`:

* :class:`InceptionExtractor` -- Inception-v3 from a local weights file (FID/IS as in papers);
* :class:`DigitsExtractor` -- a small CNN trained (seconds, cached) on scikit-learn digits.

Typical use::

    ext = DigitsExtractor()
    ref = compute_reference_stats(real_images, ext); save_reference_stats(ref, "digits_ref.npz")
    evaluate(samples_uint8_nhwc, labels, ext, "digits_ref.npz")  # {'fid': ..., 'precision': ...}
"""
from .accuracy import class_accuracy
from .digits import DigitsExtractor, DigitsNet, load_digits_classifier, train_digits_classifier
from .evaluate import evaluate
from .extractor import FeatureExtractor, default_cache_dir
from .fid import fid_from_features, frechet_distance, gaussian_stats
from .inception import InceptionExtractor, InceptionV3, build_inception, load_inception_weights
from .inception_score import inception_score
from .precision_recall import knn_radii, manifold_membership, precision_recall
from .preprocess import to_nchw_float
from .reference import (ReferenceStats, compute_reference_stats, load_reference_stats, reference_from_features,
                        save_reference_stats)

__all__ = [
    "DigitsExtractor", "DigitsNet", "FeatureExtractor", "InceptionExtractor", "InceptionV3", "ReferenceStats",
    "build_inception", "class_accuracy", "compute_reference_stats", "default_cache_dir", "evaluate",
    "fid_from_features", "frechet_distance", "gaussian_stats", "inception_score", "knn_radii",
    "load_digits_classifier", "load_inception_weights", "load_reference_stats", "manifold_membership",
    "precision_recall", "reference_from_features", "save_reference_stats", "to_nchw_float",
    "train_digits_classifier",
]
