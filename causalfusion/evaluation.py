"""Sample-quality evaluation of checkpoints and sample files, and in-loop evaluation during training.

* ``evaluate_checkpoint``: sample a run through :func:`causalfusion.sampling.sample` at several
  inference settings (S_eval, order, diffusion steps, CFG) and score every setting with
  :func:`causalfusion.metrics.evaluate` (FID, IS, precision/recall, class accuracy).
* ``evaluate_npz``: score an ADM-format sample file (``arr_0`` uint8 NHWC, optional ``labels``).
* ``EvalCallback``: a ``Trainer`` callback that does the former every N steps with the EMA model
  and appends the numbers to ``<run>/eval.csv`` (and TensorBoard when installed).

Feature space: the digits classifier (:class:`~causalfusion.metrics.DigitsExtractor`) for digits,
against the statistics of the digits *train* split (computed once, cached next to the classifier
as ``digits_train_ref_<extractor>.npz``); for other data an Inception-v3 from a local weights file
(``inception=PATH``) and reference statistics from ``ref=PATH`` (an ``.npz`` with mu/sigma, ADM's
reference batches work) or computed from the dataset spec (``folder:PATH``) and cached likewise.
"""
from __future__ import annotations

import csv
import hashlib
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .metrics import (DigitsExtractor, FeatureExtractor, InceptionExtractor, ReferenceStats, compute_reference_stats,
                      default_cache_dir, evaluate, load_reference_stats, save_reference_stats)

if TYPE_CHECKING:  # annotations only; the modules load lazily where they are used
    from .autoencoders import Autoencoder
    from .models import CausalFusion

METRICS = ("fid", "inception_score", "precision", "recall", "accuracy")
METRIC_NAMES = {"fid": "FID", "inception_score": "IS", "precision": "precision", "recall": "recall",
                "accuracy": "accuracy"}


# ---- feature space and reference statistics ------------------------------------------------------
def make_extractor(data: str = "digits", inception: str | Path | None = None, device: str = "cpu",
                   cache_dir: str | Path | None = None) -> FeatureExtractor:
    """The digits classifier for ``digits`` (unless ``inception`` is given), else Inception-v3 from ``inception``."""
    from .devices import check_device

    check_device(device)  # one line for a device this machine lacks, before any feature net is built
    if inception is not None:
        return InceptionExtractor(inception, device=device)
    if data == "digits":
        return DigitsExtractor(cache_dir=cache_dir, device=device)
    raise ValueError(f"evaluating {data!r} needs an Inception-v3 weights file: pass --inception PATH "
                     f"(e.g. pt_inception-2015-12-05-6726825d.pth, see docs/evaluation.md)")


