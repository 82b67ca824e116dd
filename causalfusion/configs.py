"""The paper's training configurations by name (Tab. 9 ablations, Tab. 10 system models), and the
glue that turns ``causalfusion train`` flags into a dataset in the right latent space and a
(distributed) trainer.

``--config in256-system-XL`` fills in everything the paper fixes; flags given explicitly still
win. Numbers and where they come from:

* image 256 (512 for ``in512-system-XL``), AdamW (0.9, 0.95), wd 0, constant lr after warmup,
  global batch 2048, warmup 40 epochs, EMA 0.9999, label dropout 0.1, γ 0.9, λ 2 (Tab. 3, 9, 10);
* learning rate: base 1e-4 per 256 images, scaled linearly with the batch (implementation facts:
  "lr 1e-4 at batch 256, scaled with batch"; the release trains XL at batch 256 with lr 1e-4),
  so 8e-4 at 2048;
* ablation (Tab. 9): SD-VAE 8x / 4 channels, patch 2, CausalFusion-L (24 x 1024 x 16), 4 class
  tokens, fixed sin-cos positions, 240 epochs -> 32x32x4 latents, 256 tokens;
* system (Tab. 10): KL-16 VAE (MAR, 16x / 16 channels, scale 0.2325), patch 1, 64 class tokens,
  learnable positions, 800 epochs -> 16x16x16 latents, 256 tokens. L/XL/H = 24x1024x16,
  32x1280x20, 40x1408x22 (Tab. 10; the release's H has 48 layers).
* ``in512-system-XL``: 512 px -> 32x32x16 KL-16 latents; patch 2 keeps 256 tokens (the paper
  calls the 512 model "CausalFusion-XL/2", Fig. 1b). Its training length is not given in the
  paper beyond the 800 epochs of Fig. 1b.

Epochs become steps with ImageNet-1k's 1,281,167 training images (``steps_per_epoch``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .autoencoders import DEFAULTS as AE_DEFAULTS
from .models import PRESETS, ModelConfig, count_parameters

if TYPE_CHECKING:  # annotations only: the trainers load when one is made
    from .ar_plan import ARPlanConfig
    from .data import Dataset
    from .trainer import Trainer, TrainConfig

IMAGENET_TRAIN_IMAGES = 1_281_167
# Parameter counts the paper states (Sec. 6, Tab. 8), for comparison in `causalfusion configs`.
PAPER_PARAMS = {"in256-ablation": 308e6, "in256-system-L": 368e6, "in256-system-XL": 676e6, "in256-system-H": 1e9,
                "in512-system-XL": 676e6}


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr`` is the learning rate at ``reference_batch`` images (paper: 1e-4 at 256)."""
    return base_lr * global_batch / reference_batch


@dataclass(frozen=True)
class PaperConfig:
    name: str
    image_size: int  # pixels
    vae: str  # sd-vae | kl16
    patch_size: int
    model: str  # models.PRESETS key
    class_tokens: int
    learn_pos: bool
    epochs: int
    gamma: float = 0.9
    lam: float = 2.0
    base_lr: float = 1e-4  # per 256 images
    batch_size: int = 2048
    warmup_epochs: int = 40
    ema_decay: float = 0.9999  # plain, from step 0 (no warm-up), as in the release
    label_dropout: float = 0.1
    num_classes: int = 1000
    source: str = ""

    @property
    def latent_size(self) -> int:
        return self.image_size // AE_DEFAULTS[self.vae]["downsample"]

    @property
    def latent_channels(self) -> int:
        return AE_DEFAULTS[self.vae]["channels"]

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def lr(self) -> float:
        return scaled_lr(self.base_lr, self.batch_size)

    def steps_per_epoch(self, num_images: int = IMAGENET_TRAIN_IMAGES) -> int:
        return math.ceil(num_images / self.batch_size)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_preset(self.model, image_size=self.latent_size, in_channels=self.latent_channels,
                                       patch_size=self.patch_size, num_classes=self.num_classes,
                                       class_tokens=self.class_tokens, learn_pos=self.learn_pos)

    def train_args(self, num_images: int = IMAGENET_TRAIN_IMAGES, batch_size: int | None = None) -> dict:
        """``causalfusion train`` argument values (namespace names) this configuration sets.

        With another global ``batch_size`` the lr follows the linear rule and the warmup and
        training lengths stay the same in epochs."""
        batch = batch_size or self.batch_size
        spe = math.ceil(num_images / batch)
        return dict(image_size=self.image_size, vae=self.vae, patch_size=self.patch_size, preset=self.model,
                    class_tokens=self.class_tokens, learn_pos=self.learn_pos, gamma=self.gamma, lam=self.lam,
                    batch_size=batch, lr=scaled_lr(self.base_lr, batch), warmup=self.warmup_epochs * spe,
                    steps=self.epochs * spe,
                    ema_decay=self.ema_decay, ema_warmup=False, label_dropout=self.label_dropout, precision="bf16",
                    sample_every=0, ckpt_every=5000, log_every=100)

    def describe(self) -> str:
        return (f"{self.name}: {self.image_size}px, {self.vae} -> {self.latent_channels}x{self.latent_size}x{self.latent_size}"
                f" latents, patch {self.patch_size} -> {self.num_tokens} tokens; CausalFusion-{self.model} "
                f"({PRESETS[self.model]['depth']}x{PRESETS[self.model]['hidden_size']}x{PRESETS[self.model]['num_heads']}), "
                f"{self.class_tokens} class tokens, {'learnable' if self.learn_pos else 'sin-cos'} positions; "
                f"gamma {self.gamma}, lambda {self.lam}; batch {self.batch_size}, lr {self.lr:g} "
                f"({self.base_lr:g} per 256), warmup {self.warmup_epochs} epochs, {self.epochs} epochs")


