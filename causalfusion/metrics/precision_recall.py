"""Improved precision and recall (Kynkäänniemi et al., 2019) from k-NN manifold estimates.

Each set's manifold is the union of balls around its samples, the radius of a ball being the
distance to the sample's k-th nearest neighbour within its own set. Precision is the fraction of
generated samples inside the real manifold; recall the fraction of real samples inside the
generated one. Distances are computed block by block (``batch_size`` x ``batch_size``) so memory
stays O(batch_size^2) instead of O(N^2), as in the ADM evaluator's ManifoldEstimator.
"""
from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    # float64: the squared-distance expansion below cancels badly in float32 for near neighbours.
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    return t.to(device=device or "cpu", dtype=torch.float64)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [A, B]; BLAS matmul form, round-off near 0 snapped to exactly 0."""
    na, nb = (a * a).sum(1, keepdim=True), (b * b).sum(1, keepdim=True).T
    d2 = (na + nb - 2.0 * a @ b.T).clamp_min_(0.0)
    # identical vectors should be at distance exactly 0 (so a set covers itself); the expansion
    # leaves ~1e-16 relative noise, far below any real distance between distinct samples.
    return d2.masked_fill_(d2 <= 1e-10 * (na + nb), 0.0)


def knn_radii(features: ArrayLike, k: int = 3, batch_size: int = 4096,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Squared distance [N] from each row of ``features`` [N, D] to its k-th nearest other row."""
    x = _as_tensor(features, device)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1={n - 1}], got {k}")
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    for i in range(0, n, batch_size):
        rows = x[i:i + batch_size]
        # running k+1 smallest (the sample itself is one of them, at distance 0)
        best = torch.full((rows.shape[0], k + 1), float("inf"), dtype=torch.float64, device=x.device)
        for j in range(0, n, batch_size):
            d2 = torch.cat([best, _sq_dists(rows, x[j:j + batch_size])], dim=1)
            best = torch.topk(d2, k + 1, dim=1, largest=False).values
        radii[i:i + batch_size] = best[:, k]
    return radii


def manifold_membership(manifold: ArrayLike, radii: torch.Tensor, queries: ArrayLike, batch_size: int = 4096,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [Q]: whether each query row lies within some ball (center ``manifold`` [M, D], squared radius [M])."""
    m, q = _as_tensor(manifold, device), _as_tensor(queries, device)
    if m.shape[1] != q.shape[1]:
        raise ValueError(f"feature dimensions differ: {m.shape[1]} vs {q.shape[1]}")
    radii = radii.to(m.device, torch.float64)
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=m.device)
    for i in range(0, q.shape[0], batch_size):
        rows = q[i:i + batch_size]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=m.device)
        for j in range(0, m.shape[0], batch_size):
            hit |= (_sq_dists(rows, m[j:j + batch_size]) <= radii[None, j:j + batch_size]).any(dim=1)
        inside[i:i + batch_size] = hit
    return inside


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3, batch_size: int = 4096,
                     device: torch.device | str | None = None,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of generated ``fake_features`` [Nf, D] w.r.t. ``real_features`` [Nr, D].

    ``real_radii`` (from :func:`knn_radii` with the same k) may be passed to reuse cached reference radii.
    """
    if real_radii is None:
        real_radii = knn_radii(real_features, k, batch_size, device)
    fake_radii = knn_radii(fake_features, k, batch_size, device)
    precision = manifold_membership(real_features, real_radii, fake_features, batch_size, device)
    recall = manifold_membership(fake_features, fake_radii, real_features, batch_size, device)
    return float(precision.double().mean()), float(recall.double().mean())
