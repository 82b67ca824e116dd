"""Metrics: closed-form checks of FID / IS / precision-recall, the digits classifier and its cache,
the Inception-v3 extractor with random weights in the documented file format, and ``evaluate``."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causalfusion.metrics import (DigitsExtractor, InceptionExtractor, InceptionV3, ReferenceStats, class_accuracy,
                                  compute_reference_stats, evaluate, fid_from_features, frechet_distance,
                                  gaussian_stats, inception_score, knn_radii, load_inception_weights,
                                  load_reference_stats, precision_recall, reference_from_features,
                                  save_reference_stats, to_nchw_float)
from causalfusion.metrics import digits as digits_mod
from causalfusion.metrics.inception import FID_WEIGHTS_NAME


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ---------------------------------------------------------------- FID

def test_fid_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))  # 5 + (4 + 1 + 0)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(10.0)


def test_fid_closed_form_scaled_full_covariance():
    # S2 = c^2 S1 (not diagonal): Tr(S1 + c^2 S1 - 2 c S1) = (1 - c)^2 Tr(S1)
    rng = np.random.default_rng(0)
    s1, c = _random_spd(6, rng), 3.0
    mu = rng.standard_normal(6)
    got = frechet_distance(mu, s1, mu + 0.5, c * c * s1)
    assert got == pytest.approx(6 * 0.25 + (1 - c) ** 2 * np.trace(s1), rel=1e-8)


def test_fid_matches_eigenvalue_formula():
    # independent route: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric PSD
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(10, rng), _random_spd(10, rng)
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(10), s1, np.zeros(10), s2) == pytest.approx(expected, rel=1e-8)


def test_fid_identical_zero_and_grows_with_mean_shift():
    x = np.random.default_rng(2).standard_normal((400, 8))
    assert abs(fid_from_features(x, x)) < 1e-6
    fids = [fid_from_features(x, x + d) for d in (0.1, 0.5, 1.0, 2.0)]
    # a pure shift leaves the covariance alone, so FID = |shift|^2 = 8 d^2 exactly
    np.testing.assert_allclose(fids, [8 * d * d for d in (0.1, 0.5, 1.0, 2.0)], rtol=1e-6, atol=1e-6)


def test_fid_sample_estimate_near_population_value():
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(4, rng), _random_spd(4, rng)
    a = rng.multivariate_normal(np.zeros(4), s1, size=20000)
    b = rng.multivariate_normal(np.ones(4), s2, size=20000)
    exact = frechet_distance(np.zeros(4), s1, np.ones(4), s2)
    assert fid_from_features(a, b) == pytest.approx(exact, rel=0.05)


def test_fid_agrees_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        num_features = 5

        def forward(self, x):
            return x

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((200, 5)) * 1.5 + 0.3
    metric = tm.FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert fid_from_features(a, b) == pytest.approx(float(metric.compute()), rel=1e-6)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_bounds():
    k = 10
    uniform = np.full((50, k), 1.0 / k)
    assert inception_score(uniform, splits=5, from_logits=False)[0] == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(100) % k]  # confident and balanced over classes
    mean, std = inception_score(one_hot, splits=10, from_logits=False)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    # same thing from (very confident) logits
    assert inception_score(one_hot * 50.0, splits=1)[0] == pytest.approx(k, rel=1e-6)
    logits = np.random.default_rng(5).standard_normal((200, k)) * 3
    mean, _ = inception_score(logits, splits=4)
    assert 1.0 < mean < k
    with pytest.raises(ValueError):
        inception_score(logits, splits=500)
    with pytest.raises(ValueError):
        inception_score(np.ones((4, 3)), splits=1, from_logits=False)  # rows do not sum to 1


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # torchmetrics' std over a single split
def test_inception_score_agrees_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.image.inception")
    logits = torch.from_numpy(np.random.default_rng(6).standard_normal((64, 7)) * 2)
    with pytest.warns(UserWarning):  # torchmetrics warns that it buffers all features
        metric = tm.InceptionScore(feature=torch.nn.Identity(), splits=1)
    metric.update(logits)
    assert inception_score(logits.numpy(), splits=1)[0] == pytest.approx(float(metric.compute()[0]), rel=1e-6)


# ---------------------------------------------------------------- precision / recall, accuracy

def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(7).standard_normal((120, 6))
    assert precision_recall(x, x, k=3, batch_size=32) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3, batch_size=32) == (0.0, 0.0)
    # half the generated samples on the real manifold, half far away
    fake = np.concatenate([x[:60], x[:60] + 100.0])
    precision, recall = precision_recall(x, fake, k=3)
    assert precision == pytest.approx(0.5)
    assert 0.0 < recall < 1.0  # only the real points near the kept half are covered


def test_knn_radii_blocked_matches_brute_force():
    x = np.random.default_rng(8).standard_normal((50, 4))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d2, axis=1)[:, 3]  # column 0 is the point itself
    for bs in (7, 64):  # blocks smaller and larger than N must agree
        np.testing.assert_allclose(knn_radii(x, k=3, batch_size=bs).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        class_accuracy(logits, torch.tensor([0, 1, 2, 1]))  # label 2 for a 2-class classifier


def test_to_nchw_float_layouts():
    u8 = np.random.default_rng(9).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    x = to_nchw_float(u8, layout="auto")
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError):
        to_nchw_float(np.zeros((2, 3, 5, 3), np.float32), layout="auto")  # ambiguous channel axis


# ---------------------------------------------------------------- digits classifier

@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def digits_ext(digits_cache) -> DigitsExtractor:
    return DigitsExtractor(cache_dir=digits_cache)


def test_digits_classifier_accuracy_and_cache(digits_ext, digits_cache):
    assert digits_ext.trained_now
    x_te, y_te = digits_mod._load_digits_split("test")
    feats, logits = digits_ext.features_and_logits(x_te)
    assert feats.shape == (len(x_te), 64) and logits.shape == (len(x_te), 10)
    acc = class_accuracy(logits, y_te)
    assert acc >= 0.90
    assert digits_ext.meta["test_accuracy"] == pytest.approx(acc, abs=1e-6)

    weights = digits_cache / "digits_cnn_v1.safetensors"
    mtime = os.stat(weights).st_mtime_ns
    again = DigitsExtractor(cache_dir=digits_cache)
    assert not again.trained_now and os.stat(weights).st_mtime_ns == mtime
    assert again.name == digits_ext.name
    torch.testing.assert_close(again.logits(x_te[:20]), logits[:20])


def test_digits_corrupt_cache_retrains(tmp_path, monkeypatch):
    calls = []

    def fake_train(device="cpu"):  # stands in for the real (seconds-long) training
        calls.append(1)
        return digits_mod.DigitsNet(**digits_mod.ARCH).eval(), {"format": digits_mod.FORMAT_VERSION,
                                                                  "arch": digits_mod.ARCH, "train": digits_mod.TRAIN}

    monkeypatch.setattr(digits_mod, "train_digits_classifier", fake_train)
    digits_mod.load_digits_classifier(tmp_path)
    assert digits_mod.load_digits_classifier(tmp_path)[2] is False and len(calls) == 1
    (tmp_path / "digits_cnn_v1.safetensors").write_bytes(b"garbage")
    assert digits_mod.load_digits_classifier(tmp_path)[2] is True and len(calls) == 2


def test_evaluate_digits_end_to_end(digits_ext, tmp_path):
    x_te, y_te = digits_mod._load_digits_split("test")
    ref_path = tmp_path / "digits_ref.npz"
    save_reference_stats(compute_reference_stats(x_te, digits_ext), ref_path)
    ref = load_reference_stats(ref_path)
    assert ref.extractor == digits_ext.name and ref.features.shape == (len(x_te), 64)

    # the reference set itself, as an ADM-style uint8 NHWC batch: FID ~ 0, P = R = 1 up to quantisation
    u8 = ((x_te + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    m = evaluate(u8, y_te.numpy(), digits_ext, ref_path)
    assert m["fid"] < 1.0 and m["precision"] > 0.95 and m["recall"] > 0.95
    assert m["accuracy"] >= 0.9 and m["inception_score"] > 5.0
    noise = torch.rand(200, 1, 8, 8) * 2 - 1
    bad = evaluate(noise, None, digits_ext, ref)
    assert bad["fid"] > 20 * max(m["fid"], 1.0) and bad["precision"] < 0.5 and "accuracy" not in bad

    # ADM reference files carry only mu/sigma (+ images): precision/recall are skipped, FID agrees
    adm_path = tmp_path / "adm_ref.npz"
    np.savez(adm_path, mu=ref.mu, sigma=ref.sigma, arr_0=u8)
    m_adm = evaluate(u8, None, digits_ext, adm_path)
    assert "precision" not in m_adm and m_adm["fid"] == pytest.approx(m["fid"])
    with pytest.raises(ValueError, match="computed with"):
        evaluate(u8, None, digits_ext, ReferenceStats(ref.mu, ref.sigma, None, "inception-v3-fid"))


def test_reference_keep_features_caps_rows_only():
    x = np.random.default_rng(10).standard_normal((100, 3))
    ref = reference_from_features(x, "ext", keep_features=30)
    assert ref.features.shape == (30, 3)
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(ref.mu, mu)
    np.testing.assert_allclose(ref.sigma, sigma)


# ---------------------------------------------------------------- Inception-v3 extractor

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random weights saved exactly like the real file: torch.save of a flat state dict, 1008 classes."""
    torch.manual_seed(0)
    state = InceptionV3(num_classes=1008, variant="fid").state_dict()
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
    torch.save(state, path)
    return path, state


