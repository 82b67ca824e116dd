"""Checkpoints: safetensors for every tensor, JSON for everything else; never a pickle.

A run directory (``--ckpt DIR``) holds::

    config.json          model / plan / training configuration (written once, checked on resume)
    model.safetensors    raw weights            ema.safetensors   EMA weights (used for sampling)
    train.safetensors    optimizer moments, RNG and data-stream state
    state.json           step, optimizer hyper-parameters; written last = the commit marker

Each file is written to a temporary name and renamed into place. Every safetensors file records
the step in its metadata, so a checkpoint torn by a crash between renames is detected on load.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .autoencoders import KINDS, Autoencoder, autoencoder_from_spec
from .devices import check_device
from .files import atomic_path, write_json
from .models import CausalFusion, ModelConfig

FILES = ("model.safetensors", "ema.safetensors", "train.safetensors")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not match."""


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"step": str(step)})
        except SafetensorError as e:  # a full disk or a read-only directory: one line, not a traceback
            raise OSError(f"cannot write {path} ({e})") from None


def _prev(path: Path) -> Path:
    """Where the previous checkpoint's file waits until the new state.json is written."""
    return path.with_name(path.name + ".prev")


def _read_with_step(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get("step")
    except Exception as e:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {path.parent} a causalfusion run directory?")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is corrupt (a JSON {type(obj).__name__}, not an object)")
    return obj


def read_tensors(path: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, checked against state.json's ``step``. A save interrupted before
    its state.json was written left the old file as ``<name>.prev``: that one is read instead."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint is incomplete")
    tensors, saved = _read_with_step(path)
    if step is not None and saved != str(step):
        if _prev(path).is_file():
            old, old_step = _read_with_step(_prev(path))
            if old_step == str(step):
                return old
        raise CheckpointError(f"{path} is from step {saved} but state.json says {step}: torn checkpoint")
    return tensors


def write_config(run_dir: str | Path, config: dict) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / "config.json", config, sort_keys=True)


def read_config(run_dir: str | Path) -> dict:
    """config.json, its sections checked for type (a hand-edited file fails here, in one line)."""
    path = Path(run_dir) / "config.json"
    config = read_json(path)
    bad = [k for k in ("model", "plan", "train", "text", "mix", "autoencoder", "scale")
           if config.get(k) is not None and not isinstance(config[k], dict)]
    bad += [k for k in ("data", "kind") if config.get(k) is not None and not isinstance(config[k], str)]
    if bad:
        raise CheckpointError(f"{path} is corrupt ({bad[0]!r} has the wrong type)")
    return config


def read_state(run_dir: str | Path) -> dict:
    """state.json, with its step checked (an int >= 0: the weight files are checked against it)."""
    path = Path(run_dir) / "state.json"
    state = read_json(path)
    step = state.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"{path} is corrupt (step {step!r})")
    return state


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the training state of ``step``; ``extra`` holds RNG / data-stream tensors."""
    save_checkpoint_states(run_dir, step, model.state_dict(), ema.state_dict(), optimizer.state_dict(), extra, meta)


def save_checkpoint_states(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                           ema_state: dict[str, torch.Tensor], opt_state: dict, extra: dict[str, torch.Tensor],
                           meta: dict) -> None:
    """``save_checkpoint`` from full state dicts (a distributed run gathers them on rank 0 first).

    ``opt_state`` is ``Optimizer.state_dict()``'s layout: parameters numbered in ``parameters()`` order.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train = {f"opt.{i}.{name}": v for i, s in opt_state["state"].items() for name, v in s.items()}
    train.update({f"extra.{k}": v for k, v in extra.items()})
    # Each file is replaced atomically, but not the three together: until state.json names the new
    # step, the old files stay beside them as .prev, so an interrupted save resumes from the last one.
    for name, tensors in zip(FILES, (model_state, ema_state, train)):
        path = run_dir / name
        _prev(path).unlink(missing_ok=True)
        if path.is_file():
            os.link(path, _prev(path))  # a second name for the old file: no copy
        _atomic_save_tensors(path, tensors, step)
    write_json(run_dir / "state.json", {**meta, "step": step, "param_groups": opt_state["param_groups"]}, sort_keys=True)
    for name in FILES:
        _prev(run_dir / name).unlink(missing_ok=True)


def load_training_state(run_dir: str | Path, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, EMA and optimizer in place; return (state.json, extra tensors)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    step = state["step"]
    _load_weights(model, read_tensors(run_dir / "model.safetensors", step), run_dir / "model.safetensors")
    _load_weights(ema, read_tensors(run_dir / "ema.safetensors", step), run_dir / "ema.safetensors")
    train = read_tensors(run_dir / "train.safetensors", step)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in train.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bad = [i for i, s in opt_state.items() if i >= len(params) or any(
        v.shape != params[i].shape for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))]
    if bad:  # (parameters that never had a gradient have no state: fewer entries are fine)
        raise CheckpointError(f"{run_dir / 'train.safetensors'}'s optimizer state does not fit the model "
                              f"(parameter {bad[0]})")
    # The hyperparameters (eps, betas, ...) are this run's, as it was built; only the state (moments,
    # step counts) comes from the checkpoint, so a resume with another --adam-eps trains with it.
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # param_groups of another optimizer or model
        raise CheckpointError(f"{run_dir / 'state.json'}'s param_groups do not fit the optimizer ({e})") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    extra = {k[len("extra."):]: v for k, v in train.items() if k.startswith("extra.")}
    missing = {"gen", "perm", "pos"} - set(extra)
    if missing:
        raise CheckpointError(f"{run_dir / 'train.safetensors'} lacks the {'/'.join(sorted(missing))} entries")
    return state, extra


