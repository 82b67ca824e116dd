"""The Markdown report and the FID-vs-S_eval plot of an ablation suite (see ``ablation.py``)."""
from __future__ import annotations

import hashlib
import math
import subprocess
from pathlib import Path

from .files import atomic_path, write_text

PACKAGE_DIR = Path(__file__).resolve().parent


def git_state(cwd: Path = PACKAGE_DIR) -> str:
    """``<commit>`` or ``<commit> (dirty)`` of the repository holding the package; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (dirty)" if dirty else head


def source_digest(root: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the package's .py files (path + content): identifies the code even in a dirty tree."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _table(rows: list[str], cols: list[str], cell) -> list[str]:
    out = ["| training config | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        out.append(f"| {r} | " + " | ".join(cell(r, c) for c in cols) + " |")
    return out


def metric_table(results: list[dict], s_eval, metric: str, spec: str, best=min) -> list[str]:
    """Rows = training configs, columns = S_eval; the best value of each column in bold."""
    val = {(res["label"], r["ar_steps"]): r.get(metric) for res in results for r in res["rows"]}
    bests = {}
    for s in s_eval:
        vals = [val.get((res["label"], s)) for res in results]
        # NaN out: min/max against a NaN depend on the order (min([nan, 3.0]) is nan), so a
        # diverged config listed first left the column with no bold at all
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        bests[s] = best(vals) if vals and len(results) > 1 else None

    def cell(label, s):
        v = val.get((label, s))
        txt = _fmt(v, spec)
        return f"**{txt}**" if v is not None and v == bests[s] else txt

    cols = [f"S_eval={s}" for s in s_eval]
    return _table([res["label"] for res in results], cols, lambda lab, c: cell(lab, int(c.split("=")[1])))


def paper_table(suite, results: list[dict]) -> list[str]:
    labels = {res["name"]: res["label"] for res in results}
    cfgs = [c for c in suite.configs if c.name in labels and c.paper]
    if not cfgs:
        return []
    cols = [f"S_eval={s}" for s in suite.paper_s_eval]
    paper = {c.label: c.paper for c in cfgs}
    return _table([c.label for c in cfgs], cols, lambda lab, c: _fmt(paper[lab][cols.index(c)]))


def plot_fid(results: list[dict], s_eval, path: Path, title: str) -> None:
    """FID vs S_eval, one line per training config (log-scaled axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    if len(s_eval) == 1:
        labels = [res["label"] for res in results]
        fids = [res["rows"][0]["fid"] for res in results]
        ax.barh(range(len(labels)), fids, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(f"FID (S_eval={s_eval[0]}, lower is better)")
    else:
        for res in results:
            xs = [r["ar_steps"] for r in res["rows"]]
            ax.plot(xs, [r["fid"] for r in res["rows"]], marker="o", label=res["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(s_eval), [str(s) for s in s_eval])
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("S_eval (AR steps at inference)")
        ax.set_ylabel("FID (digits features, lower is better)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, ".tmp.png") as tmp:  # savefig picks the format from the extension
        fig.savefig(tmp)
    plt.close(fig)


def training_code(results: list[dict], digest: str) -> str:
    """The report line saying which source digest trained each config (a reused run keeps its own)."""
    labels_by_digest: dict[str, list[str]] = {}
    for r in results:
        digests = [c["source_digest"] for c in r.get("code_history", [r.get("code", {})]) if "source_digest" in c]
        key = "+".join(dict.fromkeys(digests)) or "not recorded"  # a resumed run may name two
        labels_by_digest.setdefault(key, []).append(r["label"])
    if list(labels_by_digest) == [digest]:
        return "- training code: every config was trained by the source digest above"
    return ("- training code (reused runs keep their own; their numbers need not reproduce with the digest above): "
            + "; ".join(f"`{d}`: {', '.join(labels)}" for d, labels in labels_by_digest.items()))


def write_report(out: Path, suite, st, results: list[dict], steps: int, s_eval, calib: dict, wall: float,
                 command: str | None, mc, extractor, code: tuple[str, str] | None = None,
                 history: list[dict] | None = None) -> Path:
    """``code``: (git state, source digest) taken when the suite started (default: now); ``history``:
    the suite's invocations so far (``suite.json``), the last one being this."""
    commit, digest = code or (git_state(), source_digest())
    png = out / f"{suite.name}.png"
    plot_fid(results, s_eval, png, f"{suite.table} on {st.data}: FID vs S_eval ({steps} steps/config)")
    train_s = sum(r["train_seconds"] for r in results)
    eval_s = sum(r["eval_seconds"] for r in results)
    warm = st.warmup if st.warmup is not None else max(1, min(100, steps // 10))
    budget = (f"{steps} training steps per config (chosen from --budget {st.budget:g} s for the suite)"
              if st.budget is not None else f"{steps} training steps per config (--steps)")
    div = [f"{r['label']}: batch {st.batch_size // c.batch_div}" for c in suite.configs for r in results
           if r["name"] == c.name and c.batch_div > 1]
    ref_desc = (f"the digits train split ({extractor.name}, 64-d penultimate features)" if st.data == "digits"
                and st.ref is None else (st.ref or f"{st.data} ({extractor.name})"))
    lines = [
        f"# Ablation `{suite.name}`: {suite.title} (paper {suite.table}, small-scale reproduction)", "",
        f"- command: `{command or 'run_suite(' + repr(suite.name) + ')'}`",
        f"- commit: `{commit}`; package source digest `{digest}` (sha256 of causalfusion/**/*.py at the start)",
        f"- seed: {st.seed} (weights, batches, AR plans and noise; sampling seed {st.seed})",
        f"- budget: {budget}, batch {st.batch_size}" + (f" ({'; '.join(div)})" if div else "") + ", equal for all configs",
        f"- model: {mc.depth} layers x {mc.hidden_size} wide x {mc.num_heads} heads, "
        f"{results[0]['params'] / 1e6:.2f}M params, {mc.num_tokens} tokens ({mc.image_size}x{mc.image_size}x"
        f"{mc.in_channels}, patch {mc.patch_size}), {mc.num_cond} class tokens; AdamW lr {st.lr:g}, warmup {warm}, "
        f"EMA {st.ema_decay}, {st.precision}; data `{st.data}`",
        f"- evaluation: EMA weights, {st.eval_n} samples per S_eval (balanced classes), DDPM {st.eval_steps} steps "
        f"per AR step, no CFG, equal-size groups; FID / precision / recall / accuracy against {ref_desc}",
        f"- compute: training {train_s:.0f} s, evaluation {eval_s:.0f} s (summed over the configs' runs)",
        training_code(results, digest),
    ]
    if history and len(history) > 1:  # the report's numbers may come from runs of several invocations
        lines.append(f"- invocations that trained these runs: " + "; ".join(f"`{h.get('command')}`" for h in history[:-1]))
    if "seconds_per_step" in calib:
        sps = calib["seconds_per_step"]
        lines.append(f"- calibration (--budget): {min(sps.values()):.3f}-{max(sps.values()):.3f} s per training step, "
                     f"~{sum(calib['eval_seconds'].values()):.0f} s of evaluation in all (measured before training)")
    if suite.note:
        lines.append(f"- settings: {suite.note}")
    lines += ["", "## FID (lower is better)", ""]
    lines += metric_table(results, s_eval, "fid", ".2f", min)
    lines += ["", f"![FID vs S_eval]({png.name})", "", "## Class accuracy of the digits classifier (higher is better)", ""]
    lines += metric_table(results, s_eval, "accuracy", ".3f", max)
    lines += ["", "## Precision / recall (k=3)", ""]
    val = {(res["label"], r["ar_steps"]): r for res in results for r in res["rows"]}
    lines += _table([res["label"] for res in results], [f"S_eval={s}" for s in s_eval],
                    lambda lab, c: "{} / {}".format(_fmt(val[(lab, int(c.split('=')[1]))].get("precision")),
                                                    _fmt(val[(lab, int(c.split('=')[1]))].get("recall"))))
    lines += ["", "## Inception Score of the digits classifier (max 10)", ""]
    lines += metric_table(results, s_eval, "inception_score", ".2f", max)
    lines += ["", "## Training", "", "| training config | final train loss | train s | eval s | resumed from step | run |",
              "|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {_fmt(r['final_loss'], '.4f')} | {r['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} | {r['resumed_from']} | `{Path(r.get('run_dir', '?')).name}` |")
    lines.append("")
    lines.append("Final train loss: mean of the last 10% of logged losses (AR-weighted when λ > 1, so only "
                 "comparable between configs with the same λ).")
    paper = paper_table(suite, results)
    if paper:
        lines += ["", f"## The paper's numbers (ImageNet 256, FID-10k, {suite.table}) for comparison", ""] + paper
    lines.append("")
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
