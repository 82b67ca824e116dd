"""`eval` (checkpoints and .npz files), in-loop evaluation during training, and the linear probe."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from causalfusion.cli import main
from causalfusion.data import load_digits_split
from causalfusion.evaluation import (EvalSetting, balanced_labels, evaluate_checkpoint, evaluate_npz, format_rows,
                                     load_samples_npz, make_extractor, reference_stats)
from causalfusion.probe import fit_probe, pooled_features, probe_checkpoint
from conftest import one_error_line

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "8", "--sample-every", "0",
        "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    # one digits classifier + reference for the whole session (test_ablation uses the same folder)
    path = tmp_path_factory.getbasetemp() / "causalfusion_eval_cache"
    path.mkdir(exist_ok=True)
    monkeypatch_module.setenv("CAUSALFUSION_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("eval_run")
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "4", *TINY]) == 0
    return out


def _digits_u8(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_split(split)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), y.numpy()


# ---------------------------------------------------------------- .npz files

def test_eval_npz_real_digits_one_line_per_metric(cache, tmp_path, capsys):
    images, labels = _digits_u8("test")
    path = tmp_path / "real.npz"
    np.savez(path, arr_0=images, labels=labels)
    assert main(["eval", "--npz", str(path), "--data", "digits"]) == 0
    out = dict(line.split(" ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert set(out) == {"FID", "IS", "precision", "recall", "accuracy", "samples"}
    # held-out real digits against the train split: close, precise, recognisable
    assert float(out["FID"]) < 5 and float(out["precision"]) > 0.8 and float(out["accuracy"]) > 0.9
    assert int(out["samples"]) == len(images)
    # unlabelled (unconditional) samples: no accuracy, everything else
    np.savez(path, arr_0=images[:50])
    assert "accuracy" not in evaluate_npz(path) and evaluate_npz(path)["fid"] > 0


def _bad_files(tmp_path):
    ok = np.zeros((6, 8, 8, 1), np.uint8)
    cases = {
        "shape": (dict(arr_0=np.zeros((6, 16, 16, 1), np.uint8)), "expected 8x8x1"),
        "channels_first": (dict(arr_0=np.zeros((6, 1, 8, 8), np.uint8)), "must be"),
        "labels_len": (dict(arr_0=ok, labels=np.zeros(5, np.int64)), "labels has shape"),
        "labels_range": (dict(arr_0=ok, labels=np.full(6, 12)), "labels must lie"),
        "missing_key": (dict(images=ok), "no 'arr_0'"),
        "float": (dict(arr_0=ok.astype(np.float32)), "uint8"),
    }
    out = {}
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        out[name] = (tmp_path / f"{name}.npz", msg)
    (tmp_path / "corrupt.npz").write_bytes(b"this is not a zip file at all")
    out["corrupt"] = (tmp_path / "corrupt.npz", "not an .npz")
    np.savez(tmp_path / "full.npz", arr_0=ok)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:60])
    out["truncated"] = (tmp_path / "truncated.npz", "not a readable")
    out["absent"] = (tmp_path / "absent.npz", "not found")
    return out


def test_eval_npz_bad_inputs_refused_with_one_line(cache, tmp_path, capsys):
    for name, (path, msg) in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=msg):
            load_samples_npz(path, (8, 8, 1), 10)
        assert main(["eval", "--npz", str(path), "--data", "digits"]) == 2, name
        line = one_error_line(capsys)
        assert line.startswith("causalfusion eval: error:") and msg in line, (name, line)


def test_eval_needs_inception_for_other_data(tmp_path):
    with pytest.raises(ValueError, match="--inception"):
        make_extractor("folder:" + str(tmp_path))


# ---------------------------------------------------------------- checkpoints

def test_reference_stats_cached(cache):
    ext = make_extractor("digits")
    first = reference_stats("digits", ext)
    files = list(cache.glob("digits_train_ref_*.npz"))
    assert len(files) == 1 and first.features.shape == (1437, 64)
    mtime = files[0].stat().st_mtime_ns
    again = reference_stats("digits", ext)
    assert files[0].stat().st_mtime_ns == mtime and np.allclose(again.mu, first.mu)
    from causalfusion.metrics import ReferenceStats, save_reference_stats

    save_reference_stats(ReferenceStats(first.mu * np.nan, first.sigma, first.features, first.extractor), files[0])
    assert np.allclose(reference_stats("digits", ext).mu, first.mu)  # a cached entry with NaNs is recomputed


def test_eval_checkpoint_table_per_setting(run_dir, capsys):
    rows = evaluate_checkpoint(run_dir, n=20, ar_steps=[1, 2], steps=3)
    assert [r["ar_steps"] for r in rows] == [1, 2]
    for r in rows:
        assert {"fid", "inception_score", "precision", "recall", "accuracy"} <= set(r) and r["num_samples"] == 20
        assert 0 <= r["accuracy"] <= 1 and r["fid"] > 0
    assert len(format_rows(rows).splitlines()) == 3
    assert main(["eval", "--ckpt", str(run_dir), "--n", "12", "--ar-steps", "1,4", "--sample-steps", "2",
                 "--order", "raster"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["S_eval", "order"] and [ln.split()[0] for ln in lines[1:]] == ["1", "4"]
    assert main(["eval", "--ckpt", str(run_dir), "--ar-steps", "17", "--n", "4", "--sample-steps", "2"]) == 2
    assert "1..16" in one_error_line(capsys)


def test_eval_row_keeps_sampling_precision_apart_from_the_precision_metric(run_dir, tmp_path, capsys):
    """The setting's fp32/bf16 and the precision/recall metric share a name: a reference without
    features (ADM's batches; docs/evaluation.md) has no metric, and the table used to crash on 'fp32'."""
    ref = reference_stats("digits", make_extractor("digits"))
    np.savez(tmp_path / "ref.npz", mu=ref.mu, sigma=ref.sigma)  # no features: no precision/recall
    rows = evaluate_checkpoint(run_dir, n=12, steps=2, ref=tmp_path / "ref.npz", precision="bf16")
    assert rows[0]["sample_precision"] == "bf16" and "precision" not in rows[0] and "recall" not in rows[0]
    assert format_rows(rows).splitlines()[1].split()[5:8] == [f"{rows[0]['fid']:.4g}", f"{rows[0]['inception_score']:.4g}", "-"]
    with_metric = evaluate_checkpoint(run_dir, n=12, steps=2)[0]
    assert with_metric["sample_precision"] == "fp32" and isinstance(with_metric["precision"], float)
    assert main(["eval", "--ckpt", str(run_dir), "--n", "12", "--sample-steps", "2", "--ref", str(tmp_path / "ref.npz")]) == 0


def test_samples_do_not_depend_on_the_evaluation_batch_size():
    """sample_uint8 seeds every sample by its global index: batches of 2 and of 4 give the same images."""
    from causalfusion.evaluation import sample_uint8
    from causalfusion.models import CausalFusion, ModelConfig

    torch.manual_seed(0)
    m = CausalFusion(ModelConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                                 num_classes=10, class_tokens=2)).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.1)  # a non-zero head, so the model (and its labels) shape the samples
    labels, st = torch.tensor([0, 1, 0, 1]), EvalSetting(ar_steps=2, steps=2)
    a = sample_uint8(m, labels, st, batch_size=2)
    assert np.array_equal(a, sample_uint8(m, labels, st, batch_size=4)) and not np.array_equal(a[0], a[2])