def test_inception_extractor_shapes_and_resize(fid_weights):
    path, _ = fid_weights
    ext = InceptionExtractor(path, batch_size=2)
    assert ext.name == "inception-v3-fid" and ext.num_classes == 1008
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
    feats, logits = ext.features_and_logits(big)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU activations

    small = torch.rand(1, 1, 32, 32, generator=g) * 2 - 1  # grayscale 32x32: repeated to RGB, resized
    f_small = ext.features(small)
    f_manual = ext.features(F.interpolate(small.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                          align_corners=False))
    assert f_small.shape == (1, 2048)
    torch.testing.assert_close(f_small, f_manual)


def test_inception_torchvision_format_and_safetensors(fid_weights, tmp_path):
    from safetensors.torch import save_file

    _, state = fid_weights
    tv = {k: v for k, v in state.items() if not k.startswith("fc.")}
    tv["fc.weight"], tv["fc.bias"] = torch.randn(1000, 2048) * 0.01, torch.zeros(1000)
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)            # present in torchvision files; ignored
    tv["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "inception_v3_google.safetensors"
    save_file(tv, str(path))
    ext = InceptionExtractor(path)
    assert ext.name == "inception-v3-torchvision"
    feats, logits = ext.features_and_logits(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (1, 2048) and logits.shape == (1, 1000)


def test_inception_missing_or_corrupt_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME):
        InceptionExtractor(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="could not read Inception-v3 weights"):
        load_inception_weights(corrupt)
    # a pickle with arbitrary objects is refused (weights_only), not executed
    pickled = tmp_path / "pickled.pth"
    torch.save({"fc.weight": torch.zeros(2), "obj": ReferenceStats}, pickled)
    with pytest.raises(ValueError, match="could not read"):
        load_inception_weights(pickled)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, wrong)
    with pytest.raises(ValueError, match="missing keys"):
        InceptionExtractor(wrong)


