"""The paper's training configurations by name (Tab. 9 ablations, Tab. 10 system models).
(``run_config.train_configs(out, config=NAME, ...)`` turns them, and the settings given, into a
run, as ``causalfusion train --config NAME`` does; ``PaperConfig.configs`` gives the same three configs.)

``--config in256-system-XL`` fills in everything the paper fixes; flags given explicitly still
win. Numbers and where they come from:

* image 256 (512 for ``in512-system-XL``), AdamW (0.9, 0.95), eps 1e-15 (the release's train.py
  default), wd 0, constant lr after warmup,
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

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from .ar_plan import ARPlanConfig
from .autoencoders import DEFAULTS as AE_DEFAULTS
from .models import PRESETS, ModelConfig, count_parameters

if TYPE_CHECKING:
    from .trainer import TrainConfig

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
    adam_eps: float = 1e-15  # the release's train.py (--eps); torch's default is 1e-8
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

    def model_config(self, num_classes: int | None = None) -> ModelConfig:
        """The model of this configuration (``num_classes``: the data's; default ImageNet's 1000)."""
        return ModelConfig.from_preset(self.model, image_size=self.latent_size, in_channels=self.latent_channels,
                                       patch_size=self.patch_size, num_classes=num_classes or self.num_classes,
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
                    ema_decay=self.ema_decay, ema_warmup=False, adam_eps=self.adam_eps,
                    label_dropout=self.label_dropout, precision="bf16",
                    sample_every=0, ckpt_every=5000, log_every=100)

    def configs(self, data: str, out: str, num_images: int = IMAGENET_TRAIN_IMAGES, batch_size: int | None = None,
                num_classes: int | None = None, **train: object) -> tuple[ModelConfig, ARPlanConfig, "TrainConfig"]:
        """The three configs ``causalfusion train --config NAME`` builds, for Python users: epochs
        counted on ``num_images`` and classes ``num_classes`` (``len(dataset)``, its ``num_classes``;
        default ImageNet's), ``train`` overriding TrainConfig fields. The data goes in latent space
        through ``latent_cache.training_dataset(data, self.image_size, vae=self.vae, vae_path=...)``."""
        from .trainer import TrainConfig  # (not at import: `causalfusion configs` needs no trainer)

        names = {f.name for f in fields(TrainConfig)}
        if set(train) - names:
            raise ValueError(f"not TrainConfig fields: {', '.join(sorted(set(train) - names))}")
        args = {k: v for k, v in self.train_args(num_images, batch_size).items() if k in names}
        tc = TrainConfig(**{**args, "data": data, "out": out, "image_size": self.image_size, **train})
        return self.model_config(num_classes), ARPlanConfig(gamma=self.gamma, lam=self.lam), tc

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
