"""Training loop: AdamW (0.9, 0.95), linear warmup then constant lr, clip 1.0, EMA, bf16 autocast.

All randomness of a step (batch, label dropout, AR plan, noise) comes from one torch.Generator that
is saved with the checkpoint, so ``resume`` continues bit-identically.
"""
from __future__ import annotations

import contextlib
import copy
import math
import csv
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from .ar_plan import ARPlanConfig
from .checkpoint import (CheckpointError, check_autoencoder_entry, check_same_config, load_training_state, read_config,
                         save_checkpoint, write_config)
from .data import BatchStream, Dataset
from .latent_cache import training_dataset
from .devices import check_precision
from .diffusion import Diffusion
from .files import NewFiles, check_dir_path, write_text
from .images import grid_columns, save_grid
from .models import CausalFusion, ModelConfig
from .progress import progress_bar
from .objective import causalfusion_loss, drop_labels
from .optimization import adamw, apply_gradients, check_finite, ema_decay_at, set_lr, warmup_lr
from .one_step_sampler import sample_one_step
from .sampling import check_seed


@dataclass
class TrainConfig:
    data: str = "digits"
    image_size: int | None = None  # folder data only (digits are 8x8)
    out: str = "runs/train"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # min(decay, (1+step)/(10+step)); the release (and --config) use a plain decay
    adam_eps: float = 1e-8  # torch's default, used for every digits result; the release (and --config): 1e-15
    label_dropout: float = 0.1
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    device: str = "cpu"
    log_every: int = 25
    ckpt_every: int = 500
    sample_every: int = 500
    sample_steps: int = 50  # DDPM steps for the periodic grids
    samples_per_class: int = 8
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """One clear line for a value no run can use (checked before anything is written)."""
        check_train_settings(self, sample_every=0, sample_steps=1, samples_per_class=1)
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"--label-dropout must be in [0, 1], got {self.label_dropout}")


