"""Training a multimodal CausalFusion (same optimiser recipe as ``causalfusion.trainer``).

AdamW (0.9, 0.95), linear warmup then constant lr, clip 1.0, EMA with warm-up, bf16 autocast,
checkpoints in the shared safetensors format (``checkpoint.save_checkpoint``), plus
``tokenizer.json`` in the run directory. One generator drives batches, caption choice, the
layout split, AR plans and noise, and is saved, so ``resume`` continues bit-identically.
"""
from __future__ import annotations

import copy
import csv
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from ..progress import progress_bar

from ..ar_plan import ARPlanConfig
from ..checkpoint import (CheckpointError, check_same_config, load_training_state, load_weights, read_config,
                          read_run_config, save_checkpoint, trained_order, write_config)
from ..devices import check_precision
from ..diffusion import Diffusion
from ..files import NewFiles
from ..models import ModelConfig
from ..optimization import adamw, apply_gradients, check_finite, ema_decay_at, set_lr, warmup_lr
from ..trainer import (RUN_FILES, PendingConfig, check_resume_step, check_run_dir, check_train_settings, discard_unsaved,
                       trim_log)
from .data import CaptionDataset, CaptionStream, load_captioned
from .model import MultimodalCausalFusion, TextConfig, build_model
from .objective import MixConfig, multimodal_loss
from .tokenizer import FILE_NAME as TOKENIZER_FILE, MIN_BPE_VOCAB, TextTokenizer, train_bpe

KIND = "multimodal"


