"""Multi-process training and sampling on PyTorch's own stack (``torchrun`` + ``torch.distributed``).

Training (``DistributedTrainer``): DDP by default, FSDP2 (``fully_shard``) as an option; bf16 mixed
precision, gradient checkpointing and gradient accumulation; NCCL on GPUs, gloo on CPU.

* **One global batch, whatever the world size.** Every rank holds the same generator and draws the
  randomness of the whole global batch (indices, flips, label dropout, the AR plan with its one
  split, the orders and t of every sample, the noise), in the order the single-process ``Trainer``
  draws it; each rank then loads and computes only its rows (``rank * B/W ...``), split again into
  ``grad_accum`` micro-batches. The mean of the per-rank, per-micro-batch losses is the loss of
  the global batch, so 1, 2 or N processes follow the same loss curve up to float round-off, and
  with one process and no accumulation it is the ``Trainer``'s step exactly.
* **Checkpoints** are the single-process format (``checkpoint.py``): rank 0 writes full state
  dicts (FSDP2 gathers them with ``get_model_state_dict``/``get_optimizer_state_dict``,
  ``full_state_dict=True, cpu_offload=True``). Every rank reads the full files on resume and
  shards them again, so a run can continue on any number of processes (the global batch must
  divide by processes x accumulation).
* Logging, progress bars and sample grids come from rank 0 only.

Sampling (``sample_in_chunks``): chunks of ``batch_size`` global sample indices are dealt to the
ranks round-robin; every sample is seeded by its global index (``sampling.sample_generators``),
so the images are those of a single process; rank 0 gathers them into one uint8 array.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .ar_plan import ARPlanConfig
from .checkpoint import CheckpointError, read_config, save_checkpoint_states
from .data import Dataset
from .devices import DistEnv, barrier, init_distributed, launched_by_torchrun
from .images import to_uint8
from .models import CausalFusion, ModelConfig
from .objective import draw_plan_and_noise, drop_labels, noised_loss
from .optimization import adamw, apply_gradients, check_finite, set_lr
from .trainer import Trainer, TrainConfig

STRATEGIES = ("ddp", "fsdp")
# ScaleConfig fields saved in config.json ("scale") and kept by a resume that leaves them out: they
# decide how the gradient is summed (micro-batches; FSDP2's bf16 all-gather). Activation
# checkpointing changes memory, not the numbers, and is asked for (or not) by every command.
SAVED_SCALE = ("strategy", "grad_accum")


# ---- model helpers -------------------------------------------------------------------------------
def enable_grad_checkpointing(model: CausalFusion) -> None:
    """Recompute each transformer block's activations in the backward pass (non-reentrant)."""
    for block in model.blocks:
        if getattr(block, "_grad_ckpt", False):
            continue
        fwd = block.forward

        def forward(*args, _fwd=fwd):
            return checkpoint(_fwd, *args, use_reentrant=False) if torch.is_grad_enabled() else _fwd(*args)

        block.forward, block._grad_ckpt = forward, True


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """``Optimizer.state_dict()`` (parameters numbered) -> keyed by parameter name (what DCP wants)."""
    return {"state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_by_index(state: dict, names: list[str]) -> dict:
    """The inverse of ``optimizer_state_by_name``: the layout ``checkpoint.py`` stores."""
    pos = {n: i for i, n in enumerate(names)}
    return {"state": {pos[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in state["param_groups"]]}


# ---- training ------------------------------------------------------------------------------------
@dataclass
class ScaleConfig:
    """How a step is executed; none of it changes what is learned (up to float round-off)."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2: parameters, gradients and optimizer state sharded)
    grad_accum: int = 1  # micro-batches per rank and step
    grad_ckpt: bool = False  # activation checkpointing of every block

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if type(self.grad_accum) is not int or self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be an integer >= 1, got {self.grad_accum!r}")


def scale_config(run_dir: str | Path, resume: bool = False, strategy: str | None = None,
                 grad_accum: int | None = None, grad_ckpt: bool | None = None) -> ScaleConfig:
    """The ``ScaleConfig`` of a run: the settings given (None: not given); a resumed run keeps its saved
    ``strategy`` and ``grad_accum`` (config.json's "scale") for those left out, so that
    ``train --out RUN --resume`` sums the gradient over the micro-batches it was trained with."""
    saved = (read_config(run_dir).get("scale") or {}) if resume else {}
    given = dict(strategy=strategy, grad_accum=grad_accum, grad_ckpt=grad_ckpt)
    kept = {k: saved[k] for k in SAVED_SCALE if k in saved}
    try:
        ScaleConfig(**kept).validate()
    except ValueError:  # a hand-edited file: one line, naming it (not a flag the user did not give)
        raise CheckpointError(f"cannot resume {run_dir}: config.json holds an invalid scale {saved}") from None
    return ScaleConfig(**{**kept, **{k: v for k, v in given.items() if v is not None}})


@dataclass
class DistributedTrainer(Trainer):
    """``Trainer`` on W processes (``torchrun``), or on one with accumulation/checkpointing/FSDP2."""

    scale: ScaleConfig = field(default_factory=ScaleConfig)
    env: DistEnv | None = None

    @property
    def is_main(self) -> bool:
        return self.env is None or self.env.is_main

    def _config_sections(self) -> dict:
        return {"scale": {k: getattr(self.scale, k) for k in SAVED_SCALE}}

    def __post_init__(self) -> None:
        self.scale.validate()
        self.env = self.env or init_distributed(self.cfg.device, force=self.scale.strategy == "fsdp")
        w, a, b = self.env.world, self.scale.grad_accum, self.cfg.batch_size
        if b % (w * a):
            kept = " (a resume keeps the run's --grad-accum unless given)" if self.resume else ""
            raise ValueError(f"the global batch {b} must be divisible by processes x accumulation = {w} x {a}{kept}")
        super().__post_init__()  # full model, EMA and optimizer on every rank (restored when resuming)
        self.module = self.model
        if self.scale.grad_ckpt:
            enable_grad_checkpointing(self.module)
        self._names = [n for n, _ in self.module.named_parameters()]
        self.fsdp = self.scale.strategy == "fsdp"
        if self.fsdp:
            self._shard()
        elif w > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = torch.device(self.cfg.device)
            self.model = DDP(self.module, device_ids=[dev.index if dev.index is not None else self.env.local_rank]
                             if dev.type == "cuda" else None)

    def _shard(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # CausalFusion.forward returns a view; nothing modifies it in place, so FSDP2's warning about
        # in-place ops on views does not apply here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(torch.device(self.cfg.device).type, (self.env.world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.cfg.precision == "bf16" else MixedPrecisionPolicy())
        opt_state = self.opt.state_dict()
        for block in self.module.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(self.module, mesh=mesh, mp_policy=mp)
        fully_shard(self.ema, mesh=mesh)  # sharded storage only: the EMA never runs forward here
        c = self.cfg
        self.opt = adamw(self.module.parameters(), c.lr, c.adam_eps)
        if opt_state["state"]:  # resumed: the full optimizer state, sharded like the parameters
            set_optimizer_state_dict(self.module, self.opt, optimizer_state_by_name(opt_state, self._names),
                                     options=StateDictOptions(full_state_dict=True))

    # -- one step ------------------------------------------------------------------------------
    def _rows_loss(self, x0: torch.Tensor, y: torch.Tensor, order: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, group_sizes: list[int], weights: torch.Tensor) -> torch.Tensor:
        """``objective.noised_loss`` for rows whose randomness was drawn for the global batch."""
        return noised_loss(self.module, self.diffusion, x0, y, order, t, noise, group_sizes, weights.to(x0.device),
                           run_model=self.model)

    def _sync(self, on: bool):
        if self.fsdp:
            self.model.set_requires_gradient_sync(on)
            return contextlib.nullcontext()
        if on or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self) -> dict[str, float]:
        c, dev, mc = self.cfg, torch.device(self.cfg.device), self.model_cfg
        w, r, a = self.env.world, self.env.rank, self.scale.grad_accum
        gb = c.batch_size
        # The global batch's randomness, drawn on every rank in the Trainer's order.
        index, flip, seeds = self.stream.next_indices()
        y = drop_labels(self.dataset.labels[index], c.label_dropout, mc.num_classes, self.gen)
        plan, noise = draw_plan_and_noise(self.plan_cfg, gb, mc, self.diffusion.num_timesteps, self.gen)
        local, micro = gb // w, gb // (w * a)
        lo = r * local
        x_local = self.dataset.get(index[lo:lo + local], None if flip is None else flip[lo:lo + local],
                                   None if seeds is None else seeds[lo:lo + local])
        set_lr(self.opt, self.lr_at(self.step))
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(a):
            rows = slice(lo + i * micro, lo + (i + 1) * micro)
            with self._sync(i == a - 1), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
                loss = self._rows_loss(x_local[i * micro:(i + 1) * micro].to(dev), y[rows].to(dev),
                                       plan.order[rows].to(dev), plan.t[rows].to(dev), noise[rows].to(dev),
                                       plan.group_sizes, plan.weights)
            (loss / a).backward()
            total += loss.detach().double().cpu()
        mean = total / a
        if self.env.active and w > 1:
            red = mean.to(dev if dev.type == "cuda" else "cpu")
            dist.all_reduce(red)
            mean = red.cpu() / w
        check_finite(mean, self.step)
        gnorm = apply_gradients(self.module, self.ema, self.opt, c.grad_clip, self.ema_decay_at(self.step), self.step)
        self.step += 1
        return {"loss": float(mean), "grad_norm": gnorm, "lr": self.lr_at(self.step - 1),
                "ar_steps": plan.num_steps}

    # -- checkpoints and grids from rank 0 -------------------------------------------------------
    def _full_states(self, with_optimizer: bool = True) -> tuple[dict, dict, dict | None]:
        """Full (unsharded, CPU) model / EMA / optimizer state on rank 0; empty elsewhere. Collective."""
        if not self.fsdp:
            if not self.is_main:
                return {}, {}, None
            return self.module.state_dict(), self.ema.state_dict(), self.opt.state_dict() if with_optimizer else None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.module, options=opts)
        ema = get_model_state_dict(self.ema, options=opts)
        opt = get_optimizer_state_dict(self.module, self.opt, options=opts) if with_optimizer else None
        if opt is not None and self.is_main:
            opt = optimizer_state_by_index(opt, self._names)
        return model, ema, opt

    def save(self) -> None:
        model, ema, opt = self._full_states()
        if self.is_main:
            if self._new_config:
                self._new_config.write()
            save_checkpoint_states(self.out, self.step, model, ema, opt, self.checkpoint_extra(), {"data": self.dataset.name})
        barrier()

    def sample_grid(self, path: Path | None = None, steps: int | None = None) -> Path | None:
        """``Trainer.sample_grid`` on rank 0, with the EMA gathered in full first under FSDP."""
        _, ema_state, _ = self._full_states(with_optimizer=False)
        if self.is_main:
            ema = self.ema
            if self.fsdp:
                ema = CausalFusion(self.model_cfg).to(self.cfg.device)
                ema.load_state_dict(ema_state)
            path = super().sample_grid(path, steps, ema=ema.eval())
        barrier()
        return path


def make_trainer(model_cfg: ModelConfig, plan_cfg: ARPlanConfig, train_cfg: TrainConfig, dataset: Dataset,
                 resume: bool = False, scale: ScaleConfig | None = None, compile: bool = False) -> Trainer:
    """``Trainer`` for a plain single-process run, ``DistributedTrainer`` under torchrun or with
    FSDP2 / accumulation / checkpointing (one process and none of those: the two are identical), and
    for a resumed run that saved its scale (so that config.json records the one it continues with).
    ``scale`` None: a resumed run's saved one (``scale_config``), else the defaults. ``compile``: the
    compiled forward/backward (``compiling.CompiledForward``), single-process ``Trainer`` only."""
    scale = scale if scale is not None else scale_config(train_cfg.out, resume)
    if launched_by_torchrun() or scale != ScaleConfig() or (resume and "scale" in read_config(train_cfg.out)):
        if compile:
            raise ValueError("--compile trains in one process without --strategy/--grad-accum/--grad-ckpt; "
                             "leave it out under torchrun or with those")
        return DistributedTrainer(model_cfg, plan_cfg, train_cfg, resume=resume, dataset=dataset, scale=scale)
    return Trainer(model_cfg, plan_cfg, train_cfg, resume=resume, dataset=dataset, compile=compile)


# ---- sampling ------------------------------------------------------------------------------------
def uint8_to_images(arr: np.ndarray) -> torch.Tensor:
    """The inverse of ``images.to_uint8`` (exact on uint8 values)."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_in_chunks(n: int, batch_size: int, sample_fn: Callable[[int, int], torch.Tensor],
                     env: DistEnv | None = None, progress: bool = False) -> np.ndarray | None:
    """Produce global samples ``0..n-1`` on all ranks; rank 0 returns them as uint8 [n, H, W, C].

    ``sample_fn(start, stop)`` returns images in [-1, 1] for global indices start..stop-1 (it must
    seed every sample by its global index, as ``sampling.sample`` does with ``first_index=start``).
    Chunk j (``batch_size`` samples) is computed by rank j mod W; after each round rank 0 gathers
    the chunks, so memory on rank 0 is the uint8 result plus one round. Other ranks return None.
    """
    from .progress import progress_bar

    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch size >= 1, got {n} and {batch_size}")
    env = env or init_distributed()
    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    out = None
    bar = progress_bar(total=n, desc=f"sampling ({env.world} processes)", disable=not (progress and env.is_main), unit="img")
    for first in range(0, len(chunks), env.world):
        j = first + env.rank
        mine = to_uint8(sample_fn(*chunks[j])) if j < len(chunks) else None
        if env.active and env.world > 1:
            got = [None] * env.world if env.is_main else None
            dist.gather_object(mine, got, dst=0)
        else:
            got = [mine]
        if env.is_main:
            for k, arr in enumerate(got):
                if arr is None:
                    continue
                s, e = chunks[first + k]
                if arr.shape[0] != e - s:
                    raise RuntimeError(f"rank {k} returned {arr.shape[0]} images for samples {s}..{e - 1}")
                if out is None:
                    out = np.empty((n, *arr.shape[1:]), dtype=np.uint8)
                out[s:e] = arr
                bar.update(e - s)
    bar.close()
    return out if env.is_main else None
