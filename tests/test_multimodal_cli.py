"""train-mm / t2i / caption / eval-mm end to end on a checkpoint trained here, and bad inputs."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")  # the `text` extra

from causalfusion.cli import main
from causalfusion.images import save_png, to_uint8
from causalfusion.multimodal import load_multimodal, make_shapes

TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--max-text-len", "24", "--batch-size", "8",
        "--no-progress", "--precision", "bf16"]
TINY_SETTINGS = dict(depth=1, hidden_size=32, num_heads=2, max_text_len=24, batch_size=8, progress=False, precision="bf16")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "run"
    assert main(["train-mm", "--data", "shapes:train:64", "--out", str(out), "--steps", "6", "--prediction", "v", *TINY]) == 0
    return out


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_train_mm_takes_adam_eps(tmp_path):
    from causalfusion.multimodal.run_config import train_mm_configs
    from causalfusion.multimodal.train import MMTrainer

    def opt_eps(out, **settings):
        trainer = MMTrainer(*train_mm_configs(out, data="shapes:train:8", **TINY_SETTINGS, **settings))
        return trainer.opt.param_groups[0]["eps"]

    assert opt_eps(tmp_path / "a") == 1e-8  # torch's default, as before the flag
    assert opt_eps(tmp_path / "b", adam_eps=1e-15) == 1e-15
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["adam_eps"] == 1e-15
    assert main(["train-mm", "--data", "shapes:train:8", "--out", str(tmp_path / "c"), "--steps", "1", *TINY]) == 0
    assert main(["train-mm", "--out", str(tmp_path / "c"), "--resume", "--steps", "2", "--adam-eps", "1e-15",
                 "--no-progress"]) == 0
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert state["param_groups"][0]["eps"] == 1e-15  # the resumed steps ran with it, not the saved 1e-8


def test_text_to_image_defaults_to_the_training_order(run):
    from causalfusion.multimodal import text_to_image

    model, tok = load_multimodal(run)
    assert model.trained_order == {"order": "random", "block": 4, "dilation": 2}
    model.trained_order = {"order": "dilated", "block": 4, "dilation": 3}  # as if trained so
    kw = dict(ar_steps=4, steps=2, cfg=1.0)
    dilated = text_to_image(model, tok, ["red circle"], order="dilated", dilation=3, **kw)
    assert torch.equal(text_to_image(model, tok, ["red circle"], **kw), dilated)
    assert not torch.equal(text_to_image(model, tok, ["red circle"], order="random", **kw), dilated)


def test_train_resume_t2i_caption_eval(run, tmp_path, capsys):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "multimodal" and (run / "tokenizer.json").is_file()
    assert cfg["model"]["prediction"] == "v"  # --prediction v reaches the config the samplers read
    assert main(["train-mm", "--out", str(run), "--resume", "--steps", "8", "--no-progress"]) == 0
    assert json.loads((run / "state.json").read_text())["step"] == 8
    grid = tmp_path / "grid.png"
    assert main(["t2i", "--ckpt", str(run), "--prompt", "a red circle at the top left", "--prompt", "a blue square",
                 "--n", "2", "--sample-steps", "3", "--ar-steps", "4", "--cfg", "2.0", "--cfg-interval", "0,700",
                 "--check-shapes", "--out", str(grid)]) == 0
    assert grid.is_file() and "checker:" in capsys.readouterr().out
    images, caps, _ = make_shapes("test", 2)
    paths = []
    for i in range(2):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        save_png(to_uint8(images[i:i + 1])[0], tmp_path / f"{i}.png")
    assert main(["caption", "--ckpt", str(run), *paths, "--temperature", "0.8", "--top-k", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["eval-mm", "--ckpt", str(run), "--n", "4", "--sample-steps", "2", "--ar-steps", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"t2i_exact", "caption_exact", "cider", "chance_exact"} <= set(metrics)
    model, tok = load_multimodal(run)
    assert model.text_cfg.vocab_size == tok.vocab_size and model.cfg.prediction == "v"


def test_bad_inputs_one_line(run, tmp_path, capsys):
    _one_line_error(capsys, ["t2i", "--ckpt", str(run), "--prompt", " "], "empty prompt")
    _one_line_error(capsys, ["t2i", "--ckpt", str(run), "--prompt", " ".join(["red"] * 30)], "at most 22")
    big = tmp_path / "big.png"
    save_png(to_uint8(make_shapes("test", 1, size=32)[0])[0], big)
    _one_line_error(capsys, ["caption", "--ckpt", str(run), "--image", str(big)], "captions 16x16")
    _one_line_error(capsys, ["caption", "--ckpt", str(run), "--image", str(tmp_path / "none.png")], "not found")
    _one_line_error(capsys, ["train-mm", "--data", "shapes:train:8", "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "tok.json"),
                             "--steps", "1", *TINY], "tokenizer file")
    (tmp_path / "junk.json").write_text("junk")
    _one_line_error(capsys, ["train-mm", "--data", "shapes:train:8", "--out", str(tmp_path / "y"), "--tokenizer", str(tmp_path / "junk.json"),
                             "--steps", "1", *TINY], "not a tokenizers JSON")
    _one_line_error(capsys, ["t2i", "--ckpt", str(tmp_path), "--prompt", "a red circle"], "config.json not found")
    _one_line_error(capsys, ["train-mm", "--out", str(run), "--steps", "1", *TINY], "--resume")
    (run / "tokenizer.json").rename(run / "tok.bak")
    try:
        _one_line_error(capsys, ["t2i", "--ckpt", str(run), "--prompt", "a red circle"], "tokenizer file")
    finally:
        (run / "tok.bak").rename(run / "tokenizer.json")


def test_ablate_suite_hook_and_report(tmp_path, capsys):
    from causalfusion.multimodal.ablation import MMSuiteSettings, _log, _markdown

    _one_line_error(capsys, ["ablate", "--suite", "multimodal", "--data", "folder:x", "--steps", "1",
                             "--out", str(tmp_path)], "shapes")
    _one_line_error(capsys, ["ablate", "--suite", "order", "--prediction", "v", "--steps", "1",
                             "--out", str(tmp_path)], "multimodal suite only")
    (tmp_path / "log.csv").write_text("step,loss,image_loss,text_loss,grad_norm,it_per_s\n"
                                      "25,1,0.9,5,1,2.5\n50,1,0.8,4,1,5.0\n")
    steps, img, txt, secs = _log(tmp_path)
    assert steps == [25, 50] and txt == [5.0, 4.0] and secs == pytest.approx(50 / 5.0)  # cumulative rate
    keys = ["t2i_exact", "t2i_object", "t2i_colour_pos", "fid", "caption_exact", "caption_attribute", "cider",
            "chance_exact", "shuffled/t2i_exact", "shuffled/t2i_object", "shuffled/t2i_colour_pos"]
    row = {f"{s}/{k}": 0.5 for s in ("test", "heldout") for k in keys} | {"train_s": 60.0}
    md = _markdown(MMSuiteSettings(), {"CausalFusion": row, "Transfusion": row},
                   {"CausalFusion": ["a | b"], "Transfusion": [""]}, ["truth"], "x.png", "cmd", (40.0, 3.0))
    assert "| CausalFusion | 50.0 / 50.0 |" in md and "a \\| b" in md and "(empty)" in md
    assert "v-prediction" in md  # the suite's default, and the report says so
    assert "score 40.00" in md and "perfect text-to-image model) 3.00" in md


def test_transfusion_trains_images_with_plain_diffusion(run, tmp_path, capsys):
    """Transfusion = the standard diffusion loss on images (S=1, weight 1) + captions on noised tokens;
    the suite refuses to reuse a run trained with another plan or caption context."""
    import torch

    from causalfusion.ar_plan import sample_plan
    from causalfusion.checkpoint import CheckpointError
    from causalfusion.multimodal.ablation import RUNS, MMSuiteSettings, _train, run_plan, run_signature
    from causalfusion.multimodal.run_config import train_mm_configs

    def plan_of(**settings):
        return train_mm_configs(str(tmp_path / "new"), **settings)[2]

    assert (plan_of(transfusion=True).gamma, plan_of(transfusion=True).lam) == (0.0, 1.0)
    assert (plan_of().gamma, plan_of().lam) == (0.9, 2.0)
    assert plan_of(transfusion=True, gamma=0.9).gamma == 0.9  # a given setting wins
    st = MMSuiteSettings()
    g = torch.Generator().manual_seed(0)
    tf = run_plan(st, RUNS["Transfusion"][1])
    plans = [sample_plan(tf, 4, (4, 4), 1000, g) for _ in range(20)]
    assert all(p.group_sizes == [16] and torch.all(p.weights == 1) for p in plans)
    cf = run_plan(st, RUNS["CausalFusion"][1])
    assert any(len(sample_plan(cf, 4, (4, 4), 1000, g).group_sizes) > 1 for _ in range(20))
    with pytest.raises(CheckpointError, match="other model/text/plan/train settings"):  # `run`: tiny, CausalFusion's plan
        _train(st, "Transfusion", run, run_signature(st, True, tf), print)


def test_bad_images_and_decoding_options_one_line(run, tmp_path, capsys):
    good, junk, cut = tmp_path / "ok.png", tmp_path / "junk.png", tmp_path / "cut.png"
    save_png(to_uint8(make_shapes("test", 1)[0])[0], good)
    junk.write_bytes(b"not an image")
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])  # a truncated PNG: OSError in PIL
    for bad in (junk, cut):
        _one_line_error(capsys, ["caption", "--ckpt", str(run), "--image", str(bad)], f"{bad.name} is not an image")
    for t in ("nan", "inf", "-1"):
        _one_line_error(capsys, ["caption", "--ckpt", str(run), "--image", str(good), "--temperature", t],
                        "temperature must be a finite number >= 0")
    _one_line_error(capsys, ["caption", "--ckpt", str(run), "--image", str(good), "--temperature", "1", "--top-k", "0"],
                    "--top-k must be >= 1")


def test_bad_sampling_options_one_line(run, tmp_path, capsys):
    from causalfusion.multimodal.evaluate import evaluate_model

    out = tmp_path / "grid.png"
    t2i = ["t2i", "--ckpt", str(run), "--prompt", "a red circle", "--n", "1", "--sample-steps", "1", "--out", str(out)]
    for cfg in ("nan", "inf", "-1"):  # NaN guidance used to write black images and exit 0
        _one_line_error(capsys, [*t2i, "--cfg", cfg], "CFG scale must be a finite number >= 0")
        _one_line_error(capsys, ["eval-mm", "--ckpt", str(run), "--n", "2", "--sample-steps", "1", "--cfg", cfg], "CFG scale")
    _one_line_error(capsys, [*t2i, "--sample-steps", "0"], "--sample-steps must be >= 1")
    _one_line_error(capsys, [*t2i, "--groups", "a,b"], "--groups expects comma-separated integers, got 'a,b'")
    assert not out.exists()
    for n in ("0", "-2"):
        _one_line_error(capsys, ["eval-mm", "--ckpt", str(run), "--n", n], "--n must be >= 1")
    _one_line_error(capsys, ["eval-mm", "--ckpt", str(run), "--sample-steps", "0"], "--sample-steps must be >= 1")
    with pytest.raises(ValueError, match="evaluation images must be >= 1"):
        evaluate_model(*load_multimodal(run), n=0)


def test_bad_training_inputs_write_nothing(tmp_path, capsys):
    import torch

    from causalfusion.multimodal import CaptionDataset, CaptionStream

    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "junk.png", "caption": "a red circle"}) + "\n")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    cases = [(["--data", "shapes:train:0"], "N must be >= 1"),  # CaptionStream.next would never fill a batch
             (["--data", "shapes:train:-2"], "N must be >= 1"),
             (["--data", f"jsonl:{tmp_path / 'bad.jsonl'}"], "bad.jsonl:1: image"),
             (["--data", f"jsonl:{tmp_path / 'blank.jsonl'}"], "holds no captioned images"),
             (["--ckpt-every", "0"], "--ckpt-every must be >= 1"),  # was a ZeroDivisionError after writing
             (["--steps", "0"], "--steps must be >= 1"), (["--steps", "-3"], "--steps must be >= 1"),
             (["--batch-size", "0"], "--batch-size must be >= 1"),
             (["--bpe-vocab", "0"], "--bpe-vocab must be >= 260"),
             (["--warmup", "-1"], "--warmup must be >= 0"),
             (["--ema-decay", "nan"], "--ema-decay must be in [0, 1)"),
             (["--adam-eps", "0"], "--adam-eps must be a finite number > 0")]
    for i, (flags, match) in enumerate(cases):
        out = tmp_path / f"run{i}"
        _one_line_error(capsys, ["train-mm", "--data", "shapes:train:8", "--out", str(out), "--steps", "1", *TINY, *flags],
                        match)
        assert not out.exists(), flags
    with pytest.raises(ValueError, match="holds no images"):
        CaptionStream(CaptionDataset("empty", torch.zeros(0, 3, 16, 16), []), torch.zeros(0, 4, dtype=torch.long),
                      torch.zeros(0, dtype=torch.long), 8, torch.Generator())


def test_resume_names_a_missing_config_section(run, tmp_path, capsys):
    cfg = json.loads((run / "config.json").read_text())
    for key in ("text", "model", "plan", "mix", "train"):
        out = tmp_path / key
        out.mkdir()
        text = json.dumps({k: v for k, v in cfg.items() if k != key})
        (out / "config.json").write_text(text)
        _one_line_error(capsys, ["train-mm", "--out", str(out), "--resume", "--steps", "9", "--no-progress"],
                        f"{out / 'config.json'} has no '{key}' section")
        assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == text


def test_resume_drops_log_rows_after_the_checkpoint(run, tmp_path, capsys):
    """A run killed between checkpoints logged steps it trains again: they are not logged twice;
    resuming to an earlier step is refused."""
    import shutil

    out = shutil.copytree(run, tmp_path / "run")
    step = json.loads((out / "state.json").read_text())["step"]
    log = out / "log.csv"
    log.write_text(log.read_text() + f"{step + 1},9.99999,9.99999,9.9999,1.000,1.00\n")  # logged, never checkpointed
    assert main(["train-mm", "--out", str(out), "--resume", "--steps", str(step + 1), "--no-progress"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["train-mm", "--out", str(out), "--resume", "--steps", str(step), "--no-progress"],
                    f"already at step {step + 1}")  # training cannot go back
    rows = [ln.split(",") for ln in log.read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == step + 1
    assert rows[-1][1] != "9.99999"


def test_resume_is_bit_identical(tmp_path):
    """2 steps + resume to 4 give the same weights, EMA and optimizer state as 4 steps straight."""
    from safetensors.torch import load_file

    args = ["--data", "shapes:train:32", *TINY]
    assert main(["train-mm", "--out", str(tmp_path / "a"), "--steps", "4", *args]) == 0
    assert main(["train-mm", "--out", str(tmp_path / "b"), "--steps", "2", *args]) == 0
    assert main(["train-mm", "--out", str(tmp_path / "b"), "--resume", "--steps", "4", "--no-progress"]) == 0
    from causalfusion.checkpoint import part_path, read_state

    for name in ("model", "ema", "train"):
        a, b = (load_file(str(part_path(tmp_path / r, read_state(tmp_path / r), name))) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_keeps_the_saved_config_and_takes_given_training_flags(tmp_path, capsys):
    """train-mm --resume: explicit training flags win, explicit model flags that differ are refused
    (they were silently ignored), and --steps left out is the run's target (was the flag's 2000)."""
    from causalfusion.multimodal.run_config import train_mm_configs
    from causalfusion.multimodal.train import MMTrainer

    out = tmp_path / "run"
    tr = MMTrainer(*train_mm_configs(str(out), data="shapes:train:32", steps=3, lr=1e-3, warmup=1, **TINY_SETTINGS))
    tr.train_step()
    tr.save()  # a run stopped at step 1 of 3
    config = (out / "config.json").read_text()
    resume = ["train-mm", "--out", str(out), "--resume", "--no-progress"]
    _one_line_error(capsys, [*resume, "--lr", "0.05", "--depth", "4", "--prediction", "v"],
                    "model config differs from the checkpoint's (saved, given): {'depth': (1, 4), 'prediction': ('eps', 'v')}")
    _one_line_error(capsys, [*resume, "--gamma", "0.5"], "plan config differs")
    _one_line_error(capsys, [*resume, "--max-text-len", "30"], "text config differs")
    _one_line_error(capsys, [*resume, "--seed", "3"], "data config differs")  # the seed draws the shapes images
    assert (out / "config.json").read_text() == config and json.loads((out / "state.json").read_text())["step"] == 1
    assert main([*resume, "--lr", "0.05", "--batch-size", "16", "--precision", "fp32", "--depth", "1"]) == 0  # same depth: fine
    saved = json.loads((out / "config.json").read_text())
    assert json.loads((out / "state.json").read_text())["step"] == 3  # the saved target, not --steps' default
    assert saved["model"]["depth"] == 1 and saved["text"]["max_text_len"] == 24
    assert {k: saved["train"][k] for k in ("lr", "batch_size", "precision", "warmup", "steps")} == \
        {"lr": 0.05, "batch_size": 16, "precision": "fp32", "warmup": 1, "steps": 3}  # the next resume starts from these


def test_ablate_multimodal_rerun_with_other_settings_trains_its_own_runs(tmp_path, monkeypatch):
    """A re-run with other settings reported them over the earlier runs (each run's directory is now
    named by a hash of its settings); an existing run is checked against them and the step target."""
    from causalfusion.checkpoint import CheckpointError
    from causalfusion.multimodal.ablation import MMSuiteSettings, _train, run_plan, run_signature
    from causalfusion.multimodal.evaluate import ShapesNet

    monkeypatch.setenv("CAUSALFUSION_CACHE", str(tmp_path / "cache"))  # an untrained FID net: fast, not cached for others
    monkeypatch.setattr("causalfusion.multimodal.evaluate.train_shapes_net", lambda size=16: ShapesNet(size))
    cmd = ["ablate", "--suite", "multimodal", "--steps", "2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
           "--batch-size", "4", "--precision", "fp32", "--eval-n", "4", "--eval-sample-steps", "1", "--out", str(tmp_path)]
    assert main(cmd) == 0
    first = json.loads((tmp_path / "multimodal" / "runs.json").read_text())
    assert main([*cmd, "--hidden-size", "64", "--prediction", "eps", "--lr", "0.01", "--seed", "5"]) == 0
    runs = json.loads((tmp_path / "multimodal" / "runs.json").read_text())
    assert set(runs) == set(first) and not set(runs.values()) & set(first.values())
    for path in runs.values():
        cfg = json.loads((Path(path) / "config.json").read_text())
        assert (cfg["model"]["hidden_size"], cfg["model"]["prediction"]) == (64, "eps")
        assert (cfg["train"]["lr"], cfg["train"]["seed"], cfg["train"]["batch_size"]) == (0.01, 5, 4)
    assert "1 layers x 64 wide" in (tmp_path / "multimodal" / "report.md").read_text()
    st = MMSuiteSettings(steps=2, depth=1, hidden_size=32, num_heads=2, batch_size=4, precision="fp32")
    sig, run = run_signature(st, False, run_plan(st, True)), Path(first["CausalFusion"])
    _train(st, "CausalFusion", run, sig, print)  # trained with these settings: reused
    with pytest.raises(CheckpointError, match="other train settings"):
        _train(st, "CausalFusion", run, run_signature(replace(st, seed=1), False, run_plan(st, True)), print)
    with pytest.raises(CheckpointError, match="trained to step 2, beyond --steps 1"):
        _train(replace(st, steps=1), "CausalFusion", run, sig, print)


def test_ablate_multimodal_defaults_are_the_suites_own(tmp_path, monkeypatch, capsys):
    """--batch-size/--lr/--eval-n left out: MMSuiteSettings' 32, 1e-3 and 256 (the ablate flags' 64, 5e-4
    and 500 replaced them)."""
    import causalfusion.multimodal.ablation as mm_ablation

    seen = []

    def fake_suite(out_dir, report, st, command, log):
        seen.append(st)
        return Path(report)

    monkeypatch.setattr(mm_ablation, "run_suite", fake_suite)
    cmd = ["ablate", "--suite", "multimodal", "--steps", "1", "--out", str(tmp_path)]
    assert main(cmd) == 0 and main([*cmd, "--batch-size", "64", "--lr", "5e-4", "--eval-n", "500"]) == 0
    defaults = mm_ablation.MMSuiteSettings()
    assert (seen[0].batch_size, seen[0].lr, seen[0].eval_n) == (defaults.batch_size, defaults.lr, defaults.eval_n)
    assert (defaults.batch_size, defaults.lr, defaults.eval_n) == (32, 1e-3, 256)
    assert (seen[1].batch_size, seen[1].lr, seen[1].eval_n) == (64, 5e-4, 500)  # given: used, even if the flag default


def test_t2i_sample_steps_default_matches_text_to_image_and_eval_mm():
    import inspect

    from causalfusion.cli import build_parser
    from causalfusion.multimodal import text_to_image

    p = build_parser()
    t2i = p.parse_args(["t2i", "--ckpt", "x", "--prompt", "a red circle"]).sample_steps
    assert t2i == p.parse_args(["eval-mm", "--ckpt", "x"]).sample_steps == inspect.signature(text_to_image).parameters["steps"].default == 50


def test_caption_takes_several_images_per_flag(run, tmp_path, capsys):
    paths = []
    for i, img in enumerate(make_shapes("test", 3)[0]):
        paths.append(str(tmp_path / f"{i}.png"))
        save_png(to_uint8(img[None])[0], paths[-1])
    assert main(["caption", "--ckpt", str(run), "--image", paths[0], paths[1], "--image", paths[2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == paths


def test_sampling_commands_take_a_checked_device(run, tmp_path, capsys):
    img = tmp_path / "in.png"
    save_png(to_uint8(make_shapes("test", 1)[0])[0], img)
    out = tmp_path / "grid.png"
    cmds = [["t2i", "--ckpt", str(run), "--prompt", "a red circle", "--n", "1", "--sample-steps", "1", "--out", str(out)],
            ["caption", "--ckpt", str(run), "--image", str(img)], ["eval-mm", "--ckpt", str(run), "--n", "1", "--sample-steps", "1"]]
    for cmd in cmds:
        _one_line_error(capsys, [*cmd, "--device", "nope"], "unknown device 'nope'")
        _one_line_error(capsys, [*cmd, "--device", "cuda:99"], "device 'cuda:99'")
    assert not out.exists()
    assert main([*cmds[0], "--device", "cpu"]) == 0 and out.is_file()


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(tmp_path):
    """Checkpoint at step 20, a log row every 25: the loss sums of steps 1-20 travel in the checkpoint."""
    import csv

    args = ["--data", "shapes:train:16", *TINY]
    assert main(["train-mm", "--out", str(tmp_path / "a"), "--steps", "30", *args]) == 0
    assert main(["train-mm", "--out", str(tmp_path / "b"), "--steps", "20", *args]) == 0
    assert main(["train-mm", "--out", str(tmp_path / "b"), "--resume", "--steps", "30", "--no-progress"]) == 0

    def rows(run):  # every column but it/s, a timing
        with open(tmp_path / run / "log.csv") as f:
            return [r[:-1] for r in csv.reader(f)]

    assert [r[0] for r in rows("a")] == ["step", "25", "30"]
    # run b also holds the row its first invocation wrote when it ended at step 20
    assert [r for r in rows("b") if r[0] != "20"] == rows("a")