def _load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # every sample, score and caption would be NaN
        raise CheckpointError(f"{path} holds non-finite values (in {bad})")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # torch's message: a header line, then one line per mismatch
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise CheckpointError(f"{path} does not fit the model in config.json ({first})") from None


def read_run_config(run_dir: str | Path) -> dict:
    """config.json of a run directory, with one clear line when the directory is missing or a file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {run_dir} {what}")
    return read_config(run_dir)


def trained_order(config: dict) -> dict:
    """The "order", "block" and "dilation" the plan in a run's config.json names. ``load_model``
    attaches them to the model as ``model.trained_order``, and sampling defaults to them
    (``sampling.model_order``, which fills in ARPlanConfig's for any missing): a model trained in
    raster order has never seen a random order's groups."""
    plan = config.get("plan") if isinstance(config.get("plan"), dict) else {}
    return {k: plan[k] for k in ("order", "block", "dilation") if k in plan}


def check_same_config(run_dir: str | Path, part: str, saved: dict | None, given: dict, like: type | None = None) -> None:
    """Refuse to resume ``run_dir`` with a ``part`` config (model, plan, ...) other than the one it
    saved: one line naming every differing key as (saved, given). ``like``: the config's dataclass;
    a field the saved config lacks (written before the field existed) counts as its default."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"cannot resume {run_dir}: its config.json has no {part} section")
    if like is not None:
        saved = {**{f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(like)
                    if f.default is not MISSING or f.default_factory is not MISSING}, **saved}
    diff = {k: (saved.get(k), given.get(k)) for k in sorted(saved.keys() | given.keys()) if saved.get(k) != given.get(k)}
    if diff:
        raise CheckpointError(f"cannot resume {run_dir}: {part} config differs from the checkpoint's (saved, given): {diff}")


def load_weights(run_dir: str | Path, module: torch.nn.Module, ema: bool = True) -> torch.nn.Module:
    """Load a run's EMA (or raw) weights into ``module`` (strict), checked against state.json's step;
    or an inference folder's weights (``inference_folder``)."""
    from .inference_folder import WEIGHTS, is_inference_folder, read_folder_weights

    run_dir = Path(run_dir)
    config = read_config(run_dir) if (run_dir / "config.json").is_file() else None
    if is_inference_folder(run_dir, config):
        if not ema:
            raise CheckpointError(f"{run_dir} is an inference folder holding one set of weights; leave out --raw")
        _load_weights(module, read_folder_weights(run_dir), run_dir / WEIGHTS)
        return module
    step = read_state(run_dir)["step"]
    path = run_dir / ("ema.safetensors" if ema else "model.safetensors")
    _load_weights(module, read_tensors(path, step), path)
    return module


def load_model(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> CausalFusion:
    """The model of a run directory, EMA weights by default, in eval mode, with the token order it
    was trained with as ``model.trained_order`` (see ``trained_order``)."""
    check_device(device)  # 'cuda' without CUDA would be an AssertionError deep in .to(device)
    config = read_run_config(run_dir)
    if config.get("kind") == "multimodal":
        raise CheckpointError(f"{run_dir} is a multimodal run: use t2i, caption or eval-mm "
                              "(Python: multimodal.load_multimodal)")
    try:
        model = CausalFusion(ModelConfig.from_dict(config["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir}/config.json has no valid model config ({e})") from None
    model.trained_order = trained_order(config)
    return load_weights(run_dir, model, ema).to(device).eval()


def check_autoencoder_entry(run_dir: str | Path, config: dict) -> None:
    """config.json's "autoencoder" (None: pixels) is one ``autoencoder_from_spec`` can rebuild: a
    hand-edited ``channels: "x"`` failed with "invalid literal for int()", naming no file."""
    spec = config.get("autoencoder")
    if spec is None:
        return
    where = Path(run_dir) / "config.json"
    if not isinstance(spec, dict) or spec.get("kind", "identity") not in KINDS:
        raise CheckpointError(f"{where}: autoencoder must be an object with a kind in {', '.join(KINDS)}, got {spec!r}")
    for key in ("channels", "image_channels", "downsample", "image_size"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CheckpointError(f"{where}: autoencoder.{key} must be a positive integer, got {v!r}")


def run_autoencoder(run_dir: str | Path, path: str | Path | None = None, device: str | torch.device = "cpu") -> Autoencoder:
    """The autoencoder recorded in a run directory's config.json (identity for pixel-space runs)."""
    config = read_config(run_dir)
    check_autoencoder_entry(run_dir, config)
    spec = config.get("autoencoder")
    if spec is None:
        spec = {"kind": "identity", "channels": config.get("model", {}).get("in_channels", 3)}
    return autoencoder_from_spec(spec, path, device=device)
