"""Linear probe of a checkpoint's representation (paper Tab. 6b, at the scale of a laptop).

The paper fine-tunes on ImageNet with a linear classifier on "average-pooled features from the
last layer". Here the model is frozen and a logistic regression is fitted on its pooled features
of the *train* split and scored on the *test* split.

How features are taken (``mode``):

* ``"t0"`` (default): the S=1 sequence of the model's own training layout, ``[condition | noisy
  tokens]``, with x_t = x_0 (the clean image) and t = 0, under the S=1 mask. Every model trains on
  this input (In-context DiT, γ=0, only ever sees it), so CausalFusion and DiT checkpoints are
  compared on equal terms.
* ``"clean"``: the clean-token path, ``[condition | clean tokens of one AR step]`` (no timestep
  embedding; clean tokens attend to the condition and to each other). Only models trained with
  S > 1 have ever seen clean tokens; a γ=0 model's clean path is untrained.

The condition is always the *null* class (the label-dropout token): the class tokens would
otherwise hand the label to the probe. (A run trained with ``--label-dropout 0`` never trained
that token; its probe reads the image under an untrained condition.) Features are the last block's outputs (before the final
LayerNorm), mean-pooled over the L image tokens, then standardised before the logistic regression.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import CausalFusion

MODES = ("t0", "clean")


@torch.no_grad()
def pooled_features(model: CausalFusion, images: torch.Tensor, mode: str = "t0", batch_size: int = 256) -> np.ndarray:
    """Mean-pooled last-layer features [N, hidden] of clean images [N, C, H, W] in model space."""
    if mode not in MODES:
        raise ValueError(f"unknown probe mode {mode!r}; choose one of {', '.join(MODES)}")
    c = model.cfg
    want = (c.in_channels, c.image_size, c.image_size)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"the model takes {'x'.join(map(str, want))} inputs, got {'x'.join(map(str, images.shape[1:]))}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        b = x.shape[0]
        t = torch.zeros(b, c.num_tokens, device=device) if mode == "t0" else None  # None: clean tokens
        null = torch.full((b,), c.num_classes, device=device, dtype=torch.long)
        out.append(model.hidden_one_step(x, null, t).float().mean(dim=1).cpu())
    return torch.cat(out).numpy()


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              c: float = 1.0, max_iter: int = 3000) -> dict:
    """Standardise + multinomial logistic regression; train and test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train_x, train_y)
    return {"accuracy": float(clf.score(test_x, test_y)), "train_accuracy": float(clf.score(train_x, train_y)),
            "n_train": int(len(train_y)), "n_test": int(len(test_y)), "feature_dim": int(train_x.shape[1])}


def probe_split(data: str, image_size: int | None = None, test_size: float = 0.2, seed: int = 0,
                channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels). Digits: the package's fixed split;
    other data (``folder:PATH``, read with ``channels``): a stratified ``test_size`` split with ``seed``."""
    from .data import load_dataset, load_digits_split

    if data == "digits":
        return (*load_digits_split("train"), *load_digits_split("test"))
    from sklearn.model_selection import train_test_split

    ds = load_dataset(data, image_size, channels)
    idx = np.arange(len(ds))
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=ds.labels.numpy())
    get = lambda ids: torch.cat([ds.get(torch.as_tensor(ids[i:i + 256])) for i in range(0, len(ids), 256)])
    return get(tr), ds.labels[tr], get(te), ds.labels[te]


def probe_model(model: CausalFusion, data: str = "digits", mode: str = "t0", image_size: int | None = None,
                pixel_baseline: bool = True) -> dict:
    """Linear-probe test accuracy of ``model``'s features on ``data`` (plus a raw-pixel baseline)."""
    x_tr, y_tr, x_te, y_te = probe_split(data, image_size, channels=model.cfg.in_channels)
    res = fit_probe(pooled_features(model, x_tr, mode), y_tr.numpy(), pooled_features(model, x_te, mode), y_te.numpy())
    res["mode"] = mode
    if pixel_baseline:
        flat = lambda x: x.reshape(len(x), -1).numpy()
        res["pixel_accuracy"] = fit_probe(flat(x_tr), y_tr.numpy(), flat(x_te), y_te.numpy())["accuracy"]
    return res


def probe_checkpoint(ckpt: str | Path, data: str | None = None, mode: str = "t0", raw: bool = False,
                     device: str = "cpu") -> dict:
    """Linear probe of a run directory's model (EMA weights unless ``raw``) on its data (or ``data``)."""
    from .checkpoint import load_model, read_config

    config = read_config(ckpt)
    model = load_model(ckpt, ema=not raw, device=device)
    data = data or config.get("data") or "digits"
    if data.startswith("latents:") or (config.get("autoencoder") or {}).get("kind", "identity") != "identity":
        raise ValueError("the probe runs on pixel-space runs only (this run works in a VAE's latent space)")
    res = probe_model(model, data, mode, image_size=model.cfg.image_size if data != "digits" else None)
    plan = config.get("plan", {})
    res.update(ckpt=str(ckpt), step=_step(ckpt), gamma=plan.get("gamma"),
               fixed_steps=plan.get("fixed_steps"))
    return res


def _step(ckpt: str | Path) -> int | None:
    from .checkpoint import read_json

    return read_json(Path(ckpt) / "state.json").get("step")


def format_probe(res: dict) -> str:
    lines = [f"probe accuracy {res['accuracy']:.4f} (test, {res['n_test']} images; train {res['train_accuracy']:.4f})",
             f"features {res['feature_dim']}-d, mode {res['mode']}"]
    if "pixel_accuracy" in res:
        lines.append(f"raw-pixel baseline {res['pixel_accuracy']:.4f}")
    return "\n".join(lines)