def check_train_settings(cfg, **more_minimums: int) -> None:
    """What every trainer's config must satisfy (TrainConfig, MMTrainConfig): step counts and
    intervals >= 1, warmup >= 0, a finite positive lr, clip and Adam eps, EMA decay in [0, 1), a seed the
    generators take; ``more_minimums`` adds integer fields and their lowest value. ValueError naming the flag."""
    if not str(cfg.out).strip():  # Path('') is '.': the run would be written into the current directory
        raise ValueError("--out is empty; give a run directory")
    minimums = dict(steps=1, batch_size=1, log_every=1, ckpt_every=1, warmup=0, **more_minimums)
    for name, low in minimums.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise ValueError(f"--grad-clip must be a finite number > 0 (the paper clips at 1.0), got {cfg.grad_clip}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not (math.isfinite(cfg.adam_eps) and cfg.adam_eps > 0):
        raise ValueError(f"--adam-eps must be a finite number > 0, got {cfg.adam_eps}")
    check_seed(cfg.seed)


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse to train over an existing run without --resume, or to resume a run that is not there."""
    check_dir_path(out)  # a file, or under one ("[Errno 20] Not a directory" at writing config.json)
    has_ckpt = (out / "state.json").exists()
    if has_ckpt and not resume:
        raise CheckpointError(f"{out} already holds a checkpoint; pass --resume (Python: resume=True) to continue it "
                              "or choose another --out")
    if resume and not has_ckpt:
        raise CheckpointError(f"nothing to resume: {out}/state.json not found")


class PendingConfig:
    """config.json of a run resumed with other training settings: ``saved`` (its config.json) with the
    ``train`` section given (and any further ``sections``, e.g. the distributed trainer's ``scale``).
    Written with the first checkpoint those settings trained (``write``), so that the next resume starts
    from them and a resume that fails before leaves config.json as it was."""

    def __init__(self, run_dir: str | Path, saved: dict, train: dict, **sections: dict) -> None:
        self.run_dir = run_dir
        new = {"train": train, **sections}
        changed = any(saved.get(k) != v for k, v in new.items())
        self.config = {**saved, **new} if changed else None  # None: nothing changed

    def write(self) -> None:
        """Before a checkpoint is saved; only the first time."""
        if self.config is not None:
            write_config(self.run_dir, self.config)
            self.config = None


def check_resume_step(out: Path, step: int, steps: int) -> int:
    """The checkpoint's step, refused when --steps asks for an earlier one (training cannot go back)."""
    if steps < step:
        raise CheckpointError(f"cannot resume {out} to --steps {steps}: it is already at step {step}")
    return step


@dataclass
class Trainer:
    model_cfg: ModelConfig
    plan_cfg: ARPlanConfig
    cfg: TrainConfig
    resume: bool = False
    dataset: Dataset | None = None
    compile: bool = False  # torch.compile the model's forward and backward (``compiling.CompiledForward``)
    step: int = field(init=False, default=0)
    # losses since the last log.csv row (saved with the checkpoint: a resumed run logs the same means)
    log_window: list[float] = field(init=False, default_factory=list)
    _new_config: PendingConfig | None = field(init=False, default=None, repr=False)  # set on resume
    _new_files: NewFiles | None = field(init=False, default=None, repr=False)  # a fresh run's, on the writing rank

    def __post_init__(self) -> None:
        c = self.cfg
        c.validate()
        check_precision(c.precision, c.device)
        self.out = Path(c.out)
        check_run_dir(self.out, self.resume)
        self.dataset = self.dataset or training_dataset(c.data, c.image_size)
        d = self.dataset
        want = (d.image_size, d.channels, d.num_classes)
        have = (self.model_cfg.image_size, self.model_cfg.in_channels, self.model_cfg.num_classes)
        if want != have:
            raise ValueError(f"model expects (image size, channels, classes) {have} but {d.name} has {want}")
        self.plan_cfg.validate(self.model_cfg.num_tokens)

        torch.manual_seed(c.seed)  # weight init
        self.model = CausalFusion(self.model_cfg).to(c.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = adamw(self.model.parameters(), c.lr, c.adam_eps)
        self._forward, self._compile_report = None, None  # None: eager
        if self.compile:
            from .compiling import CompiledForward, FirstCompileReport
            self._forward, self._compile_report = CompiledForward(self.model), FirstCompileReport()
        self.diffusion = Diffusion(prediction=self.model_cfg.prediction)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.stream = BatchStream(d, c.batch_size, self.gen)
        config = {"model": self.model_cfg.to_dict(), "plan": asdict(self.plan_cfg), "train": asdict(c),
                  "classes": d.classes, "data": d.name,
                  # the latent space (None: pixels); `sample` decodes with it
                  "autoencoder": getattr(d, "autoencoder", None), **self._config_sections()}
        if self.resume:
            self._restore()
        elif self.is_main:
            self._new_files = NewFiles(self.out, RUN_FILES)  # before the first write: what train() takes back if it fails early
            write_config(self.out, config)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (False on ranks > 0 of a distributed run)."""
        return True

    def _config_sections(self) -> dict:
        """config.json sections a subclass adds (the distributed trainer: how a step is executed)."""
        return {}

    def _restore(self) -> None:
        saved = read_config(self.out)
        check_autoencoder_entry(self.out, saved)  # (its grids decode through it, after the first checkpoint)
        scale = saved.get("scale") or {}
        if not self._config_sections() and (scale.get("grad_accum", 1) != 1 or scale.get("strategy", "ddp") != "ddp"):
            # another summation of the gradient than the run's (and config.json would keep claiming it)
            raise CheckpointError(f"cannot resume {self.out} with a plain Trainer: it was trained with {scale}; "
                                  f"use distributed.make_trainer (or DistributedTrainer with that ScaleConfig)")
        check_same_config(self.out, "model", saved.get("model"), self.model_cfg.to_dict(), ModelConfig)
        check_same_config(self.out, "plan", saved.get("plan"), asdict(self.plan_cfg), ARPlanConfig)
        state, extra = load_training_state(self.out, self.model, self.ema, self.opt)
        self.step = check_resume_step(self.out, int(state["step"]), self.cfg.steps)
        self.gen.set_state(extra["gen"])
        self.stream.load_state({"perm": extra["perm"], "pos": extra["pos"]})
        self.log_window = extra["log_window"].tolist() if "log_window" in extra else []
        self._new_config = PendingConfig(self.out, saved, asdict(self.cfg), **self._config_sections())

    def lr_at(self, step: int) -> float:
        return warmup_lr(step, self.cfg.lr, self.cfg.warmup)

    def ema_decay_at(self, step: int) -> float:
        return ema_decay_at(step, self.cfg.ema_decay, self.cfg.ema_warmup)

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns loss, grad norm, lr and the number of AR steps drawn."""
        c, dev = self.cfg, self.cfg.device
        x0, y = self.stream.next()
        y = drop_labels(y, c.label_dropout, self.model_cfg.num_classes, self.gen)
        set_lr(self.opt, self.lr_at(self.step))
        self.model.train()
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
            loss, plan = causalfusion_loss(self.model, self.diffusion, x0.to(dev), y.to(dev), self.plan_cfg, self.gen,
                                           self._forward)
        check_finite(loss, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self._compile_report and self.is_main:
            self._compile_report.report(tqdm.write)
        gnorm = apply_gradients(self.model, self.ema, self.opt, c.grad_clip, self.ema_decay_at(self.step), self.step)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": gnorm, "lr": self.lr_at(self.step - 1), "ar_steps": plan.num_steps}

    def save(self) -> None:
        if self._new_config and self.is_main:
            self._new_config.write()
        save_checkpoint(self.out, self.step, self.model, self.ema, self.opt, self.checkpoint_extra(),
                        {"data": self.dataset.name})

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        """The generator, data-stream and log-window state a checkpoint stores beside the weights."""
        return {"gen": self.gen.get_state(), **self.stream.state(),
                "log_window": torch.tensor(self.log_window, dtype=torch.float64)}

    def sample_grid(self, path: Path | None = None, steps: int | None = None, ema: torch.nn.Module | None = None) -> Path:
        """Class-conditional S=1 samples of the EMA model (``ema``: a full copy of it), one row per class
        where that grid is not too narrow or too wide (``images.grid_columns``)."""
        n = self.cfg.samples_per_class
        labels = torch.arange(self.model_cfg.num_classes).repeat_interleave(n)
        images = sample_one_step(ema or self.ema, labels, steps=steps or self.cfg.sample_steps, seed=self.cfg.seed)
        path = path or self.out / "samples" / f"step_{self.step:07d}.png"
        save_grid(self._to_pixels(images), path, nrow=grid_columns(len(images), n))
        return path

    def _to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        """A latent run's samples through its VAE decoder (pixel runs: unchanged). Without the VAE
        weights on this machine the grids show the latents, with one warning."""
        from .autoencoders import AutoencoderError, decode_in_batches
        from .checkpoint import run_autoencoder

        if not hasattr(self, "_grid_decoder"):
            try:
                self._grid_decoder = run_autoencoder(self.out, device=self.cfg.device)
            except AutoencoderError as e:
                print(f"warning: sample grids show latents (their first 3 channels), not images ({e})")
                self._grid_decoder = None
        if self._grid_decoder is not None:
            return decode_in_batches(self._grid_decoder, samples)
        c = samples.shape[1]
        # A PNG holds 1 or 3 colour channels (a 4th is alpha): KL-16's 16 latent channels cannot be
        # written at all (PIL's TypeError stopped the run at its first grid), and SD-VAE's 4th channel
        # would show as transparency. Pixel runs (1 or 3 channels) pass through unchanged.
        return samples if c in (1, 3) else samples[:, :3] if c > 3 else samples[:, :1]

    def train(self, callbacks: list | None = None) -> dict[str, float]:
        """Run until ``cfg.steps``; log CSV (+TensorBoard if installed), checkpoint, sample grids.
        A fresh run that fails before its first checkpoint removes what it wrote (``discard_unsaved``)."""
        try:
            return self._train(callbacks)
        except Exception:
            discard_unsaved(self._new_files, self.out)
            raise

    def _train(self, callbacks: list | None) -> dict[str, float]:
        c = self.cfg
        log_path = self.out / "log.csv"
        new_log = not log_path.exists()
        if not new_log and self.is_main:  # rows a killed or NaN-stopped run logged after its last checkpoint
            new_log = trim_log(log_path, self.step)
        writer = _tensorboard(self.out) if self.is_main else None
        last: dict[str, float] = {}
        # the writer is closed on an error too (before a failed fresh run's tb/ is removed)
        with open(log_path if self.is_main else os.devnull, "a", newline="") as f, \
                (contextlib.closing(writer) if writer else contextlib.nullcontext()):
            log = csv.writer(f)
            if new_log:
                log.writerow(["step", "loss", "grad_norm", "lr", "ar_steps", "it_per_s"])
            bar = progress_bar(total=c.steps, initial=self.step, desc="train", disable=not (c.progress and self.is_main),
                       dynamic_ncols=True)
            t0, s0 = time.perf_counter(), self.step
            while self.step < c.steps:
                last = self.train_step()
                self.log_window.append(last["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.1e}")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    ips = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                    mean = sum(self.log_window) / len(self.log_window)
                    log.writerow([self.step, f"{mean:.6f}", f"{last['grad_norm']:.4f}", f"{last['lr']:.3e}", last["ar_steps"], f"{ips:.2f}"])
                    f.flush()
                    if writer:
                        writer.add_scalar("train/loss", mean, self.step)
                        writer.add_scalar("train/lr", last["lr"], self.step)
                    if self.step % c.log_every == 0:  # (the last step's extra row: a longer run continues the window)
                        self.log_window = []
                if self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self.save()
                if c.sample_every and (self.step % c.sample_every == 0 or self.step == c.steps):
                    self.sample_grid()
                for cb in callbacks or []:
                    cb(self, last)
            bar.close()
        return last


# what a training run writes at the top of its directory (the multimodal trainer adds tokenizer.json):
# the only entries a fresh run that failed before its first checkpoint takes back from a directory it
# did not create (``discard_unsaved``)
RUN_FILES = ("config.json", "log.csv", "eval.csv", "tb", "samples", "model.safetensors", "ema.safetensors",
             "train.safetensors", "state.json")


def discard_unsaved(new_files: NewFiles | None, out: Path) -> None:
    """After a fresh run failed: if it has no checkpoint yet (no state.json), remove what it wrote
    (config.json, log.csv, tb/, samples/, tokenizer.json ...), so that bad input such as an lr that
    diverges at step 1 leaves no half-made run behind. A resumed run (``new_files`` None) keeps
    everything, and so does a run with a checkpoint: its logs and grids belong to what it saved."""
    if new_files is not None and not (out / "state.json").exists():
        new_files.remove()


def trim_log(path: Path, step: int) -> bool:
    """Keep the header and the rows of steps <= ``step`` (the checkpoint a resumed run continues from),
    so the steps it trains again are not logged twice; a row cut off mid-write goes too. Returns
    whether the log is empty (it needs its header)."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text CSV log; move it away to resume") from None
    keep = lines[:1] + [ln for ln in lines[1:] if ln.endswith("\n") and ln.split(",", 1)[0].isdigit()
                        and int(ln.split(",", 1)[0]) <= step]
    if keep != lines:
        write_text(path, "".join(keep))
    return not keep


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))


def param_count_str(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"
