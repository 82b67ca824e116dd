"""`causalfusion eval`, `ablate` and `probe` (docs/evaluation.md)."""
from __future__ import annotations

import argparse

from ..diffusion import PREDICTIONS
from ..files import write_json
from .common import STEPS_HINT, add_order_args, check_outputs, ints, refuse


def cmd_eval(a: argparse.Namespace) -> None:
    from ..evaluation import evaluate_checkpoint, evaluate_npz, format_metrics, format_rows

    check_outputs(a.json)
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.npz:
        m = evaluate_npz(a.npz, a.data or "digits", a.inception, a.ref, a.device)
        print(format_metrics(m))
        rows = [m]
    else:
        rows = evaluate_checkpoint(a.ckpt, n=a.n, ar_steps=ints(a.ar_steps, "--ar-steps"), order=a.order,
                                   steps=a.sample_steps, cfg=a.cfg, seed=a.seed, data=a.data, inception=a.inception,
                                   ref=a.ref, raw=a.raw, device=a.device, batch_size=a.batch_size, block=a.block,
                                   dilation=a.dilation, vae_path=a.vae_path, precision=a.precision,
                                   compile=a.compile, progress=not a.no_progress)
        print(format_rows(rows))
    if a.json:
        write_json(a.json, rows)
        print(f"wrote {a.json}")


def cmd_ablate(a: argparse.Namespace) -> None:
    import shlex

    if a.suite == "multimodal":  # Tab. 6a, vision-language: causalfusion/multimodal/ablation.py
        return _ablate_multimodal(a, "causalfusion " + shlex.join(a.argv))
    from ..ablation import AblationSettings, run_suite

    if a.prediction is not None:
        raise ValueError(f"--prediction applies to the multimodal suite only; the {a.suite} suite trains eps models as the paper does")
    st = AblationSettings(data=a.data, seed=a.seed, steps=a.steps, budget=a.budget, batch_size=a.batch_size, lr=a.lr,
                          depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, eval_n=a.eval_n,
                          eval_steps=a.eval_sample_steps, precision=a.precision, inception=a.inception, ref=a.ref,
                          s_eval=tuple(ints(a.eval_ar_steps, "--eval-ar-steps")) if a.eval_ar_steps else None,
                          progress=not a.no_progress)
    configs = [c for c in a.configs.split(",") if c] if a.configs else None
    command = "causalfusion " + shlex.join(a.argv)
    report = run_suite(a.suite, st, a.out, configs, command, log=lambda msg: print(msg, flush=True))
    print(f"wrote {report} and {report.parent / (a.suite + '.png')}")


def _suite_default_flags(p: argparse.ArgumentParser) -> None:
    """The ablate flags whose defaults are the class-conditional suites' (the multimodal suite has its own)."""
    for flag in ("--batch-size", "--lr", "--eval-n"):
        p.add_argument(flag)


def _ablate_multimodal(a: argparse.Namespace, command: str) -> None:
    """``--suite multimodal``: the shared ablate flags -> ``MMSuiteSettings``. ``--steps`` per run, or
    ``--budget`` seconds for the whole suite (all runs; about 10% is kept for evaluation). The report
    goes to ``OUT/multimodal/report.md`` with ``multimodal.png``."""
    from pathlib import Path

    from ..multimodal.ablation import MMSuiteSettings, budget_steps, run_suite
    from .train import given_flags

    if a.data not in ("digits", "shapes"):  # "digits" is the shared default flag value
        raise ValueError(f"the multimodal suite trains on the built-in captioned 'shapes' data, not {a.data!r}")
    st = MMSuiteSettings(precision=a.precision, depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads,
                         seed=a.seed, eval_steps=a.eval_sample_steps, progress=not a.no_progress)
    # --batch-size/--lr/--eval-n default to the class-conditional suites' 64, 5e-4 and 500: left out, this suite's own
    for k in given_flags(getattr(a, "argv", []), _suite_default_flags):
        setattr(st, k, getattr(a, k))
    if a.prediction is not None:
        st.prediction = a.prediction
    if a.steps is not None:
        st.steps = a.steps
    else:
        st.steps = budget_steps(st, a.budget)
        print(f"multimodal: budget {a.budget:.0f}s -> {st.steps} steps per run", flush=True)
    out = Path(a.out) / "multimodal"
    report = run_suite(out, out / "report.md", st, command, log=lambda m: print(m, flush=True))
    print(f"wrote {report} and {report.parent / 'multimodal.png'}")


def cmd_probe(a: argparse.Namespace) -> None:
    from ..probe import format_probe, probe_checkpoint

    results = []
    for ckpt in a.ckpt:
        res = probe_checkpoint(ckpt, a.data, a.mode, a.raw, a.device)
        results.append(res)
        plan = f"fixed S_train={res['fixed_steps']}" if res["fixed_steps"] else f"gamma {res['gamma']}"
        print(f"{ckpt} (step {res['step']}, {plan}):")
        print("  " + format_probe(res).replace("\n", "\n  "))