def test_damaged_reference_files_are_one_clear_line(tmp_path):
    """A truncated .npz, a bare .npy, an object array and a text file each name the file, in one line."""
    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:40])
    np.save(tmp_path / "arr.npy", np.zeros(3))
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    (tmp_path / "text.npz").write_text("mu, sigma\n")  # np.load takes it for a pickle
    for name, why in (("trunc.npz", "not a readable .npz"), ("arr.npy", "not an .npz archive"),
                      ("obj.npz", r"pickled objects \(refused\)"), ("text.npz", "not a NumPy file")):
        with pytest.raises(ValueError, match=why) as err:
            load_reference_stats(tmp_path / name)
        assert name in str(err.value) and len(str(err.value).splitlines()) == 1
    assert load_reference_stats(good).mu.shape == (3,)
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan, 0.0]), sigma=np.eye(3))
    with pytest.raises(ValueError, match="nan.npz holds non-finite values .*'mu'"):
        load_reference_stats(tmp_path / "nan.npz")


def test_inception_weights_with_a_nan_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.full((2, 2048), float("nan")), "fc.bias": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="non-finite values .*'fc.weight'"):
        load_inception_weights(tmp_path / "w.safetensors")


# ---- exact small cases (from mutation testing) -----------------------------------------------------
def test_inception_score_marginal_is_per_split():
    from causalfusion.metrics import inception_score

    p = np.eye(2)[[0, 0, 1, 1]]  # each split is one class only: its own marginal is that class, KL 0
    assert inception_score(p, splits=2, from_logits=False) == pytest.approx((1.0, 0.0))