def _dataset_images(data: str, image_size: int | None = None, channels: int = 3, batch: int = 256) -> torch.Tensor:
    from .data import load_dataset

    ds = load_dataset(data, image_size, channels)
    return torch.cat([ds.get(torch.arange(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)])


def reference_stats(data: str, extractor: FeatureExtractor, ref: str | Path | None = None,
                    cache_dir: str | Path | None = None, image_size: int | None = None,
                    channels: int = 3) -> ReferenceStats:
    """Reference statistics: the file ``ref`` if given, else those of ``data`` (cached on first use),
    its images at ``image_size`` pixels and ``channels`` channels: those of the samples they score.

    For ``digits`` that is the train split (1437 images, all kept for precision/recall).
    """
    if ref is not None:
        return load_reference_stats(ref)
    if data.startswith("latents:"):
        raise ValueError("reference statistics of a latent cache cannot be computed (pixels are needed): pass --ref")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = ("digits_train" if data == "digits"
           else "data_" + hashlib.sha256(f"{data}|{image_size}|{channels}".encode()).hexdigest()[:12])
    path = cache / f"{key}_ref_{extractor.name}.npz"
    if path.is_file():
        try:
            stats = load_reference_stats(path)
            if (stats.extractor == extractor.name and stats.dim == extractor.num_features
                    and np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
                return stats
        except (ValueError, OSError, zipfile.BadZipFile):
            pass  # a damaged cache entry (or a valid file with NaNs or another width): recompute it
    stats = compute_reference_stats(_dataset_images(data, image_size, channels), extractor, layout="NCHW",
                                    keep_features=10_000)
    save_reference_stats(stats, path)
    return stats


# ---- sample files --------------------------------------------------------------------------------
def load_samples_npz(path: str | Path, image_shape: tuple[int, int, int] | None = None,
                     num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W, C], labels int64 [N] or None) of an ADM sample file, checked.

    Labels are ``labels`` or, as ADM's sampling script writes them, ``arr_1``.

    ``image_shape`` (H, W, C) is required when given (digits: 8x8x1); labels must match N and lie
    in 0..num_classes-1. Every problem is a ValueError with one line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"sample file {path} not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise ValueError(f"{path} is not an .npz file (not a zip archive); expected arr_0 uint8 [N, H, W, C]")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if "arr_0" not in files:
                raise ValueError(f"{path} has no 'arr_0' (images); found {sorted(files) or 'nothing'}. "
                                 f"Expected ADM format: arr_0 uint8 [N, H, W, C], optional labels [N]")
            images = f["arr_0"]
            # ADM's image_sample.py saves np.savez(path, images, labels): its labels are arr_1
            label_key = "labels" if "labels" in files else "arr_1" if "arr_1" in files else None
            labels = f[label_key] if label_key else None
            what = "labels" if label_key == "labels" else "arr_1 (labels)"  # names the array in errors
    except ValueError as e:
        if "arr_0" in str(e):
            raise
        raise ValueError(f"{path} is not a readable .npz sample file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz sample file ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 images in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be [N, H, W, C] with C = 1 or 3, got shape {list(images.shape)}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{path}: images are {'x'.join(map(str, images.shape[1:]))} (HxWxC), "
                         f"expected {'x'.join(map(str, image_shape))}")
    if len(images) < 2:
        raise ValueError(f"{path}: need at least 2 images, got {len(images)}")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{path}: {what} has shape {list(labels.shape)} but there are {len(images)} images")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: {what} must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return images, labels


def evaluate_npz(path: str | Path, data: str = "digits", inception: str | Path | None = None,
                 ref: str | Path | None = None, device: str = "cpu", cache_dir: str | Path | None = None) -> dict:
    """Metrics of a sample file against ``data``'s reference statistics (or the file ``ref``)."""
    ext = make_extractor(data, inception, device, cache_dir)
    shape = (8, 8, 1) if data == "digits" and inception is None else None
    images, labels = load_samples_npz(path, shape, ext.num_classes)
    size = None if data == "digits" else images.shape[1]  # the reference at the samples' size and channels
    return evaluate(images, labels, ext, reference_stats(data, ext, ref, cache_dir, size, images.shape[3]),
                    layout="NHWC")


# ---- checkpoints ---------------------------------------------------------------------------------
@dataclass
class EvalSetting:
    """One inference setting of ``evaluate_checkpoint``."""

    ar_steps: int = 1
    order: str = "random"
    steps: int = 50
    cfg: float = 1.0
    block: int = 4
    dilation: int = 2
    precision: str = "fp32"  # or bf16: the model under autocast

    def label(self) -> str:
        return f"S={self.ar_steps} {self.order} T={self.steps} cfg={self.cfg:g}"


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0,1,..,K-1,0,1,.. (n of them): every class equally often (up to one)."""
    return torch.arange(num_classes).repeat(-(-n // num_classes))[:n]


def sample_uint8(model: CausalFusion, labels: torch.Tensor, setting: EvalSetting, seed: int = 0, batch_size: int = 500,
                 autoencoder: Autoencoder | None = None, compile: bool = False, progress: bool = False) -> np.ndarray:
    """Samples for ``labels`` [N] as uint8 [N, H, W, C] (decoded through ``autoencoder`` for latent runs);
    ``compile``: the model through torch.compile (``compiling``); ``progress``: a bar per batch."""
    from .images import to_uint8
    from .sampling import sample

    out = []
    for s in range(0, len(labels), batch_size):
        x = sample(model, labels[s:s + batch_size], ar_steps=setting.ar_steps, order=setting.order,
                   steps=setting.steps, cfg=setting.cfg, seed=seed, first_index=s, block=setting.block,
                   dilation=setting.dilation, precision=setting.precision, compile=compile, progress=progress)
        if autoencoder is not None:
            from .autoencoders import decode_in_batches

            x = decode_in_batches(autoencoder, x)
        out.append(to_uint8(x))
    return np.concatenate(out)


def evaluate_model(model: CausalFusion, settings: list[EvalSetting], extractor: FeatureExtractor, reference: ReferenceStats,
                   n: int = 2000, seed: int = 0, batch_size: int = 500, autoencoder: Autoencoder | None = None,
                   compile: bool = False, progress: bool = False) -> list[dict]:
    """One row per setting: the setting's fields (its ``precision`` as ``sample_precision``), the
    metrics, and the seconds it took."""
    if n < 2:
        raise ValueError(f"--n must be at least 2, got {n}")
    labels = balanced_labels(n, model.cfg.num_classes)
    score_labels = labels if model.cfg.num_classes <= extractor.num_classes else None
    rows = []
    for st in settings:
        t0 = time.perf_counter()
        images = sample_uint8(model, labels, st, seed, batch_size, autoencoder, compile, progress)
        t1 = time.perf_counter()
        m = evaluate(images, score_labels, extractor, reference, layout="NHWC")
        # the setting's fp32/bf16 goes in as sample_precision: "precision" is the precision/recall metric,
        # which a reference without features lacks (the string then reached the metric columns)
        setting = {k: v for k, v in vars(st).items() if k != "precision"} | {"sample_precision": st.precision}
        rows.append({**setting, **m, "sample_s": t1 - t0, "metric_s": time.perf_counter() - t1})
    return rows


def pixel_size_and_channels(model_cfg, autoencoder) -> tuple[int, int]:
    """(image size, channels) of a model's samples in pixels, after ``autoencoder``'s decoder."""
    return model_cfg.image_size * autoencoder.downsample, autoencoder.image_channels


def evaluate_checkpoint(ckpt: str | Path, n: int = 2000, ar_steps: int | list[int] = (1,),
                        order: str | None = None, steps: int = 250, cfg: float = 1.0, seed: int = 0,
                        data: str | None = None, inception: str | Path | None = None, ref: str | Path | None = None,
                        raw: bool = False, device: str = "cpu", batch_size: int = 500, block: int | None = None,
                        dilation: int | None = None, cache_dir: str | Path | None = None,
                        vae_path: str | Path | None = None, precision: str = "fp32", compile: bool = False,
                        progress: bool = False) -> list[dict]:
    """Sample a run at each S in ``ar_steps`` and score it (see ``evaluate_model``). ``order``,
    ``block``, ``dilation``: None = the ones the run was trained with; ``vae_path`` where a latent
    run's VAE weights are now, if moved (checked by sha256); ``precision`` fp32 or bf16 sampling;
    ``compile`` samples through torch.compile; ``progress`` shows a bar per sampling batch."""
    from .autoencoders import IdentityAutoencoder
    from .checkpoint import load_model, read_config, run_autoencoder
    from .sampling import model_order

    ar_steps = [ar_steps] if isinstance(ar_steps, int) else list(ar_steps)
    if not ar_steps:  # (--ar-steps '' or ',': no setting to sample, and the command printed nothing, exit 0)
        raise ValueError("--ar-steps: give at least one number of AR steps (S_eval), e.g. 1 or 1,2,4")
    model = load_model(ckpt, ema=not raw, device=device)
    order, block, dilation = model_order(model, order, block, dilation)
    data = data or read_config(ckpt).get("data") or "digits"
    if data.startswith("latents:") and ref is None:
        raise ValueError("for a run trained on a latent cache, pass --ref (reference statistics of the real images)")
    ae = run_autoencoder(ckpt, vae_path, device=device)
    ext = make_extractor(data, inception, device, cache_dir)
    reference = reference_stats(data, ext, ref, cache_dir, *pixel_size_and_channels(model.cfg, ae))
    ae = None if isinstance(ae, IdentityAutoencoder) else ae
    settings = [EvalSetting(s, order, steps, cfg, block, dilation, precision) for s in ar_steps]
    return evaluate_model(model, settings, ext, reference, n, seed, batch_size, ae, compile, progress)


def format_rows(rows: list[dict]) -> str:
    """A plain-text table: one line per inference setting, one column per metric."""
    head = ["S_eval", "order", "steps", "cfg", "n"] + [METRIC_NAMES[m] for m in METRICS] + ["time/s"]
    lines = [head]
    for r in rows:
        vals = [f"{r[m]:.4g}" if m in r else "-" for m in METRICS]
        lines.append([str(r["ar_steps"]), r["order"], str(r["steps"]), f"{r['cfg']:g}", str(int(r["num_samples"]))]
                     + vals + [f"{r['sample_s'] + r['metric_s']:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in lines)


def format_metrics(m: dict) -> str:
    """One line per metric: ``FID 12.3`` ..."""
    out = [f"{METRIC_NAMES[k]} {m[k]:.4f}" for k in METRICS if k in m]
    return "\n".join(out + [f"samples {int(m['num_samples'])}"])


# ---- in-loop evaluation --------------------------------------------------------------------------
class EvalCallback:
    """``Trainer`` callback: every ``every`` steps (and at the last step) score the EMA model.

    Appends ``step, ar_steps, fid, inception_score, precision, recall, accuracy, seconds`` rows to
    ``<run>/eval.csv`` and writes ``eval/<metric>_S<k>`` TensorBoard scalars when tensorboard is
    installed. Sampling uses its own generators, so the training RNG stream is untouched (a run
    with and without in-loop evaluation trains identically). ``order`` None samples in the trainer's
    training order; the block and dilation are always the trainer's.
    """

    COLUMNS = ["step", "ar_steps", *METRICS, "seconds"]

    def __init__(self, every: int, n: int = 500, ar_steps: int | list[int] = (1,), steps: int = 50,
                 order: str | None = None, cfg: float = 1.0, seed: int = 0, inception: str | Path | None = None,
                 ref: str | Path | None = None, cache_dir: str | Path | None = None, batch_size: int = 500):
        if every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {every}")
        if n < 2:
            raise ValueError(f"--eval-n must be >= 2, got {n}")
        if steps < 1:
            raise ValueError(f"--eval-steps must be >= 1, got {steps}")
        self.every, self.n, self.seed, self.batch_size = every, n, seed, batch_size
        self.order = order  # None: the trainer's (set up at the first evaluation)
        ar_steps = [ar_steps] if isinstance(ar_steps, int) else list(ar_steps)
        if not ar_steps:  # (--eval-ar-steps '' trained with an evaluation that scored nothing)
            raise ValueError("--eval-ar-steps: give at least one number of AR steps (S_eval), e.g. 1 or 1,2,4")
        self.settings = [EvalSetting(int(s), order or "random", steps, cfg) for s in ar_steps]
        self.inception, self.ref, self.cache_dir = inception, ref, cache_dir
        # The files are read now, not at the first evaluation: a missing or unreadable one stopped
        # training only then, after a checkpoint (and a run directory) existed. The weights are
        # read again by the extractor on the trainer's device; the statistics are kept.
        if inception is not None:
            from .metrics.inception import load_inception_weights

            load_inception_weights(inception)
        self._given_reference = load_reference_stats(ref) if ref is not None else None
        self._ready = False
        self.history: list[dict] = []

    def check_tokens(self, num_tokens: int) -> None:
        """Every S_eval fits a model of ``num_tokens`` tokens (the CLI asks before anything is written)."""
        bad = [st.ar_steps for st in self.settings if not 1 <= st.ar_steps <= num_tokens]
        if bad:
            raise ValueError(f"--eval-ar-steps {bad[0]}: the model has {num_tokens} tokens (1..{num_tokens})")

    def check_data(self, data: str) -> None:
        """The files that scoring ``data`` needs were given (the CLI asks before anything is written)."""
        if data.startswith("latents:") and self.ref is None:
            raise ValueError("in-loop evaluation of a latent-cache run needs --eval-ref (reference statistics)")
        if data != "digits" and self.inception is None:
            raise ValueError(f"in-loop evaluation of {data!r} needs --eval-inception PATH (Inception-v3 weights, "
                             f"see docs/evaluation.md); only digits has a built-in feature network")

    def _setup(self, trainer) -> None:
        from .autoencoders import IdentityAutoencoder
        from .checkpoint import run_autoencoder

        data = trainer.dataset.name
        self.check_data(data)
        dev = trainer.cfg.device
        ae = run_autoencoder(trainer.out, device=dev)
        self.extractor = make_extractor(data, self.inception, dev, self.cache_dir)
        self.reference = self._given_reference
        if self.reference is None:
            self.reference = reference_stats(data, self.extractor, None, self.cache_dir,
                                             *pixel_size_and_channels(trainer.model_cfg, ae))
        self.check_tokens(trainer.model_cfg.num_tokens)
        plan = trainer.plan_cfg  # sample in the order the run trains with (or the given one, same tiles)
        for st in self.settings:
            st.order, st.block, st.dilation = self.order or plan.order, plan.block, plan.dilation
        self.autoencoder = None if isinstance(ae, IdentityAutoencoder) else ae
        self.path = Path(trainer.out) / "eval.csv"
        self.writer = None
        if trainer.is_main:
            from .trainer import _tensorboard

            self.writer = _tensorboard(Path(trainer.out))
        self._ready = True

    def __call__(self, trainer, last: dict) -> None:
        if not trainer.is_main or not (trainer.step % self.every == 0 or trainer.step == trainer.cfg.steps):
            return
        if not self._ready:
            self._setup(trainer)
        was_training = trainer.ema.training
        trainer.ema.eval()
        rows = evaluate_model(trainer.ema, self.settings, self.extractor, self.reference, self.n, self.seed,
                              self.batch_size, self.autoencoder)
        trainer.ema.train(was_training)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.COLUMNS)
            for r in rows:
                w.writerow([trainer.step, r["ar_steps"], *(f"{r[m]:.6g}" if m in r else "" for m in METRICS),
                            f"{r['sample_s'] + r['metric_s']:.2f}"])
        for r in rows:
            self.history.append({"step": trainer.step, **r})
            if self.writer is not None:
                for m in METRICS:
                    if m in r:
                        self.writer.add_scalar(f"eval/{m}_S{r['ar_steps']}", r[m], trainer.step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