def test_balanced_labels():
    assert balanced_labels(13, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    assert EvalSetting(2, "raster", 10).label() == "S=2 raster T=10 cfg=1"


# ---------------------------------------------------------------- in-loop evaluation

def test_in_loop_eval_logged_and_training_unchanged(cache, tmp_path, capsys):
    plain, evald = tmp_path / "plain", tmp_path / "evald"
    assert main(["train", "--data", "digits", "--out", str(plain), "--steps", "5", *TINY]) == 0
    assert main(["train", "--data", "digits", "--out", str(evald), "--steps", "5", *TINY, "--eval-every", "2",
                 "--eval-n", "10", "--eval-ar-steps", "1,2", "--eval-sample-steps", "2"]) == 0
    rows = list(csv.DictReader(open(evald / "eval.csv")))
    assert [(r["step"], r["ar_steps"]) for r in rows] == [(s, k) for s in "245" for k in "12"]  # and the last step
    assert all(float(r["fid"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    # sampling draws from its own generators: the training stream (losses) is untouched
    strip = lambda p: [line.rsplit(",", 1)[0] for line in open(p / "log.csv")]  # drop it/s
    assert strip(plain) == strip(evald)
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "x"), "--steps", "2", *TINY,
                 "--eval-every", "-1"]) == 2
    assert "--eval-every" in one_error_line(capsys) and not (tmp_path / "x").exists()


def test_evaluation_samples_in_the_runs_training_order(cache, tmp_path):
    from causalfusion.ar_plan import ARPlanConfig
    from causalfusion.evaluation import EvalCallback
    from causalfusion.models import ModelConfig
    from causalfusion.trainer import Trainer, TrainConfig

    mc = ModelConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    cb = EvalCallback(every=1, n=4, ar_steps=[2], steps=1)
    Trainer(mc, ARPlanConfig(order="dilated", dilation=3),
            TrainConfig(out=str(tmp_path), steps=1, batch_size=4, sample_every=0, progress=False)).train(callbacks=[cb])
    assert [(h["order"], h["dilation"]) for h in cb.history] == [("dilated", 3)]
    rows = evaluate_checkpoint(tmp_path, n=4, ar_steps=[2], steps=1)
    assert [(r["order"], r["dilation"]) for r in rows] == [("dilated", 3)]
    rows = evaluate_checkpoint(tmp_path, n=4, ar_steps=[2], steps=1, order="block", block=1)
    assert [(r["order"], r["block"], r["dilation"]) for r in rows] == [("block", 1, 3)]


def test_grey_folder_run_resumes_probes_and_is_scored_at_its_size(cache, tmp_path, monkeypatch, capsys):
    """A 16px one-channel folder run: resume and probe read its images grey, and `eval` builds the
    reference from 16px grey images (not the folder default of 32px RGB)."""
    import causalfusion.evaluation as evaluation
    from causalfusion.metrics.extractor import FeatureExtractor
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    run, data = tmp_path / "run", f"folder:{tmp_path / 'img'}"
    assert main(["train", "--data", data, "--image-size", "16", "--channels", "1", "--out", str(run), "--steps", "2",
                 *TINY]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert main(["probe", "--ckpt", str(run)]) == 0 and "probe accuracy" in capsys.readouterr().out

    class Recorder(FeatureExtractor):
        name, num_features, num_classes = "recorder", 2, 2
        shapes: set = set()

        def _forward(self, x):
            self.shapes.add(tuple(x.shape[1:]))
            return x.flatten(1)[:, :2], x.flatten(1)[:, :2]

    monkeypatch.setattr(evaluation, "make_extractor", lambda *a, **k: Recorder())
    rows = evaluate_checkpoint(run, n=5, ar_steps=2, steps=1)  # an int S_eval is one setting
    assert [r["ar_steps"] for r in rows] == [2] and Recorder.shapes == {(1, 16, 16)}
    Recorder.shapes.clear()  # an .npz of such samples: the reference is read at the samples' size too
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8))
    evaluate_npz(tmp_path / "s.npz", data)
    assert Recorder.shapes == {(1, 16, 16)}


