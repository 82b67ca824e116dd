"""Small-scale reproductions of the paper's ablations (Tab. 2, 3a, 3b, 3c, 7): train a suite of
configurations with one equal budget, evaluate each at several S_eval, write a Markdown report.

Equal budget: every configuration of a suite trains the same number of steps on batches of the
same size (Tab. 7's "4x t" uses batch/4 with 4 timesteps per image, so the number of noisy tokens
per step stays equal, as in the paper), from the same seed, with the same model and optimiser,
and is evaluated on the same balanced labels with the same sampling seed. The batches themselves
are equal only through the first epoch: one generator shuffles the data and draws the AR plans and
noise, so configurations that draw different amounts of randomness (raster vs random order, fixed
vs random S) shuffle later epochs differently (same distribution, other draws). ``--budget SECONDS``
only picks that step count: it times a few steps of every configuration and a small evaluation,
then solves for the steps that fit the wall-clock budget. The choice is stored in
``<out>/suite.json``, so an interrupted suite resumes with the same steps.

Resumable: each configuration lives in ``<out_root>/_runs/<hash of its settings>/`` (a normal run
directory; ``<out_root>/<suite>/runs.json`` maps config names to them, and suites share identical
configurations, e.g. decay's γ=1 is ar-steps' "random"; the hash covers training settings only).
A finished one (``result.json`` whose settings match) is reused, and sampled only at the S_eval it
has no row for; a half-trained one is resumed from its last checkpoint (bit-identically, see
``Trainer``); a trained but unevaluated one is only evaluated.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .ablation_suites import L, SUITES, AblationConfig, Suite, get_suite, select_configs  # noqa: F401 (re-exported)
from .ar_plan import ARPlanConfig
from .checkpoint import read_json
from .files import check_dir_path, write_json
from .sampling import check_seed

if TYPE_CHECKING:  # annotations only; training and evaluation load lazily where they are used
    from .data import Dataset
    from .metrics import FeatureExtractor, ReferenceStats
    from .models import ModelConfig

# ---- settings shared by every config of a suite run ----------------------------------------------
@dataclass
class AblationSettings:
    data: str = "digits"
    seed: int = 0
    steps: int | None = None  # training steps per config (or chosen from budget)
    budget: float | None = None  # wall seconds for the whole suite
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int | None = None  # default: min(100, steps // 10)
    ema_decay: float = 0.999
    precision: str = "bf16"
    depth: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    class_tokens: int = 4
    eval_n: int = 500
    eval_steps: int = 50  # DDPM steps per AR step
    s_eval: tuple | None = None  # default: the suite's
    ckpt_every: int = 100
    inception: str | None = None
    ref: str | None = None
    cache_dir: str | None = None
    progress: bool = False

    def model_config(self, dataset):
        from .models import ModelConfig

        return ModelConfig(image_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes,
                           patch_size=2 if dataset.image_size <= 16 else 4, depth=self.depth,
                           hidden_size=self.hidden_size, num_heads=self.num_heads, class_tokens=self.class_tokens)


def plan_config(cfg: AblationConfig, num_tokens: int) -> ARPlanConfig:
    plan = dict(cfg.plan)
    if plan.get("fixed_steps") == L:
        plan["fixed_steps"] = num_tokens
    return ARPlanConfig(**plan)


def eval_settings(cfg: AblationConfig, steps: int, s_eval) -> list:
    from .evaluation import EvalSetting

    p = cfg.plan
    order = p.get("order", "random")
    return [EvalSetting(int(s), order, steps, 1.0, p.get("block", 4), p.get("dilation", 2)) for s in s_eval]


def _train_config(st: AblationSettings, cfg: AblationConfig, out: Path, steps: int):
    from .trainer import TrainConfig

    warmup = st.warmup if st.warmup is not None else max(1, min(100, steps // 10))
    return TrainConfig(data=st.data, out=str(out), steps=steps, batch_size=max(1, st.batch_size // cfg.batch_div),
                       lr=st.lr, warmup=warmup, ema_decay=st.ema_decay, precision=st.precision, seed=st.seed,
                       log_every=max(1, min(25, steps // 10)), ckpt_every=st.ckpt_every, sample_every=0,
                       progress=st.progress)


def run_signature(st: AblationSettings, cfg: AblationConfig, steps: int) -> dict:
    """What must match for a trained config directory to be reused: training settings only, so one
    run serves every suite that trains it, whatever S_eval each asks for."""
    keys = ("data", "seed", "batch_size", "lr", "warmup", "ema_decay", "precision", "depth", "hidden_size",
            "num_heads", "class_tokens")
    return {"plan": dict(sorted(cfg.plan.items())), "batch_div": cfg.batch_div, "steps": steps,
            **{k: getattr(st, k) for k in keys}}


def eval_signature(st: AblationSettings) -> dict:
    """What must match for a stored S_eval row to be reused (each S_eval is sampled from the same seed
    on its own, so rows of different invocations combine)."""
    return {k: getattr(st, k) for k in ("eval_n", "eval_steps", "inception", "ref")}


def run_dir_for(out_root: Path, sig: dict) -> Path:
    """``<out_root>/_runs/<hash of the signature>``: suites share a run whose settings are identical
    (decay's γ=1 is ar-steps' "random", order's "random" is decay's γ=0.9), so it is trained once."""
    import hashlib

    return Path(out_root) / "_runs" / hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]


# ---- calibration (--budget) ----------------------------------------------------------------------
def _time_steps(st: AblationSettings, cfg: AblationConfig, dataset, mc, n: int = 3) -> float:
    import tempfile

    from .trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(mc, plan_config(cfg, mc.num_tokens), _train_config(st, cfg, Path(tmp), 100), dataset=dataset)
        tr.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            tr.train_step()
        return (time.perf_counter() - t0) / n


def _time_eval(st: AblationSettings, cfg: AblationConfig, mc, s_eval, n: int = 50) -> float:
    from .evaluation import balanced_labels, sample_uint8
    from .models import CausalFusion

    torch.manual_seed(0)
    model = CausalFusion(mc).eval()
    t0 = time.perf_counter()
    for es in eval_settings(cfg, st.eval_steps, s_eval):
        sample_uint8(model, balanced_labels(n, mc.num_classes), es, st.seed)
    return (time.perf_counter() - t0) * st.eval_n / n


def choose_steps(st: AblationSettings, suite: Suite, dataset: Dataset, mc: ModelConfig, s_eval: list[int],
                 log: Callable[[str], None] = print) -> dict:
    """Training steps per config that fit ``st.budget`` seconds for the whole suite (>= 10)."""
    per_step, per_eval = {}, {}
    for cfg in suite.configs:
        per_step[cfg.name] = _time_steps(st, cfg, dataset, mc)
        per_eval[cfg.name] = _time_eval(st, cfg, mc, s_eval)
        log(f"  calibrate {cfg.name}: {per_step[cfg.name]:.3f} s/step, ~{per_eval[cfg.name]:.0f} s evaluation")
    overhead = 5.0 * len(suite.configs)  # reference stats, checkpoints, start-up
    left = st.budget - sum(per_eval.values()) - overhead
    steps = max(10, int(left / sum(per_step.values())))
    return {"steps": steps, "seconds_per_step": per_step, "eval_seconds": per_eval, "budget": st.budget}


# ---- running ---------------------------------------------------------------------------------------
def _final_loss(run_dir: Path, frac: float = 0.1) -> float | None:
    import csv

    path = run_dir / "log.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    tail = rows[-max(1, int(len(rows) * frac)):]
    return sum(float(r["loss"]) for r in tail) / len(tail)


def _read_code(out: Path) -> list[dict]:
    path = out / "code.json"
    if not path.is_file():
        return []
    try:
        code = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e})") from None
    if not (isinstance(code, list) and all(isinstance(c, dict) for c in code)):
        raise ValueError(f"{path} is corrupt (not a list of objects)")
    return code


def _record_code(out: Path, code: tuple[str, str], from_step: int) -> list[dict]:
    """Append (commit, digest, first step it trains) to ``out/code.json`` before training: a run that
    is interrupted and resumed by other code then names both."""
    history = _read_code(out) + [{"commit": code[0], "source_digest": code[1], "from_step": from_step}]
    write_json(out / "code.json", history)
    return history


def run_config(st: AblationSettings, cfg: AblationConfig, out: Path, steps: int, s_eval: list[int], dataset: Dataset,
               mc: ModelConfig, extractor: FeatureExtractor, reference: ReferenceStats, log: Callable[[str], None] = print,
               code: tuple[str, str] | None = None) -> dict:
    """Train (or resume, or reuse) one configuration and evaluate it; returns its result dict.

    ``code`` (git state, source digest) is stored with the result: a reused run keeps the code that
    trained it, which need not be the code of the invocation that reports it; a resumed run keeps
    every code that trained part of it (``code_history``)."""
    from .checkpoint import load_model
    from .evaluation import evaluate_model
    from .trainer import Trainer

    sig, esig = run_signature(st, cfg, steps), eval_signature(st)
    res_path = out / "result.json"
    if res_path.is_file():
        res = read_json(res_path)  # one line naming the file when it is damaged
        if res.get("signature") != sig:
            raise ValueError(f"{out} holds a run with other settings ({res_path}); delete it or choose another --out")
        done = {r["ar_steps"]: r for r in res["rows"]} if res.get("eval_signature") == esig else {}
        missing = [int(v) for v in s_eval if int(v) not in done]
        if missing:  # trained earlier (maybe by another suite): sample only the S_eval it lacks
            log(f"  {cfg.name}: trained earlier ({out}), evaluating S_eval {missing}")
            t1 = time.perf_counter()
            rows = evaluate_model(load_model(out), eval_settings(cfg, st.eval_steps, missing), extractor,
                                  reference, st.eval_n, st.seed)
            done.update({r["ar_steps"]: r for r in rows})
            res = {**res, "eval_signature": esig, "rows": [done[k] for k in sorted(done)],
                   "eval_seconds": res["eval_seconds"] + time.perf_counter() - t1}
            write_json(res_path, res)
        else:
            log(f"  {cfg.name}: finished earlier ({out}), reused")
        return {**res, "rows": [done[int(v)] for v in s_eval], "name": cfg.name, "label": cfg.label,
                "run_dir": str(out), "reused": True}
    resume = (out / "state.json").is_file()  # a run trained beyond `steps` is refused by the Trainer
    t0 = time.perf_counter()
    trainer = Trainer(mc, plan_config(cfg, mc.num_tokens), _train_config(st, cfg, out, steps), resume=resume,
                      dataset=dataset)
    start = trainer.step
    history = _record_code(out, code, start) if trainer.step < steps and code is not None else _read_code(out)
    if trainer.step < steps:
        trainer.train()
    train_s = time.perf_counter() - t0
    log(f"  {cfg.name}: trained steps {start}..{trainer.step} in {train_s:.0f} s")
    t1 = time.perf_counter()
    rows = evaluate_model(trainer.ema.eval(), eval_settings(cfg, st.eval_steps, s_eval), extractor, reference,
                          st.eval_n, st.seed)
    eval_s = time.perf_counter() - t1
    log(f"  {cfg.name}: evaluated in {eval_s:.0f} s: " + ", ".join(f"S={r['ar_steps']} FID {r['fid']:.2f}" for r in rows))
    res = {"signature": sig, "eval_signature": esig, "name": cfg.name, "label": cfg.label, "rows": rows, "train_seconds": train_s,
           "eval_seconds": eval_s, "resumed_from": start, "final_loss": _final_loss(out),
           "params": sum(p.numel() for p in trainer.model.parameters()), "run_dir": str(out)}
    if history:  # the code that began the run; every invocation that trained steps is in the history
        res["code"] = {k: history[0][k] for k in ("commit", "source_digest")}
        res["code_history"] = history
    write_json(res_path, res)
    return res


def check_budget(budget: float) -> None:
    """--budget: a finite number of seconds > 0 (NaN fails every comparison, so it is tested as
    "inside", not "not outside": it used to pass and fail at int() after OUT/<suite> was made)."""
    if not 0 < budget < float("inf"):
        raise ValueError(f"--budget must be > 0 seconds, got {budget}")


def check_suite_counts(batch_size: int, eval_n: int, eval_steps: int, seed: int, steps: int | None = None) -> None:
    """The counts every suite's runs need (both suites: this one and ``multimodal.ablation``), checked
    before anything is trained or written; ``steps`` None: chosen from --budget later."""
    for flag, v, low in (("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--eval-n", eval_n, 2),
                         ("--eval-steps", eval_steps, 1)):
        if v is not None and v < low:
            raise ValueError(f"{flag} must be >= {low}, got {v}")
    check_seed(seed)  # (the runs' Trainers check it too, but only after OUT/<suite> is made)


def run_suite(name: str, settings: AblationSettings | None = None, out_root: str | Path = "runs/ablate",
              configs: list[str] | None = None, command: str | None = None, log=print) -> Path:
    """Run (or continue) suite ``name``; write ``<out_root>/<name>/report.md`` and ``<name>.png``."""
    from .data import load_dataset
    from .evaluation import make_extractor, reference_stats
    from .ablation_report import git_state, source_digest, write_report

    st = settings or AblationSettings()
    suite = select_configs(get_suite(name), configs)
    s_eval = tuple(st.s_eval or suite.s_eval)
    if (st.steps is None) == (st.budget is None):
        raise ValueError("give exactly one of --steps (per config) and --budget (seconds for the suite)")
    if st.budget is not None:
        check_budget(st.budget)
    check_suite_counts(st.batch_size, st.eval_n, st.eval_steps, st.seed, st.steps)
    check_dir_path(out_root)
    out = Path(out_root) / name
    if min(s_eval) < 1:  # before any training or writing
        raise ValueError(f"--eval-ar-steps: every S_eval must be >= 1, got {list(s_eval)}")
    check_dir_path(out)  # (OUT/<suite> itself a file)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    code = (git_state(), source_digest())  # the code that runs is the code loaded now
    dataset = load_dataset(st.data)
    mc = st.model_config(dataset)
    if max(s_eval) > mc.num_tokens:
        raise ValueError(f"S_eval {max(s_eval)} exceeds the {mc.num_tokens} tokens of an image")
    suite_path = out / "suite.json"
    saved = read_json(suite_path) if suite_path.is_file() else None
    keep = json.loads(json.dumps({k: v for k, v in asdict(st).items()  # JSON round trip: tuples -> lists
                                  if k not in ("steps", "budget", "progress", "cache_dir")}))
    if saved and saved.get("settings") == keep and saved.get("budget") == st.budget and st.budget is not None:
        calib = saved["calibration"]
        log(f"{name}: resuming with {calib['steps']} steps per config (chosen earlier from --budget {st.budget:g})")
    elif st.budget is not None:
        log(f"{name}: calibrating for a budget of {st.budget:g} s")
        calib = choose_steps(st, suite, dataset, mc, s_eval, log)
    else:
        calib = {"steps": st.steps}
    steps = int(calib["steps"])
    same = saved and saved.get("settings") == keep and int(saved.get("calibration", {}).get("steps", -1)) == steps
    history = saved.get("invocations", []) if same else []
    write_json(suite_path, {"settings": keep, "budget": st.budget, "calibration": calib, "invocations": history})
    log(f"{name}: {len(suite.configs)} configs x {steps} steps (batch {st.batch_size}), S_eval {list(s_eval)}, "
        f"{st.eval_n} samples x {st.eval_steps} DDPM steps each")
    extractor = make_extractor(st.data, st.inception, "cpu", st.cache_dir)
    reference = reference_stats(st.data, extractor, st.ref, st.cache_dir, mc.image_size, mc.in_channels)
    results, runs = [], {}
    for cfg in suite.configs:
        run_dir = run_dir_for(Path(out_root), run_signature(st, cfg, steps))
        runs[cfg.name] = str(run_dir)
        write_json(out / "runs.json", runs)  # config -> its run directory
        results.append(run_config(st, cfg, run_dir, steps, s_eval, dataset, mc, extractor, reference, log, code))
    wall = time.perf_counter() - t_start
    history.append({"command": command, "wall_seconds": round(wall, 1), "configs": [c.name for c in suite.configs],
                    "reused": sum(bool(r.get("reused")) for r in results), "commit": code[0],
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(suite_path, {"settings": keep, "budget": st.budget, "calibration": calib, "invocations": history})
    return write_report(out, suite, st, results, steps, s_eval, calib, wall, command, mc, extractor, code, history)