_SYSTEM = dict(image_size=256, vae="kl16", patch_size=1, class_tokens=64, learn_pos=True, epochs=800,
               source="paper Tab. 10")
PAPER_CONFIGS: dict[str, PaperConfig] = {c.name: c for c in (
    PaperConfig("in256-ablation", image_size=256, vae="sd-vae", patch_size=2, model="L", class_tokens=4,
                learn_pos=False, epochs=240, source="paper Tab. 9"),
    PaperConfig("in256-system-L", model="L", **_SYSTEM),
    PaperConfig("in256-system-XL", model="XL", **_SYSTEM),
    PaperConfig("in256-system-H", model="H", **_SYSTEM),
    PaperConfig("in512-system-XL", model="XL", **{**_SYSTEM, "image_size": 512, "patch_size": 2,
                                                  "source": "paper Tab. 10, Fig. 1b (XL/2 at 512)"}),
)}


def get_config(name: str) -> PaperConfig:
    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PAPER_CONFIGS)}")
    return PAPER_CONFIGS[name]


def config_table() -> list[dict]:
    """One row per paper configuration: settings, parameter count, and the paper's count."""
    rows = []
    for c in PAPER_CONFIGS.values():
        n = count_parameters(c.model_config())
        paper = PAPER_PARAMS[c.name]
        rows.append({**asdict(c), "params": n, "paper_params": paper, "diff_pct": 100 * (n - paper) / paper,
                     "tokens": c.num_tokens, "lr": c.lr})
    return rows


# ---- `causalfusion train` glue ---------------------------------------------------------------------
def add_scale_args(p: argparse.ArgumentParser) -> None:
    """Flags of the latent space, the paper presets and multi-process training."""
    g = p.add_argument_group("paper presets, latent space and scale")
    g.add_argument("--config", default=None, choices=list(PAPER_CONFIGS),
                   help="paper configuration (image size, VAE, patch, model, tokens, positions, γ, λ, lr, batch, warmup, "
                        "epochs); explicit flags win")
    g.add_argument("--vae", default=None, choices=["identity", "sd-vae", "kl16"],
                   help="latent space: identity (pixels, default), sd-vae (8x, 4 ch) or kl16 (16x, 16 ch); "
                        "with folder data the images are encoded on the fly, latents:DIR data carry their own")
    g.add_argument("--vae-path", default=None,
                   help="diffusers AutoencoderKL directory (or a cached Hugging Face repo id); never downloaded")
    g.add_argument("--base-lr", type=float, default=None, help="learning rate per 256 images: lr = base-lr x batch / 256")
    g.add_argument("--strategy", default=None, choices=["ddp", "fsdp"],
                   help="torchrun data parallelism: ddp (default) or fsdp (FSDP2 fully_shard)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per process and step (default 1)")
    g.add_argument("--grad-ckpt", action="store_true", default=None, help="gradient (activation) checkpointing")