def add_parser(sub) -> None:
    """`eval`, `ablate` and `probe` (docs/evaluation.md)."""
    from ..ablation import SUITES

    e = sub.add_parser("eval", help="FID / IS / precision / recall / accuracy of a checkpoint or an .npz of samples")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory: sample it at every --ar-steps value and score each (default: none)")
    src.add_argument("--npz", help="ADM-format samples (arr_0 uint8 NHWC, optional labels) to score (default: none)")
    e.add_argument("--data", default=None, help="reference data: digits or folder:PATH (default: the run's; --npz: digits)")
    e.add_argument("--n", type=int, default=2000, help="samples per inference setting (balanced classes)")
    e.add_argument("--ar-steps", default="1", help="S_eval value(s), comma separated, e.g. 1,2,4,8")
    add_order_args(e)
    e.add_argument("--sample-steps", type=int, default=250, help="DDPM steps per AR step")
    refuse(e, "--steps", STEPS_HINT)
    e.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--batch-size", type=int, default=500, help="images per sampling batch")
    e.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    e.add_argument("--inception", default=None, help="Inception-v3 weights file (the feature space for non-digits data)")
    e.add_argument("--ref", default=None, help="reference statistics .npz (mu, sigma[, features]); default: from --data")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="sampling: bf16 runs the model under autocast")
    e.add_argument("--compile", action="store_true", help="sample through torch.compile (see docs/performance.md)")
    e.add_argument("--no-progress", action="store_true", help="no sampling progress bars")
    e.add_argument("--vae-path", default=None, help="where a latent run's VAE weights are now (if moved); checked by sha256")
    e.add_argument("--json", default=None, help="also write the numbers as JSON (default: none)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("ablate", help="train + evaluate one of the paper's ablation suites; writes a Markdown report")
    b.add_argument("--suite", required=True, choices=list(SUITES) + ["multimodal"], help="which ablation to run (required)")
    b.add_argument("--data", default="digits", help="training and reference data (multimodal suite: shapes)")
    b.add_argument("--out", default="runs/ablate", help="the report goes to OUT/SUITE/report.md")
    budget = b.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=float, default=None, help="wall seconds for the whole suite (picks --steps; default: none)")
    budget.add_argument("--steps", type=int, default=None, help="training steps per config (default: none, give this or --budget)")
    b.add_argument("--configs", default=None, help="only these configs of the suite (comma separated names; default: all)")
    b.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    b.add_argument("--batch-size", type=int, default=64, help="default 64 (multimodal suite: 32)")
    b.add_argument("--lr", type=float, default=5e-4, help="default 5e-4 (multimodal suite: 1e-3)")
    b.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="training precision")
    b.add_argument("--depth", type=int, default=4, help="transformer layers of every config")
    b.add_argument("--hidden-size", type=int, default=128, help="width of every config")
    b.add_argument("--num-heads", type=int, default=4, help="attention heads of every config")
    b.add_argument("--prediction", default=None, choices=PREDICTIONS,
                   help="multimodal suite only: eps or v (default v; the class-conditional suites use eps, as the paper)")
    b.add_argument("--eval-n", type=int, default=500, help="samples per S_eval (multimodal suite: 256)")
    b.add_argument("--eval-sample-steps", type=int, default=50, help="DDPM steps per AR step of the evaluation samples")
    refuse(b, "--eval-steps", "--eval-steps: diffusion steps of the evaluation samples are --eval-sample-steps")
    b.add_argument("--eval-ar-steps", default=None, help="S_eval values, comma separated (default: the suite's, e.g. 1,2,4,8)")
    refuse(b, "--s-eval", "--s-eval: S_eval values are --eval-ar-steps")
    b.add_argument("--inception", default=None, help="Inception-v3 weights (data other than digits)")
    b.add_argument("--ref", default=None, help="reference statistics .npz (data other than digits)")
    b.add_argument("--no-progress", action="store_true", help="no training progress bars")
    refuse(b, "--progress", "--progress: progress bars are on unless --no-progress is given")
    b.set_defaults(func=cmd_ablate)

    r = sub.add_parser("probe", help="linear-probe accuracy of a checkpoint's pooled last-layer features (Tab. 6b)")
    r.add_argument("--ckpt", required=True, nargs="+", help="run directory (several to compare; required)")
    r.add_argument("--data", default=None, help="digits or folder:PATH (default: the run's data)")
    r.add_argument("--mode", default="t0", choices=["t0", "clean"],
                   help="t0: S=1 input with x_t = x_0 and t = 0 (default); clean: the clean-token path")
    r.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.set_defaults(func=cmd_probe)

