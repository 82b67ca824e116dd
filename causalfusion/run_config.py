"""A training run's configs from the settings given for it, with ``causalfusion train``'s defaults
and resume rules (the command only turns its flags into settings and calls ``train_configs``).

A new run: the ``preset`` (default tiny) sized to the data, with ``default_patch_size``; a paper
``config`` fills in what was not given. A resumed run: its config.json, with the settings given on
top (training settings may change; a model or AR plan that differs is refused by the trainer).

    from causalfusion.run_config import train_configs
    from causalfusion.distributed import make_trainer

    model_cfg, plan_cfg, train_cfg, data = train_configs("runs/mine", resume=True, steps=6000, lr=3e-4)
    make_trainer(model_cfg, plan_cfg, train_cfg, data, resume=True).train()  # keeps a saved --grad-accum
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .ar_plan import ARPlanConfig
from .checkpoint import CheckpointError, read_config
from .configs import get_config, scaled_lr
from .data import Dataset
from .latent_cache import training_dataset
from .models import PRESETS, ModelConfig
from .trainer import TrainConfig

# settings that are ModelConfig fields
MODEL_KEYS = ("patch_size", "class_tokens", "class_repeat", "learn_pos", "image_size", "depth", "hidden_size", "num_heads",
              "prediction")
# ARPlanConfig field <- its setting (the train flag's name)
PLAN_KEYS = dict(gamma="gamma", fixed_steps="ar_steps", order="order", block="block", dilation="dilation", lam="lam",
                 weighting="weighting", t_per_step="t_per_step", t_copies="t_copies")
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "out")  # (the run directory is an argument)
# what train_configs takes: the `causalfusion train` flags' names (dashes as underscores; progress for --no-progress)
SETTINGS = frozenset((*TRAIN_KEYS, *MODEL_KEYS, *PLAN_KEYS.values(), "preset", "channels", "vae", "vae_path", "config",
                      "base_lr"))


def default_patch_size(image_size: int) -> int:
    """Patch side of a new model not given one: 2 for inputs of at most 16 pixels (or latent cells) per
    side, else 4 (8x8 digits -> 16 tokens, 32 px -> 64)."""
    return 2 if image_size <= 16 else 4


def with_paper_config(settings: dict) -> dict:
    """``settings`` with the paper configuration ``settings["config"]`` filling in what they leave out
    (its warmup and steps in ImageNet epochs; ``train_configs`` recounts them on the data loaded), and
    ``base_lr`` (per 256 images) turned into ``lr`` unless ``lr`` is given."""
    s = dict(settings)
    if s.get("config"):
        s = {**get_config(s["config"]).train_args(batch_size=settings.get("batch_size")), **s}
    if s.get("base_lr") is not None and "lr" not in settings:
        if s.get("batch_size") is None:
            raise ValueError("--base-lr needs the global batch: pass --batch-size too")
        s["lr"] = scaled_lr(s["base_lr"], s["batch_size"])
    return s


def model_config(settings: dict, saved: dict | None, num_classes: int, image_size: int, channels: int) -> ModelConfig:
    """The model for data of ``image_size`` (the latent size), ``channels`` and ``num_classes``: the
    ``saved`` one of a resumed run, or the preset (default tiny) with ``default_patch_size``; a preset
    given, then the model settings given, on top."""
    preset = settings.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = saved or {**PRESETS[preset or "tiny"], "image_size": image_size, "in_channels": channels,
                     "num_classes": num_classes, "patch_size": default_patch_size(image_size)}
    if saved and preset:
        base = {**base, **PRESETS[preset]}
    given = {k: settings[k] for k in MODEL_KEYS if settings.get(k) is not None}
    return ModelConfig.from_dict({**base, **given, "image_size": image_size})


def plan_config(settings: dict, saved: dict | None = None, run_dir: str = "") -> ARPlanConfig:
    """The AR plan: ``saved`` (a resumed run's, from ``run_dir``) or ARPlanConfig's defaults, with the plan
    settings given on top (a plan that differs from the saved one is then refused by the trainer)."""
    given = {field: settings[key] for field, key in PLAN_KEYS.items() if key in settings}
    if saved is None:
        return ARPlanConfig(**given)
    try:
        return ARPlanConfig(**{**saved, **given})
    except TypeError as e:  # unknown keys in a hand-edited config.json
        raise CheckpointError(f"cannot resume {run_dir}: config.json holds an invalid plan ({e})") from None


def train_configs(out: str | Path, resume: bool = False,
                  **settings) -> tuple[ModelConfig, ARPlanConfig, TrainConfig, Dataset]:
    """(model, plan, training config, dataset) of the run in ``out``, as ``causalfusion train`` builds
    them. ``settings``: the ones given, by flag name (``steps``, ``lr``, ``preset``, ``ar_steps``, ``data``,
    ``vae``, ``config``, ...; see ``SETTINGS``; None = not given); the rest are the flags' defaults.

    A new run: the model is the preset sized to the dataset loaded (pixels, or latents through
    ``vae``); ``config``'s warmup and steps are counted in epochs of that dataset. ``resume=True``: the
    run's config.json, with its data (unless ``data`` is given) and, for a grey pixel run, its channels;
    ``config`` is ignored. Pass the result to ``distributed.make_trainer(model, plan, train, data, resume)`` (which
    keeps a resumed run's saved --grad-accum/--strategy) or ``Trainer(..., dataset=data)``."""
    out, settings = str(out), {k: v for k, v in settings.items() if v is not None}
    unknown = set(settings) - SETTINGS
    if unknown:
        raise ValueError(f"unknown train settings: {', '.join(sorted(unknown))}")
    if resume:
        settings.pop("config", None)  # a resumed run keeps its saved configuration
    s = with_paper_config(settings)
    saved = read_config(out) if resume else None
    data = s.get("data") or (saved or {}).get("train", {}).get("data", "digits")
    if s.get("channels") is not None and not str(data).startswith("folder:"):  # digits are grey, latents have theirs
        raise ValueError(f"--channels applies to folder data only, not --data {data}")
    train = {**saved.get("train", {})} if saved else {}  # resume: the saved training settings, the given ones on top
    train.update({k: s[k] for k in TRAIN_KEYS if k in s}, out=out, progress=s.get("progress", True))
    tc = TrainConfig.from_dict(train)
    # a resumed pixel run reads its images with the channels it was trained on (grey folder data)
    saved_channels = (saved.get("model") or {}).get("in_channels") if saved and not saved.get("autoencoder") else None
    dataset = training_dataset(tc.data, tc.image_size, vae=s.get("vae"), vae_path=s.get("vae_path"),
                               channels=s.get("channels") or saved_channels or 3,
                               saved_autoencoder=(saved or {}).get("autoencoder"), device=tc.device)
    if s.get("config"):  # the paper's lengths are in epochs: count them on the dataset actually loaded
        args = get_config(s["config"]).train_args(num_images=len(dataset), batch_size=tc.batch_size)
        for key in ("warmup", "steps"):
            if key not in settings:
                setattr(tc, key, args[key])
    mc = model_config(s, saved and saved.get("model"), dataset.num_classes, dataset.image_size, dataset.channels)
    return mc, plan_config(s, saved and saved.get("plan"), out), tc, dataset