def explicit_dests(argv: list[str], add_args) -> set[str]:
    """Names of the arguments given on the command line (rather than left at their defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    add_args(p)
    for act in p._actions:
        act.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns))


def apply_paper_config(a: argparse.Namespace, given: set[str]) -> PaperConfig | None:
    """Fill in the values of ``--config`` that were not given explicitly; resolve ``--base-lr``."""
    cfg = None
    if getattr(a, "config", None):
        cfg = get_config(a.config)
        batch = a.batch_size if "batch_size" in given else None
        for k, v in cfg.train_args(batch_size=batch).items():
            if k not in given and hasattr(a, k):
                setattr(a, k, v)
    if getattr(a, "base_lr", None) is not None and "lr" not in given:
        batch = a.batch_size if a.batch_size is not None else None
        if batch is None:
            raise ValueError("--base-lr needs the global batch: pass --batch-size too")
        a.lr = scaled_lr(a.base_lr, batch)
    return cfg


def training_dataset(a: argparse.Namespace, data: str, image_size: int | None, saved: dict | None, device: str = "cpu"):
    """The training ``Dataset`` in its latent space: pixels, a folder encoded on the fly, or a latent cache.

    Refuses (one line) a cache or a VAE that differs from the one the run was started with.
    """
    from .autoencoders import (autoencoder_from_spec, check_same_autoencoder, load_autoencoder, resolve_weights,
                               weights_digest)
    from .data import load_dataset
    from .latent_cache import EncodedDataset, open_latent_cache

    kind = getattr(a, "vae", None)
    path = getattr(a, "vae_path", None)
    saved_ae = (saved or {}).get("autoencoder")
    if data.startswith("latents:"):
        ds = open_latent_cache(data[len("latents:"):], image_size=image_size)
        if kind is not None:
            want = {"kind": kind}
            if path is not None and kind != "identity":
                want["weights_sha256"] = weights_digest(resolve_weights(path, kind))
            check_same_autoencoder(ds.autoencoder, want, "cached", "--vae")
    elif kind not in (None, "identity") or (kind is None and saved_ae and saved_ae.get("kind") != "identity"):
        base = load_dataset(data, image_size, getattr(a, "channels", None) or 3)
        if kind is None:
            ae = autoencoder_from_spec(saved_ae, path, device=device)
        else:
            ae = load_autoencoder(kind, path, device=device)
        ds = EncodedDataset(base, ae)
    else:
        ds = load_dataset(data, image_size, getattr(a, "channels", None) or 3)
    if saved is not None and saved_ae is not None:
        check_same_autoencoder(saved_ae, getattr(ds, "autoencoder", None), "run's", "given data's")
    return ds


def make_trainer(model_cfg: ModelConfig, plan_cfg: ARPlanConfig, train_cfg: TrainConfig, a: argparse.Namespace,
                 dataset: Dataset) -> Trainer:
    """``Trainer`` for a plain single-process run, ``DistributedTrainer`` under torchrun or with
    FSDP2 / accumulation / checkpointing (one process and none of those: the two are identical)."""
    from .distributed import DistributedTrainer, ScaleConfig, launched_by_torchrun
    from .trainer import Trainer

    scale = ScaleConfig(strategy=getattr(a, "strategy", None) or "ddp", grad_accum=getattr(a, "grad_accum", None) or 1,
                        grad_ckpt=bool(getattr(a, "grad_ckpt", None)))
    if launched_by_torchrun() or scale != ScaleConfig():
        return DistributedTrainer(model_cfg, plan_cfg, train_cfg, resume=a.resume, dataset=dataset, scale=scale)
    return Trainer(model_cfg, plan_cfg, train_cfg, resume=a.resume, dataset=dataset)


def finish_paper_config(a: argparse.Namespace, given: set[str], train_cfg, num_images: int) -> None:
    """Count ``--config``'s warmup and training length (in epochs) on the dataset actually loaded
    (before it was loaded, ImageNet's 1,281,167 images were assumed)."""
    if not getattr(a, "config", None):
        return
    args = get_config(a.config).train_args(num_images=num_images, batch_size=train_cfg.batch_size)
    for key in ("warmup", "steps"):
        if key not in given:
            setattr(train_cfg, key, args[key])
