"""A multimodal training run's configs from the settings given for it, with ``causalfusion
train-mm``'s defaults and resume rules (the command only turns its flags into settings and calls
``train_mm_configs``).

    from causalfusion.multimodal.run_config import train_mm_configs
    from causalfusion.multimodal.train import MMTrainer

    MMTrainer(*train_mm_configs("runs/mm", resume=True, steps=4000, lr=1e-3), resume=True).train()
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..ar_plan import ARPlanConfig
from ..checkpoint import CheckpointError, read_config
from ..models import PRESETS, ModelConfig
from .model import TextConfig
from .objective import TRANSFUSION_IMAGE_PLAN, MixConfig
from .train import KIND, MMTrainConfig

# The shapes defaults: 16 px RGB, 4x4 patches -> 16 image tokens.
MM_MODEL = dict(image_size=16, in_channels=3, patch_size=4, num_classes=0, class_tokens=1)
# settings (the train-mm flags' names) by the config.json section they set; the run directory is an argument
SECTIONS = {"model": ("patch_size", "image_size", "prediction", "depth", "hidden_size", "num_heads"),
            "text": ("max_text_len", "tie_head", "transfusion"), "plan": ("gamma", "lam", "order"),
            "mix": ("image_first_prob", "text_weight"),
            "train": tuple(f.name for f in fields(MMTrainConfig) if f.name != "out")}
SETTINGS = frozenset(("preset", *(k for keys in SECTIONS.values() for k in keys)))

# MMTrainer's positional arguments: model, text settings (TextConfig fields but vocab_size), plan, mix, training
Configs = tuple[ModelConfig, dict, ARPlanConfig, MixConfig, MMTrainConfig]


def train_mm_configs(out: str | Path, resume: bool = False, **settings) -> Configs:
    """MMTrainer's configs for the run in ``out``, as ``causalfusion train-mm`` builds them.
    ``settings``: the ones given, by flag name (``steps``, ``lr``, ``preset``, ``transfusion``, ...; see
    ``SETTINGS``; None = not given); the rest are the flags' defaults.

    ``resume=True``: the run's config.json with the given settings on top. Training settings win
    (``steps`` left out: the saved target); model, text, plan, mix or data settings that differ from
    the saved ones are refused by ``MMTrainer``. A missing or malformed section is one CheckpointError."""
    out, settings = str(out), {k: v for k, v in settings.items() if v is not None}
    unknown = set(settings) - SETTINGS
    if unknown:
        raise ValueError(f"unknown train-mm settings: {', '.join(sorted(unknown))}")
    if settings.get("preset", "tiny") not in PRESETS:
        raise ValueError(f"unknown preset {settings['preset']!r}; choose one of {', '.join(PRESETS)}")
    return _resumed(out, settings) if resume else _new(out, settings)


def _given(settings: dict, part: str) -> dict:
    return {k: settings[k] for k in SECTIONS[part] if k in settings}


def _new(out: str, s: dict) -> Configs:
    given = {k: s[k] for k in ("patch_size", "image_size", "prediction") if k in s}
    size = {k: s[k] for k in ("depth", "hidden_size", "num_heads") if s.get(k)}  # (0: the preset's)
    mc = ModelConfig.from_preset(s.get("preset", "tiny"), **{**MM_MODEL, **given, **size})
    text = {f.name: s.get(f.name, f.default) for f in fields(TextConfig) if f.name != "vocab_size"}
    # Transfusion trains images with the standard diffusion loss; gamma/lam given win
    plan = ARPlanConfig(**{**(TRANSFUSION_IMAGE_PLAN if text["transfusion"] else {}), **_given(s, "plan")})
    tc = MMTrainConfig(**{**_given(s, "train"), "out": out, "image_size": mc.image_size,
                          "progress": s.get("progress", True)})
    return mc, text, plan, MixConfig(**_given(s, "mix")), tc


def _configs(s: dict) -> Configs:
    """MMTrainer's configs from config.json-like sections."""
    return (ModelConfig.from_dict(s["model"]), s["text"], ARPlanConfig(**s["plan"]), MixConfig(**s["mix"]),
            MMTrainConfig.from_dict(s["train"]))


def _resumed(out: str, settings: dict) -> Configs:
    path = Path(out) / "config.json"
    saved = read_config(out)
    if saved.get("kind") != KIND:
        raise ValueError(f"{out} is not a multimodal run")
    missing = [k for k in SECTIONS if not isinstance(saved.get(k), dict)]
    if missing:
        raise CheckpointError(f"cannot resume: {path} has no {'/'.join(repr(k) for k in missing)} section")
    s = {k: dict(saved[k]) for k in SECTIONS}
    s["text"].pop("vocab_size", None)  # the run's tokenizer.json fixes it
    try:  # the file alone first, so that a bad given setting is not blamed on it
        _configs(s)
    except (TypeError, ValueError) as e:  # unknown keys or bad values in a hand-edited file
        raise CheckpointError(f"cannot resume: {path} holds an invalid config ({e})") from None
    if "preset" in settings:
        s["model"].update(PRESETS[settings["preset"]])
    for part in SECTIONS:
        s[part].update(_given(settings, part))
    s["train"].update(out=out, progress=settings.get("progress", True))
    return _configs(s)