def test_inception_score_population_std_and_remainder_rows():
    from causalfusion.metrics import inception_score

    mean, std = inception_score(np.eye(2)[[0, 1, 0, 0]], splits=2, from_logits=False)
    assert (mean, std) == pytest.approx((1.5, 0.5))  # splits score 2 and 1; std with ddof 0
    q = np.array([2 / 3, 1 / 3])  # 5 rows, 2 splits: the second holds rows 2..4 (0, 0, 1)
    kl = (2 * np.log(1 / q[0]) + np.log(1 / q[1])) / 3
    got = inception_score(np.eye(2)[[0, 1, 0, 0, 1]], splits=2, from_logits=False)[0]
    assert got == pytest.approx((2 + np.exp(kl)) / 2)


def test_precision_recall_against_brute_force():
    from causalfusion.metrics import precision_recall

    def brute(real, fake, k):
        def radii(x):
            return np.sort(((x[:, None] - x[None]) ** 2).sum(-1), 1)[:, k]

        def inside(manifold, r, query):
            return (((query[:, None] - manifold[None]) ** 2).sum(-1) <= r[None]).any(1).mean()
        return inside(real, radii(real), fake), inside(fake, radii(fake), real)

    x = np.random.default_rng(7).standard_normal((120, 6))
    fake = x[:60] * 0.3  # a shrunken copy: precision and recall differ
    got = precision_recall(x, fake, k=3)
    assert got == pytest.approx(brute(x, fake, 3)) and got[0] != got[1]
    real = np.zeros((5, 2))
    real[4] = 5.0  # four identical points: k=3 radius 0, and a fake point on them is inside (<=)
    assert precision_recall(real, np.zeros((4, 2)), k=3)[0] == 1.0


def test_protocol_constants_are_the_adm_evaluators():
    """The paper's numbers use the ADM evaluator: IS over 10 splits, precision/recall with k = 3."""
    import inspect

    from causalfusion.metrics import evaluate, inception_score, precision_recall

    default = lambda fn, name: inspect.signature(fn).parameters[name].default  # noqa: E731
    assert default(evaluate, "is_splits") == default(inception_score, "splits") == 10
    assert default(evaluate, "pr_k") == default(precision_recall, "k") == 3


def test_fid_retries_a_singular_product_with_nudged_diagonals(monkeypatch):
    """When sqrtm(S1 S2) is not finite, FID warns and retries with eps added to both diagonals."""
    from causalfusion.metrics import fid as fid_mod

    real_sqrtm, calls = fid_mod.linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_mod.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        d = fid_mod.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
    # the traces keep the given covariances; only the square root sees the nudged ones
    assert d == pytest.approx(sum(a + b - 2 * np.sqrt((a + 1e-3) * (b + 1e-3)) for a, b in ((1, 9), (4, 1))))


def test_a_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch):
    from causalfusion.metrics.extractor import default_cache_dir

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("CAUSALFUSION_CACHE", str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"\$CAUSALFUSION_CACHE\) is a file"):
        default_cache_dir()
    monkeypatch.setenv("CAUSALFUSION_CACHE", str(tmp_path / "d"))
    assert default_cache_dir() == tmp_path / "d"


def test_inception_gives_no_class_accuracy_for_dataset_labels(fid_weights):
    """Inception's logits are ImageNet's (1008 TF-graph outputs in their own order): argmax == a
    folder's or digits' label id is a meaningless number, and `eval` printed it as 'accuracy'."""
    from causalfusion.metrics import evaluate

    ext = InceptionExtractor(fid_weights[0], batch_size=4)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ref = ReferenceStats(np.zeros(2048), np.eye(2048), extractor=ext.name)
    m = evaluate(images, np.array([0, 1, 0, 1]), ext, ref, layout="NHWC")
    assert "accuracy" not in m and np.isfinite(m["fid"]) and m["inception_score"] >= 1.0