@dataclass
class MMTrainConfig:
    data: str = "shapes"
    out: str = "runs/mm"
    image_size: int | None = None
    tokenizer: str | None = None  # a tokenizer.json; None: train a BPE on the captions
    bpe_vocab: int = 512
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    adam_eps: float = 1e-8  # torch's default (the class-conditional --config uses the release's 1e-15)
    precision: str = "fp32"
    seed: int = 0
    device: str = "cpu"
    log_every: int = 25
    ckpt_every: int = 500
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "MMTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """One clear ValueError for a setting that would crash or hang later (after files are written)."""
        check_train_settings(self)
        if self.tokenizer is None and self.bpe_vocab < MIN_BPE_VOCAB:  # below it BPE silently keeps the byte alphabet
            raise ValueError(f"--bpe-vocab must be >= {MIN_BPE_VOCAB} (256 bytes + special tokens), got {self.bpe_vocab}")


@dataclass
class MMTrainer:
    model_cfg: ModelConfig
    text_overrides: dict  # TextConfig fields other than vocab_size (which the tokenizer fixes)
    plan_cfg: ARPlanConfig
    mix: MixConfig
    cfg: MMTrainConfig
    resume: bool = False
    dataset: CaptionDataset | None = None
    step: int = field(init=False, default=0)
    # loss sums since the last log.csv row: loss, image_loss, text_loss, rows, image-first rows (saved with
    # the checkpoint, so that a resumed run logs the same means)
    log_sums: list[float] = field(init=False, default_factory=lambda: [0.0] * 5)
    _new_config: PendingConfig | None = field(init=False, default=None, repr=False)  # set on resume
    _new_files: NewFiles | None = field(init=False, default=None, repr=False)  # a fresh run's (see Trainer.train)

    def __post_init__(self) -> None:
        c = self.cfg
        c.validate()  # everything here is checked before the first file is written
        check_precision(c.precision, c.device)
        self.mix.validate()
        self.out = Path(c.out)
        check_run_dir(self.out, self.resume)
        self.dataset = self.dataset or load_captioned(c.data, c.image_size, c.seed)
        d = self.dataset
        if (d.image_size, 3) != (self.model_cfg.image_size, self.model_cfg.in_channels):
            raise ValueError(f"model expects {self.model_cfg.in_channels}x{self.model_cfg.image_size}px images, "
                             f"{d.name} has 3x{d.image_size}px")
        self.plan_cfg.validate(self.model_cfg.num_tokens)
        if self.resume:
            self.tokenizer = TextTokenizer.load(self.out)
        elif c.tokenizer:
            self.tokenizer = TextTokenizer.load(c.tokenizer)
        else:
            self.tokenizer = train_bpe(d.all_captions(), c.bpe_vocab)
        self.text_cfg = TextConfig(vocab_size=self.tokenizer.vocab_size, **self.text_overrides)
        torch.manual_seed(c.seed)
        self.model = MultimodalCausalFusion(self.model_cfg, self.text_cfg).to(c.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = adamw(self.model.parameters(), c.lr, c.adam_eps)
        self.diffusion = Diffusion(prediction=self.model_cfg.prediction)
        self.gen = torch.Generator().manual_seed(c.seed)
        ids, lens = self.tokenizer.batch(d.all_captions(), self.text_cfg.max_text_len)
        self.stream = CaptionStream(d, ids, lens, c.batch_size, self.gen)
        config = {"kind": KIND, "model": self.model_cfg.to_dict(), "text": self.text_cfg.to_dict(),
                  "plan": asdict(self.plan_cfg), "mix": asdict(self.mix), "train": asdict(c), "data": d.name}
        if self.resume:
            saved = read_config(self.out)
            self._check_resume(saved, config)
            state, extra = load_training_state(self.out, self.model, self.ema, self.opt)
            self.step = check_resume_step(self.out, int(state["step"]), c.steps)
            self.gen.set_state(extra["gen"])
            self.stream.load_state({"perm": extra["perm"], "pos": extra["pos"]})
            if "log_sums" in extra:
                self.log_sums = extra["log_sums"].tolist()
            self._new_config = PendingConfig(self.out, saved, config["train"])
        else:
            # before the first write: what train() takes back if it fails early
            self._new_files = NewFiles(self.out, (*RUN_FILES, TOKENIZER_FILE))
            write_config(self.out, config)
            self.tokenizer.save(self.out)

    def _check_resume(self, saved: dict, config: dict) -> None:
        """Refuse to continue a run with another model, text, plan or mix, or on other data (``data`` and
        ``seed`` draw the images; ``tokenizer``/``bpe_vocab``: the run keeps its tokenizer.json). The
        training settings (lr, steps, batch, ...) may change."""
        data = ("data", "seed", "tokenizer", "bpe_vocab")
        parts = {**{k: config[k] for k in ("model", "text", "plan", "mix")}, "data": {k: config["train"][k] for k in data}}
        old = {**saved, "data": {k: saved.get("train", {}).get(k) for k in data}}
        like = {"model": ModelConfig, "text": TextConfig, "plan": ARPlanConfig, "mix": MixConfig}
        for part, given in parts.items():
            check_same_config(self.out, part, old.get(part), given, like.get(part))

    def lr_at(self, step: int) -> float:
        return warmup_lr(step, self.cfg.lr, self.cfg.warmup)

    def train_step(self) -> dict[str, float]:
        c = self.cfg
        x0, ids, lens = self.stream.next()
        set_lr(self.opt, self.lr_at(self.step))
        self.model.train()
        with torch.autocast(torch.device(c.device).type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
            loss, stats = multimodal_loss(self.model, self.diffusion, x0.to(c.device), ids, lens, self.plan_cfg,
                                          self.mix, self.gen)
        check_finite(loss, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = apply_gradients(self.model, self.ema, self.opt, c.grad_clip, ema_decay_at(self.step, c.ema_decay), self.step)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": gnorm, **stats}

    def save(self) -> None:
        if self._new_config:
            self._new_config.write()
        extra = {"gen": self.gen.get_state(), **self.stream.state(),
                 "log_sums": torch.tensor(self.log_sums, dtype=torch.float64)}
        save_checkpoint(self.out, self.step, self.model, self.ema, self.opt, extra, {"data": self.dataset.name, "kind": KIND})

    def train(self) -> dict[str, float]:
        """Run to ``cfg.steps``; log.csv holds running means of the losses (text over image-first rows).
        A fresh run that fails before its first checkpoint removes what it wrote (``trainer.discard_unsaved``)."""
        try:
            return self._train()
        except Exception:
            discard_unsaved(self._new_files, self.out)
            raise

    def _train(self) -> dict[str, float]:
        c, log_path = self.cfg, self.out / "log.csv"
        new_log = not log_path.exists()
        if not new_log:  # rows a killed run logged after its last checkpoint
            new_log = trim_log(log_path, self.step)
        last: dict[str, float] = {}
        with open(log_path, "a", newline="") as f:
            log = csv.writer(f)
            if new_log:
                log.writerow(["step", "loss", "image_loss", "text_loss", "grad_norm", "it_per_s"])
            bar = progress_bar(total=c.steps, initial=self.step, desc="train-mm", disable=not c.progress, dynamic_ncols=True)
            t0, s0 = time.perf_counter(), self.step
            while self.step < c.steps:
                last = self.train_step()
                sums = self.log_sums
                sums[0] += last["loss"]
                sums[1] += last["image_loss"]
                sums[3] += 1
                if last["image_first"]:
                    sums[2] += last["text_loss"]
                    sums[4] += 1
                bar.update(1)
                bar.set_postfix(img=f"{last['image_loss']:.3f}", txt=f"{last['text_loss']:.2f}")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    ips = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                    n, nt = sums[3], max(sums[4], 1)
                    log.writerow([self.step, f"{sums[0] / n:.5f}", f"{sums[1] / n:.5f}",
                                  f"{sums[2] / nt:.4f}", f"{last['grad_norm']:.3f}", f"{ips:.2f}"])
                    f.flush()
                    if self.step % c.log_every == 0:  # (the last step's extra row: a longer run continues the window)
                        self.log_sums = [0.0] * 5
                if self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self.save()
            bar.close()
        return last


def load_multimodal(run_dir: str | Path, ema: bool = True, device: str = "cpu") -> tuple[MultimodalCausalFusion, TextTokenizer]:
    """(model in eval mode, its tokenizer) of a run directory written by ``MMTrainer``."""
    config = read_run_config(run_dir)
    if config.get("kind") != KIND:
        raise CheckpointError(f"{run_dir} is not a multimodal run (train one with `causalfusion train-mm`)")
    tokenizer = TextTokenizer.load(run_dir)
    try:
        model = build_model(config["model"], config["text"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir}/config.json has no valid model/text config ({e})") from None
    if model.text_cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{run_dir}/tokenizer.json has {tokenizer.vocab_size} tokens, the model {model.text_cfg.vocab_size}")
    model.trained_order = trained_order(config)  # sampling's default order (see checkpoint.trained_order)
    return load_weights(run_dir, model, ema).to(device).eval(), tokenizer