def test_eval_passes_vae_path_and_writes_json(run_dir, tmp_path, monkeypatch):
    import json

    import causalfusion.evaluation as evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda ckpt, **kw: seen.update(kw) or [{"ar_steps": 1}])
    monkeypatch.setattr(evaluation, "format_rows", lambda rows: "table")
    out = tmp_path / "rows.json"
    assert main(["eval", "--ckpt", str(run_dir), "--vae-path", "/moved/vae", "--json", str(out)]) == 0
    assert seen["vae_path"] == "/moved/vae" and json.loads(out.read_text()) == [{"ar_steps": 1}]


# ---------------------------------------------------------------- probe

def test_probe_tiny_checkpoint(run_dir, capsys):
    res = probe_checkpoint(run_dir)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n_test"] == 360 and res["feature_dim"] == 32
    assert res["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert 0.9 < res["pixel_accuracy"] <= 1.0
    assert main(["probe", "--ckpt", str(run_dir), str(run_dir), "--mode", "clean"]) == 0
    assert capsys.readouterr().out.count("probe accuracy") == 2


def test_probe_features_and_separable_case(run_dir):
    from causalfusion.checkpoint import load_model

    model = load_model(run_dir)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    f0, fc = pooled_features(model, x, "t0"), pooled_features(model, x, "clean")
    assert f0.shape == fc.shape == (6, 32) and not np.allclose(f0, fc)
    with pytest.raises(ValueError, match="probe mode"):
        pooled_features(model, x, "noisy")
    with pytest.raises(ValueError, match="takes 1x8x8"):
        pooled_features(model, torch.zeros(2, 3, 8, 8))
    # an easy, linearly separable case: all-dark vs all-bright images
    dark, bright = torch.full((40, 1, 8, 8), -0.9), torch.full((40, 1, 8, 8), 0.9)
    imgs = torch.cat([dark, bright]) + 0.05 * torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    feats, y = pooled_features(model, imgs), np.repeat([0, 1], 40)
    idx = np.random.default_rng(0).permutation(80)
    tr, te = idx[:60], idx[60:]
    assert fit_probe(feats[tr], y[tr], feats[te], y[te])["accuracy"] == 1.0


def test_adm_sample_file_labels_are_arr_1(tmp_path):
    """ADM's image_sample.py writes np.savez(path, images, labels): the labels are arr_1, not 'labels'."""
    images, labels = _digits_u8("test")
    np.savez(tmp_path / "adm.npz", images[:20], labels[:20])
    got_images, got_labels = load_samples_npz(tmp_path / "adm.npz", (8, 8, 1), 10)
    assert np.array_equal(got_images, images[:20]) and np.array_equal(got_labels, labels[:20])
    np.savez(tmp_path / "bad.npz", images[:20], labels[:19])
    with pytest.raises(ValueError, match=r"arr_1 \(labels\) has shape"):
        load_samples_npz(tmp_path / "bad.npz", (8, 8, 1), 10)
