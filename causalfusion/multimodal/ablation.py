"""Tab. 6a on ``shapes``: CausalFusion vs the Transfusion baseline, same data, model and budget.

Three runs with equal architecture, tokenizer, seed, steps and batches:

* CausalFusion: the AR plan of Sec. 5 (γ, λ) on images; image-first captions read the clean tokens.
* Transfusion, as the paper describes it: the standard diffusion loss on images (one AR step, full
  attention within the image, uniform loss weight: γ=0, λ=1), and captions that read the noised
  image tokens (``TextConfig.transfusion``).
* CausalFusion with noisy captions: CausalFusion's AR plan with Transfusion's caption context, so
  the caption difference can be told apart from the image objective.

Each run is evaluated on the ``test`` split (seen attribute combinations) and
the ``heldout`` split (unseen ones): T2I exact/object accuracy by the checker, FID on the small
shapes CNN, caption exact/attribute accuracy and CIDEr. Each run lives in
``<out>/_runs/<hash of its settings>/`` (``<out>/runs.json`` maps names to them; the step target is
not hashed): runs already trained to the step target are reused, shorter ones resumed, so an
interrupted suite continues, and a re-run with other settings trains new runs.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..ablation import check_budget, check_suite_counts, run_dir_for
from ..ar_plan import ARPlanConfig
from ..files import check_dir_path, write_json
from ..models import ModelConfig
from .objective import TRANSFUSION_IMAGE_PLAN, MixConfig

# name -> (captions read the noised image tokens, CausalFusion's AR plan on images)
RUNS = {"CausalFusion": (False, True), "Transfusion": (True, False), "CausalFusion, noisy captions": (True, True)}
PROMPTS = ["a red circle at the top left", "a blue triangle at the bottom right", "a yellow square in the top right corner",
           "a green triangle at the top left and a magenta circle at the bottom right",
           "a cyan square at the bottom left and a red square at the top right",
           "a red triangle at the bottom left"]  # the last one is a held-out (colour, shape) pair


@dataclass
class MMSuiteSettings:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    precision: str = "bf16"
    depth: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    patch_size: int = 4
    prediction: str = "v"  # eps (the paper's) leaves 16-px pixel T2I at chance in this budget (docs/multimodal.md)
    max_text_len: int = 20  # shapes captions are <= 18 BPE tokens + <bos>/<eos>; the paper's 35 would be pads
    gamma: float = 0.9
    image_first_prob: float = 0.1
    text_weight: float = 0.01
    seed: int = 0
    eval_n: int = 256
    eval_steps: int = 50
    cfg: float = 3.0
    progress: bool = False

    def validate(self) -> None:
        """One clear ValueError for counts no run can use, before anything is trained or written
        (--steps 0 failed at loading a run that was never trained, --eval-n 0 after training both)."""
        check_suite_counts(self.batch_size, self.eval_n, self.eval_steps, self.seed, self.steps)


def budget_steps(st: MMSuiteSettings, budget: float) -> int:
    """Training steps per run that fit ``budget`` wall seconds for the whole suite (about 10% kept
    for evaluation; at least 10), timed at ``st``'s settings."""
    check_budget(budget)  # (a negative budget used to train the minimum 10 steps anyway)
    st.validate()  # before the throwaway timing run
    return max(10, int(0.9 * budget / len(RUNS) / seconds_per_step(st)))


def run_plan(st: MMSuiteSettings, causalfusion_plan: bool) -> ARPlanConfig:
    """The image objective of a run: Sec. 5's AR plan, or plain diffusion (S=1, uniform weight)."""
    return ARPlanConfig(gamma=st.gamma) if causalfusion_plan else ARPlanConfig(**TRANSFUSION_IMAGE_PLAN)


def _model_config(st: MMSuiteSettings) -> ModelConfig:
    """The suite's image model: 16 px RGB shapes, no classes (the text is the condition)."""
    return ModelConfig(image_size=16, in_channels=3, patch_size=st.patch_size, depth=st.depth, hidden_size=st.hidden_size,
                       num_heads=st.num_heads, num_classes=0, class_tokens=1, prediction=st.prediction)


