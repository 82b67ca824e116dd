"""Checkpoints: safetensors for every tensor, JSON for everything else; never a pickle.

A run directory (``--ckpt DIR``) holds::

    config.json                  model / plan / training configuration (checked on resume)
    model.<step>.safetensors     raw weights      ema.<step>.safetensors   EMA weights (for sampling)
    train.<step>.safetensors     optimizer moments, RNG, data-stream and log-window state
    state.json                   the commit: step, optimizer hyper-parameters, the three files' names

A save writes the new step's files under new names (each to a temporary file, fsynced, renamed,
then the directory fsynced), commits by replacing state.json atomically (same steps), and only then
deletes the files the new state.json does not name. A failure at any point (kill, exception, full
disk), any number of times in a row, leaves the last committed state.json and its files intact; the
next save first removes what an interrupted one left (``settle``). Loading reads only the files
state.json names. Runs written with fixed names (``model.safetensors``, with ``.prev`` files from an
interrupted save) still load, and their next save moves them to this layout.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import suppress
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .autoencoders import KINDS, Autoencoder, autoencoder_from_spec
from .devices import check_device
from .files import fsync_dir, fsync_file, write_text_durable
from .models import CausalFusion, ModelConfig

PARTS = ("model", "ema", "train")
FILES = tuple(f"{part}.safetensors" for part in PARTS)  # the fixed names of runs written before state.json named its files
_STAGED = re.compile(r"(model|ema|train)\.\d+r?\.safetensors")  # <part>.<step>[r].safetensors
# the temporary names (<name>.<pid>.tmp) under which a save writes its files and state.json
_TEMPORARY = re.compile(r"((model|ema|train)(\.\d+r?)?\.safetensors|state\.json|config\.json)\.\d+\.tmp")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not match."""


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Write ``path`` through a temporary file; on disk (fsynced) when this returns."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})
        fsync_file(tmp)
        os.replace(tmp, path)
    except SafetensorError as e:  # a full disk or a read-only directory: one line, not a traceback
        raise OSError(f"cannot write {path} ({e})") from None
    finally:
        if tmp.exists():  # (cleaning up must not hide the error that stopped the write)
            with suppress(OSError):
                tmp.unlink()


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


def part_path(run_dir: str | Path, state: dict, part: str) -> Path:
    """Where the committed checkpoint's ``part`` (model, ema, train) is: the file state.json names."""
    names = state.get("files")
    if names is None:
        return Path(run_dir) / f"{part}.safetensors"  # the fixed-name layout
    name = names.get(part) if isinstance(names, dict) else None
    if not isinstance(name, str) or _STAGED.fullmatch(name) is None:
        raise CheckpointError(f"{Path(run_dir) / 'state.json'} is corrupt (files: {names!r})")
    return Path(run_dir) / name


def read_part(run_dir: str | Path, part: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(state.json, the tensors of ``part``, its path) of the committed checkpoint. A save that
    commits meanwhile deletes the files read_state named: then state.json is read again."""
    for attempt in range(3):
        state = read_state(run_dir)
        path = part_path(run_dir, state, part)
        try:
            return state, read_tensors(path, state["step"]), path
        except CheckpointError:
            if attempt == 2 or path.is_file() or read_state(run_dir) == state:
                raise
    raise AssertionError("unreachable")


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
    write_text_durable(Path(run_dir) / "config.json", json.dumps(config, indent=2, sort_keys=True))


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
    committed = settle(run_dir)
    # new names for this step's files; a second save of the committed step must not overwrite them either
    tag = "" if {f"{part}.{step}.safetensors" for part in PARTS}.isdisjoint(committed) else "r"
    names = {part: f"{part}.{step}{tag}.safetensors" for part in PARTS}
    for part, tensors in zip(PARTS, (model_state, ema_state, train)):
        _write_tensors(run_dir / names[part], tensors, step)
    fsync_dir(run_dir)
    state = {**meta, "step": step, "param_groups": opt_state["param_groups"], "files": names}
    write_text_durable(run_dir / "state.json", json.dumps(state, indent=2, sort_keys=True))  # the commit
    settle(run_dir)


def committed_files(run_dir: str | Path) -> set[str] | None:
    """The names of the files the committed checkpoint consists of (None: no readable state.json)."""
    try:
        state = read_state(run_dir)
    except CheckpointError:
        return None
    names = state.get("files")
    if isinstance(names, dict):
        return {"state.json", *map(str, names.values())}
    return {"state.json", *FILES, *(f"{name}.prev" for name in FILES)}  # the fixed-name layout


def settle(run_dir: str | Path) -> set[str]:
    """Remove what interrupted saves left in ``run_dir``: temporary files, and the checkpoint files
    the committed state.json does not name (all of them when there is no state.json; none but the
    temporary files when state.json is unreadable). Best effort; returns the committed names."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        committed: set[str] | None = set()
    else:
        committed = committed_files(run_dir)
    for p in run_dir.iterdir():
        name = p.name
        stale = _TEMPORARY.fullmatch(name) is not None or (
            committed is not None and name not in committed
            and (_STAGED.fullmatch(name) is not None or name in FILES or name in {f"{n}.prev" for n in FILES}))
        if stale and p.is_file():
            with suppress(OSError):
                p.unlink()
    return committed or set()


def load_training_state(run_dir: str | Path, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, EMA and optimizer in place; return (state.json, extra tensors)."""
    run_dir = Path(run_dir)
    for attempt in range(3):  # a save that commits meanwhile: read the new step's three files
        state, model_tensors, model_path = read_part(run_dir, "model")
        _, ema_tensors, ema_path = read_part(run_dir, "ema")
        state_now, train, train_path = read_part(run_dir, "train")
        if state_now == state or attempt == 2:
            break
    if state_now != state:
        raise CheckpointError(f"{run_dir} is being written faster than it can be read; try again")
    _load_weights(model, model_tensors, model_path)
    _load_weights(ema, ema_tensors, ema_path)
    check_finite_tensors(train, train_path)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in train.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bad = [i for i, s in opt_state.items() if i >= len(params) or any(
        v.shape != params[i].shape for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))]
    if bad:  # (parameters that never had a gradient have no state: fewer entries are fine)
        raise CheckpointError(f"{train_path}'s optimizer state does not fit the model "
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
        raise CheckpointError(f"{train_path} lacks the {'/'.join(sorted(missing))} entries")
    return state, extra


def check_finite_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """CheckpointError naming the file and the first tensor that holds a NaN or inf: every sample,
    score and caption would be NaN, and a resumed run would stop blaming its training."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite values (NaN or inf in tensor {bad!r})")


def _load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_finite_tensors(tensors, path)
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
    _, tensors, path = read_part(run_dir, "ema" if ema else "model")
    _load_weights(module, tensors, path)
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
    if path is not None and spec.get("kind", "identity") == "identity":
        raise ValueError(f"--vae-path applies to latent runs; {run_dir} models pixels and has no VAE")
    return autoencoder_from_spec(spec, path, device=device)