def run_signature(st: MMSuiteSettings, transfusion: bool, plan: ARPlanConfig) -> dict:
    """Every setting that shapes one suite run, as its config.json stores them, except the step
    target (with the warmup and checkpoint interval drawn from it): a shorter run is resumed. Its hash
    names the run's directory (``run_dir_for``, as in the class-conditional suites), so a re-run with
    other settings trains its own runs instead of reusing, and misreporting, the earlier ones."""
    sig = {"model": _model_config(st).to_dict(), "text": dict(max_text_len=st.max_text_len, transfusion=transfusion),
           "plan": asdict(plan), "mix": asdict(MixConfig(st.image_first_prob, st.text_weight)),
           "train": dict(data="shapes", batch_size=st.batch_size, lr=st.lr, precision=st.precision, seed=st.seed)}
    return json.loads(json.dumps(sig))  # as read back from config.json


def _train(st: MMSuiteSettings, name: str, out: Path, sig: dict, log) -> None:
    """Train (or continue) run ``name`` in ``out`` to ``st.steps``; a run already there is reused as it
    is, after checking it was trained with these settings (``run_signature``) and not beyond ``st.steps``."""
    from ..checkpoint import CheckpointError, read_config
    from .train import MMTrainConfig, MMTrainer

    state = out / "state.json"
    done = json.loads(state.read_text())["step"] if state.is_file() else 0
    if done:
        saved = read_config(out)
        differ = [k for k, v in sig.items() if {f: saved.get(k, {}).get(f) for f in v} != v]
        if differ:
            raise CheckpointError(f"{out} was trained with other {'/'.join(differ)} settings than this suite's {name} "
                                  f"run; use another --out")
        if done > st.steps:  # the report would name the wrong step count
            raise CheckpointError(f"{out} is trained to step {done}, beyond --steps {st.steps}; give --steps {done} "
                                  f"or another --out")
    if done >= st.steps:
        return
    tc = MMTrainConfig(**sig["train"], out=str(out), steps=st.steps, warmup=min(100, st.steps // 10),
                       ckpt_every=max(100, st.steps // 5), progress=st.progress)
    trainer = MMTrainer(ModelConfig.from_dict(sig["model"]), sig["text"], ARPlanConfig(**sig["plan"]),
                        MixConfig(**sig["mix"]), tc, resume=bool(done))
    log(f"training {name} in {out}: steps {trainer.step}..{st.steps}")
    trainer.train()


def _log(out: Path) -> tuple[list[int], list[float], list[float], float]:
    """(steps, image loss, text loss, training seconds) from a run's log.csv. ``it_per_s`` is the
    rate since the process started, so the last row's steps / rate is the training time of a run
    trained in one go (a resumed run: as if every step ran at the last process's rate)."""
    steps, img, txt, rate = [], [], [], 1.0
    with open(out / "log.csv") as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            img.append(float(row["image_loss"]))
            txt.append(float(row["text_loss"]))
            rate = max(float(row["it_per_s"]), 1e-9)
    return steps, img, txt, (steps[-1] if steps else 0) / rate


def _figure(path: Path, grids: dict[str, torch.Tensor], curves: dict[str, tuple], per_prompt: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..images import make_grid

    fig, axes = plt.subplots(1, len(grids) + 1, figsize=(5 * len(grids) + 5, 5.5))
    for ax, (name, imgs) in zip(axes, grids.items()):
        ax.imshow(make_grid(imgs, nrow=per_prompt, scale=4))
        ax.set_title(f"{name}: T2I, one row per prompt")
        ax.set_yticks([(i + 0.5) * (imgs.shape[-1] * 4 + 1) for i in range(len(PROMPTS))])
        ax.set_yticklabels([p if len(p) < 34 else p[:32] + "..." for p in PROMPTS], fontsize=7)
        ax.set_xticks([])
    ax = axes[-1]
    for name, (steps, img, txt) in curves.items():
        ax.plot(steps, txt, label=f"{name} caption CE")
        ax.plot(steps, img, "--", label=f"{name} image loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training losses (running means)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_suite(out_dir: str | Path, report: str | Path, settings: MMSuiteSettings | None = None,
              command: str = "causalfusion ablate --suite multimodal", log=print) -> Path:
    """Train the runs of ``RUNS``, evaluate them, write ``report`` (Markdown) and ``multimodal.png`` beside it."""
    from .evaluate import ShapesExtractor, evaluate_model
    from .generate import caption, text_to_image
    from .shapes import make_shapes, redraw
    from .train import load_multimodal

    st = settings or MMSuiteSettings()
    st.validate()
    out_dir, report = Path(out_dir), Path(report)
    check_dir_path(out_dir)
    check_dir_path(report.parent)
    extractor = ShapesExtractor(16)
    results, grids, curves, caps = {}, {}, {}, {}
    images, truths, _ = make_shapes("test", 6, 16, seed=0)
    from .evaluate import fid

    # FID references at this sample size: test images vs independent training images, and vs the
    # test images' own objects re-drawn (generated images follow the test prompts, so are paired too)
    test_images, _, test_objs = make_shapes("test", st.eval_n, 16)
    floor = (fid(test_images, make_shapes("train", st.eval_n, 16)[0], extractor),
             fid(test_images, redraw(test_objs, 16), extractor))
    runs = {}
    for name, (transfusion, causal_plan) in RUNS.items():
        sig = run_signature(st, transfusion, run_plan(st, causal_plan))
        run = runs[name] = run_dir_for(out_dir, sig)  # <out_dir>/_runs/<hash>
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "runs.json", {k: str(v) for k, v in runs.items()})  # name -> run directory
        _train(st, name, run, sig, log)
        model, tok = load_multimodal(run)
        *curve, train_s = _log(run)
        row = {"train_s": train_s}
        t0 = time.perf_counter()
        for split in ("test", "heldout"):
            m, _, _ = evaluate_model(model, tok, split, st.eval_n, cfg=st.cfg, steps=st.eval_steps, seed=st.seed,
                                     extractor=extractor)
            row.update({f"{split}/{k}": v for k, v in m.items()})
        row["eval_s"] = time.perf_counter() - t0
        results[name] = row
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        grids[name] = text_to_image(model, tok, [p for p in PROMPTS for _ in range(6)], cfg=st.cfg, steps=st.eval_steps,
                                    seed=st.seed)
        curves[name] = tuple(curve)
        caps[name] = caption(model, tok, images)
    png = report.parent / "multimodal.png"
    _figure(png, grids, curves, 6)
    (out_dir / "results.json").write_text(json.dumps({"settings": st.__dict__, "results": results}, indent=2))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(_markdown(st, results, caps, [c[0] for c in truths], png.name, command, floor))
    return report


def _markdown(st: MMSuiteSettings, res: dict, caps: dict, truths: list[str], png: str, command: str,
              fid_floor: tuple[float, float]) -> str:
    def f(name, key, pct=True):
        v = res[name][key]
        return f"{100 * v:.1f}" if pct else f"{v:.2f}"

    lines = [
        "# Multimodal CausalFusion vs Transfusion on `shapes` (paper Tab. 6a, small scale)", "",
        f"Command: `{command}`", "",
        f"All runs: {st.depth} layers x {st.hidden_size} wide x {st.num_heads} heads, 16x16 RGB images in "
        f"{st.patch_size}x{st.patch_size} patches (16 tokens), text slot {st.max_text_len}, BPE trained on the captions; "
        f"{st.prediction}-prediction; {st.steps} steps of batch {st.batch_size}, lr {st.lr}, {st.precision}, seed {st.seed}; "
        f"{100 * st.image_first_prob:.0f}% image-first sequences, text loss weight {st.text_weight}. "
        f"CausalFusion: images under the AR plan of Sec. 5 (gamma {st.gamma}, random order, lambda 2), captions read "
        f"the clean image tokens. Transfusion (as the paper describes it): the standard diffusion loss on images "
        f"(S=1, full attention within the image, uniform weight) and captions that read the noised image tokens. "
        f"CausalFusion, noisy captions: CausalFusion's images with Transfusion's captions, which separates the "
        f"two differences. "
        f"Evaluation: {st.eval_n} images per split, T2I with CFG {st.cfg}, S=1, {st.eval_steps} DDPM steps; "
        f"greedy captions.", "",
        "| model | T2I exact % (test / held-out) | T2I object % (test / held-out) | "
        "T2I colour@position % (test / held-out) | FID (test / held-out) | "
        "caption exact % (test / held-out) | caption attribute % (test / held-out) | CIDEr (test / held-out) | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in res:
        lines.append(
            f"| {name} | {f(name, 'test/t2i_exact')} / {f(name, 'heldout/t2i_exact')} | "
            f"{f(name, 'test/t2i_object')} / {f(name, 'heldout/t2i_object')} | "
            f"{f(name, 'test/t2i_colour_pos')} / {f(name, 'heldout/t2i_colour_pos')} | "
            f"{f(name, 'test/fid', False)} / {f(name, 'heldout/fid', False)} | "
            f"{f(name, 'test/caption_exact')} / {f(name, 'heldout/caption_exact')} | "
            f"{f(name, 'test/caption_attribute')} / {f(name, 'heldout/caption_attribute')} | "
            f"{f(name, 'test/cider', False)} / {f(name, 'heldout/cider', False)} | {res[name]['train_s'] / 60:.1f} |")
        lines.append(
            f"| {name}, prompt-shuffled baseline | {f(name, 'test/shuffled/t2i_exact')} / "
            f"{f(name, 'heldout/shuffled/t2i_exact')} | {f(name, 'test/shuffled/t2i_object')} / "
            f"{f(name, 'heldout/shuffled/t2i_object')} | {f(name, 'test/shuffled/t2i_colour_pos')} / "
            f"{f(name, 'heldout/shuffled/t2i_colour_pos')} | | | | | |")
    first = next(iter(res.values()))
    lines += [
        "| paper: Transfusion-L (ImageNet recaptioned, MSCOCO eval) | | | | FID-30k 8.1 | | | CIDEr 34.5 | |",
        "| paper: CausalFusion-L | | | | FID-30k 7.1 | | | CIDEr 47.9 | |", "",
        "The prompt-shuffled rows score each model's own generated images against another image's prompt: "
        "what generation that ignores the prompt would score.", "",
        f"Chance for the exact accuracies (a guesser that knows the object count): "
        f"{100 * first['test/chance_exact']:.2f}% (test), {100 * first['heldout/chance_exact']:.2f}% (held-out). "
        f"CIDEr is pycocoevalcap's CIDEr-D (x1; the paper's 47.9 is x100 on COCO), references = the 5 paraphrases. "
        f"FID is on the 64-d features of the small shapes CNN with {st.eval_n} samples, generated from the test "
        f"(held-out) images' captions and compared with those images. References: the test images vs as many "
        f"independent training images score {fid_floor[0]:.2f}; vs their own objects re-drawn with new jitter (a "
        f"perfect text-to-image model) {fid_floor[1]:.2f}. Generated sets are paired with their references in the "
        f"same way, so the second is the floor to compare with.", "",
        f"![T2I samples and losses]({png})", "",
        "Greedy captions of the first test images:", "",
        "| truth (one paraphrase) | " + " | ".join(caps) + " |", "|---|" + "---|" * len(caps),
    ]
    for i, t in enumerate(truths):
        lines.append(f"| {t} | " + " | ".join(c[i].replace("|", "\\|") or "(empty)" for c in caps.values()) + " |")
    return "\n".join(lines) + "\n"


def seconds_per_step(st: MMSuiteSettings, n: int = 3) -> float:
    """Wall seconds of one training step at these settings (timed on a throwaway run)."""
    import tempfile

    from .train import MMTrainConfig, MMTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = MMTrainer(_model_config(st), dict(max_text_len=st.max_text_len), ARPlanConfig(gamma=st.gamma), MixConfig(),
                       MMTrainConfig(data="shapes:train:512", out=tmp, batch_size=st.batch_size,
                                     precision=st.precision, progress=False))
        tr.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            tr.train_step()
        return (time.perf_counter() - t0) / n
