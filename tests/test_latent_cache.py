"""Latent caching on a tiny ImageFolder of generated PNGs with a tiny random SD-VAE: the cache holds
what the VAE gives (flips included), a killed caching run continues without re-encoding finished
shards, training from the cache runs and resumes exactly, `sample` decodes to pixels, and a cache
from another VAE or image size, an incomplete cache and an empty folder are refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.autoencoders import load_autoencoder
from causalfusion.cli import main
from causalfusion.data import BatchStream, load_dataset
from causalfusion.latent_cache import CacheError, EncodedDataset, cache_latents, open_latent_cache
from causalfusion.models import ModelConfig
from causalfusion.trainer import TrainConfig, Trainer
from conftest import log_column, save_tiny_vae

diffusers = pytest.importorskip("diffusers")
TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "4", "--sample-every", "0",
        "--no-progress", "--log-every", "1", "--patch-size", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(5):  # odd sizes: the ADM center crop makes them 16x16
            Image.fromarray(rng.integers(0, 256, (18 + i, 24, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    save_tiny_vae(root / "vae")
    save_tiny_vae(root / "vae_other", seed=1)
    cache = root / "cache"
    assert main(["cache-latents", "--data", f"folder:{root / 'images'}", "--image-size", "16", "--vae", "sd-vae",
                 "--vae-path", str(root / "vae"), "--out", str(cache), "--shard-size", "4", "--batch-size", "3",
                 "--no-progress"]) == 0
    return root


def test_cache_holds_the_vae_latents_with_flips(world):
    ds = load_dataset(f"folder:{world / 'images'}", 16)
    ae = load_autoencoder("sd-vae", world / "vae")
    lat = open_latent_cache(world / "cache")
    assert (len(lat), lat.image_size, lat.channels, lat.num_classes, lat.flip) == (10, 8, 4, 2, True)
    assert lat.labels.tolist() == ds.labels.tolist() and len(lat.index["shards"]) == 3
    idx, flip = torch.tensor([0, 5, 9, 3]), torch.tensor([False, True, False, True])
    torch.testing.assert_close(lat.get(idx), ae.encode(ds.get(idx)), atol=1e-6, rtol=1e-5)
    # the cached flip is the encoding of the mirrored image (as MAR caches it), not a mirrored latent
    torch.testing.assert_close(lat.get(idx, flip), ae.encode(ds.get(idx, flip)), atol=1e-6, rtol=1e-5)
    # on-the-fly encoding gives the same batches as the cache
    enc = EncodedDataset(ds, ae)
    a = BatchStream(lat, 4, torch.Generator().manual_seed(0)).next()
    b = BatchStream(enc, 4, torch.Generator().manual_seed(0)).next()
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(a[1], b[1])


def test_training_batches_draw_from_the_vae_posterior(world, tmp_path):
    """Like DiT/MAR: each batch is mean + std * eps with per-sample seeds from the training generator;
    without seeds (evaluation, probing) the mean; a --means-only cache gives the means."""
    from safetensors import safe_open

    lat = open_latent_cache(world / "cache")
    assert lat.posterior
    with safe_open(str(world / "cache" / "shard_00000.safetensors"), "pt") as f:
        assert {"mean", "std", "mean_flip", "std_flip", "labels"} == set(f.keys())
        assert (f.get_tensor("std") > 0).all()
    idx, flip, seeds = torch.tensor([0, 5, 9]), torch.tensor([False, True, False]), torch.tensor([11, 12, 13])
    drawn = lat.get(idx, flip, seeds)
    mean = lat.get(idx, flip)
    assert not torch.allclose(drawn, mean)
    torch.testing.assert_close(lat.get(idx[1:2], flip[1:2], seeds[1:2])[0], drawn[1])  # independent of the batch
    ae = load_autoencoder("sd-vae", world / "vae")
    m, sd = ae.encode_posterior(load_dataset(f"folder:{world / 'images'}", 16).get(idx, flip))
    eps = torch.stack([torch.randn(m.shape[1:], generator=torch.Generator().manual_seed(int(k))) for k in seeds])
    torch.testing.assert_close(drawn, m + sd * eps, atol=1e-5, rtol=1e-5)  # the VAE's own posterior
    z = (drawn - mean) / sd
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15
    means_only = tmp_path / "means"
    assert main(["cache-latents", "--data", f"folder:{world / 'images'}", "--image-size", "16", "--vae", "sd-vae",
                 "--vae-path", str(world / "vae"), "--out", str(means_only), "--means-only", "--no-progress"]) == 0
    plain = open_latent_cache(means_only)
    assert not plain.posterior
    a, _ = BatchStream(plain, 4, torch.Generator().manual_seed(0)).next()
    b, _ = BatchStream(lat, 4, torch.Generator().manual_seed(0)).next()
    assert not torch.allclose(a, b)  # the same indices and flips, but b carries posterior noise


class _Counting:
    """Wraps an autoencoder; counts encoded images, fails after ``fail_after`` calls (a killed run)."""

    def __init__(self, ae, fail_after=None):
        self.ae, self.fail_after, self.calls, self.images = ae, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.ae, name)

    def encode_posterior(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += len(x)
        return self.ae.encode_posterior(x)


def test_killed_caching_run_continues_without_reencoding(world, tmp_path):
    ds = load_dataset(f"folder:{world / 'images'}", 16)
    ae = load_autoencoder("sd-vae", world / "vae")
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):  # dies in the 2nd shard (4 images per shard, 2 per call, + flips)
        cache_latents(ds, out, _Counting(ae, fail_after=5), shard_size=4, batch_size=2, progress=False)
    assert (out / "shard_00000.safetensors").exists() and not (out / "shard_00001.safetensors").exists()
    with pytest.raises(CacheError, match="incomplete"):
        open_latent_cache(out)
    before = (out / "shard_00000.safetensors").stat().st_mtime_ns
    again = _Counting(ae)
    index = cache_latents(ds, out, again, shard_size=4, batch_size=2, progress=False)
    assert index["complete"] and again.images == 2 * 6  # shards 1 and 2 only (6 images, each also flipped)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == before
    torch.testing.assert_close(open_latent_cache(out).get(torch.arange(10)),
                               open_latent_cache(world / "cache").get(torch.arange(10)))
    # a finished cache that lost a shard: the same command encodes that shard again, only that one
    (out / "shard_00001.safetensors").unlink()
    repair = _Counting(ae)
    assert cache_latents(ds, out, repair, shard_size=4, batch_size=2, progress=False)["complete"]
    assert repair.images == 2 * 4 and (out / "shard_00001.safetensors").exists()
    torch.testing.assert_close(open_latent_cache(out).get(torch.arange(10)),
                               open_latent_cache(world / "cache").get(torch.arange(10)))
    # other settings in the same directory are refused, not mixed in
    with pytest.raises(CacheError, match="other settings"):
        cache_latents(ds, out, ae, shard_size=4, batch_size=2, progress=False, flip=False)
    with pytest.raises(CacheError, match="different autoencoder"):
        cache_latents(ds, out, load_autoencoder("sd-vae", world / "vae_other"), shard_size=4, progress=False)


def test_the_same_command_writes_the_same_shard_files(world, tmp_path):
    """A shard's bytes are a function of its contents: safetensors writes the metadata of a shard
    (shard, count, start, cache) in an order that changes from call to call (a Rust HashMap), so
    the same cache written twice had other sha256 sums, its tensors equal."""
    ds = load_dataset(f"folder:{world / 'images'}", 16)
    ae = load_autoencoder("sd-vae", world / "vae")
    for k in range(3):
        cache_latents(ds, tmp_path / str(k), ae, shard_size=4, batch_size=3, progress=False)
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        first = (tmp_path / "0" / name).read_bytes()
        assert all((tmp_path / str(k) / name).read_bytes() == first for k in (1, 2)), name
    assert (tmp_path / "0" / "shard_00000.safetensors").read_bytes() == (world / "cache" / "shard_00000.safetensors").read_bytes()
    torch.testing.assert_close(open_latent_cache(tmp_path / "0").get(torch.arange(10)),
                               open_latent_cache(world / "cache").get(torch.arange(10)), rtol=0, atol=0)


def test_sorting_the_metadata_keeps_the_header_length_with_non_ascii_and_escapes(tmp_path):
    """safetensors writes non-ASCII as raw UTF-8 (and escapes quotes, backslashes and control
    characters as Python does): the rewritten header is the same length, its JSON the same."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from causalfusion.latent_cache import _sort_metadata

    path = tmp_path / "s.safetensors"
    meta = {"b": "1", "a": "ü€😀", "é": 'x\n"\\/\x01', "c": "plain"}
    tensors = {"mean": torch.arange(6.0).view(2, 3), "labels": torch.tensor([1, 2])}
    save_file(tensors, str(path), metadata=meta)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    _sort_metadata(path)
    new = path.read_bytes()
    assert len(new) == len(raw) and new[:8] == raw[:8] and new[8 + size:] == raw[8 + size:]
    assert json.loads(new[8:8 + size]) == json.loads(raw[8:8 + size])
    assert list(json.loads(new[8:8 + size])["__metadata__"]) == sorted(meta)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
    torch.testing.assert_close(load_file(str(path)), tensors, rtol=0, atol=0)


def test_a_shard_copied_in_from_another_cache_is_refused_then_encoded_again(world, tmp_path):
    import shutil

    ds = load_dataset(f"folder:{world / 'images'}", 16)
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(world / "cache", mine)
    cache_latents(ds, other, load_autoencoder("sd-vae", world / "vae_other"), shard_size=4, progress=False)
    shutil.copy(other / "shard_00001.safetensors", mine / "shard_00001.safetensors")  # same shapes, other VAE
    with pytest.raises(CacheError, match="shard_00001.safetensors does not fit index.json: it belongs to another cache"):
        open_latent_cache(mine)
    moved = shutil.copytree(world / "vae", tmp_path / "moved_vae")  # the same weights elsewhere: the same latents
    again = _Counting(load_autoencoder("sd-vae", moved))
    assert cache_latents(ds, mine, again, shard_size=4, batch_size=3, progress=False)["complete"]
    assert again.images == 2 * 4  # only the foreign shard (4 images and their flips)
    torch.testing.assert_close(open_latent_cache(mine).get(torch.arange(10)),
                               open_latent_cache(world / "cache").get(torch.arange(10)))


def test_training_from_the_cache_runs_and_resumes_exactly(world, tmp_path):
    lat = open_latent_cache(world / "cache")
    model = ModelConfig(image_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                        num_classes=2, class_tokens=2)

    def cfg(out, steps):
        return TrainConfig(out=str(out), data=lat.name, image_size=16, steps=steps, batch_size=4, lr=1e-3,
                           warmup=2, log_every=1, ckpt_every=2, sample_every=0, progress=False)

    straight = Trainer(model, ARPlanConfig(), cfg(tmp_path / "a", 4), dataset=lat)
    straight.train()
    Trainer(model, ARPlanConfig(), cfg(tmp_path / "b", 2), dataset=open_latent_cache(world / "cache")).train()
    resumed = Trainer(model, ARPlanConfig(), cfg(tmp_path / "b", 4), resume=True, dataset=open_latent_cache(world / "cache"))
    resumed.train()
    for p, q in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    spec = json.loads((tmp_path / "a" / "config.json").read_text())["autoencoder"]
    assert spec["kind"] == "sd-vae" and spec["image_size"] == 16 and spec["scale"] == 0.18215


def test_distributed_step_draws_the_trainers_posterior_latents(world, tmp_path):
    """The DistributedTrainer (one process, 2 micro-batches) slices the global batch's posterior seeds
    like its flips: its steps are the Trainer's up to round-off."""
    from causalfusion.distributed import DistributedTrainer, ScaleConfig

    model = ModelConfig(image_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                        num_classes=2, class_tokens=2)
    cfg = dict(data="latents", image_size=16, steps=2, batch_size=4, lr=1e-3, warmup=2, log_every=1, ckpt_every=2,
               sample_every=0, progress=False)
    a = Trainer(model, ARPlanConfig(), TrainConfig(out=str(tmp_path / "a"), **cfg), dataset=open_latent_cache(world / "cache"))
    b = DistributedTrainer(model, ARPlanConfig(), TrainConfig(out=str(tmp_path / "b"), **cfg),
                           dataset=open_latent_cache(world / "cache"), scale=ScaleConfig(grad_accum=2))
    for _ in range(2):  # the first loss does not see the data (zero-initialised output layer)
        la, lb = a.train_step()["loss"], b.train_step()["loss"]
    assert abs(la - lb) < 1e-5


def test_cli_train_from_cache_then_sample_decodes_to_pixels(world, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", f"latents:{world / 'cache'}", "--out", str(run), "--steps", "2", *TINY]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress", "--sample-every", "3"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3  # what a next --resume starts from
    grid = Image.open(run / "samples" / "step_0000003.png")  # decoded by the run's VAE: RGB, not 4 latent channels
    assert grid.mode == "RGB" and grid.size[0] > 8 * 16
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run), "--per-class", "2", "--sample-steps", "3", "--out", str(tmp_path / "g.png"),
                 "--npz", str(npz)]) == 0
    data = np.load(npz)
    assert data["arr_0"].shape == (4, 16, 16, 3) and data["labels"].tolist() == [0, 0, 1, 1]


def test_cache_latents_config_fills_the_image_size_and_vae_it_was_not_given(world, tmp_path):
    base = ["cache-latents", "--data", f"folder:{world / 'images'}", "--vae-path", str(world / "vae"),
            "--config", "in256-ablation", "--no-progress", "--no-flip"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0  # Tab. 9: 256 px through the SD-VAE
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert (index["image_size"], index["autoencoder"]["kind"], index["latent_shape"]) == (256, "sd-vae", [4, 128, 128])
    assert main([*base, "--out", str(tmp_path / "b"), "--image-size", "16"]) == 0  # explicit flags win
    assert json.loads((tmp_path / "b" / "index.json").read_text())["latent_shape"] == [4, 8, 8]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "latents:{cache}", "--image-size", "32", "--out", "{tmp}/r"], "holds 16px images"),
    (["train", "--data", "latents:{cache}", "--vae", "sd-vae", "--vae-path", "{other}", "--out", "{tmp}/r"],
     "different autoencoder"),
    (["train", "--data", "latents:{cache}", "--vae", "kl16", "--out", "{tmp}/r"], "different autoencoder"),
    (["train", "--data", "latents:{tmp}/nothing", "--out", "{tmp}/r"], "does not exist"),
    (["train", "--data", "folder:{images}", "--image-size", "16", "--vae", "sd-vae", "--vae-path", "{tmp}/novae",
      "--out", "{tmp}/r"], "VAE weights not found"),
    (["cache-latents", "--data", "folder:{tmp}/empty", "--image-size", "16", "--out", "{tmp}/c"], "no images found"),
    (["cache-latents", "--data", "folder:{images}", "--image-size", "16", "--vae", "sd-vae",
      "--vae-path", "{tmp}/novae", "--out", "{tmp}/c"], "VAE weights not found"),
    (["cache-latents", "--data", "folder:{images}", "--image-size", "16", "--vae", "sd-vae",
      "--vae-path", "{other}", "--out", "{cache}", "--shard-size", "4"], "different autoencoder"),
])
def test_mismatches_are_refused_in_one_line(world, tmp_path, capsys, argv, needle):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    argv = [a.format(cache=world / "cache", other=world / "vae_other", images=world / "images", tmp=tmp_path)
            for a in argv]
    assert main([*argv, *(TINY if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_torchrun_divides_the_shards_among_processes(world, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "c2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "causalfusion.cli",
           "cache-latents", "--data", f"folder:{world / 'images'}", "--image-size", "16", "--vae", "sd-vae",
           "--vae-path", str(world / "vae"), "--out", str(out), "--shard-size", "3", "--no-progress"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("cached 10 images") == 1  # rank 0 reports
    idx, flip = torch.arange(10), torch.arange(10) % 3 == 0
    torch.testing.assert_close(open_latent_cache(out).get(idx, flip), open_latent_cache(world / "cache").get(idx, flip),
                               atol=1e-6, rtol=1e-5)


def test_two_processes_draw_the_single_process_posterior_latents(world, tmp_path):
    """Under torchrun each rank loads its half of the global batch with that half's posterior seeds:
    2 processes train on the latents 1 process draws (the losses agree)."""
    import os
    import subprocess
    import sys

    args = ["train", "--data", f"latents:{world / 'cache'}", "--steps", "3", "--lr", "1e-3", "--warmup", "1", *TINY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "causalfusion.cli",
           *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = log_column(tmp_path / "one"), log_column(tmp_path / "two")
    assert len(one) == 3 and one[1:] == pytest.approx(two[1:], abs=1e-5)


def test_damaged_image_leaves_no_cache_behind(world, tmp_path, capsys):
    """A damaged source image stops cache-latents with one line; the cache it started is removed."""
    import shutil

    images = shutil.copytree(world / "images", tmp_path / "images")
    (images / "cat" / "0.png").write_bytes(b"not a png")
    out = tmp_path / "c"
    assert main(["cache-latents", "--data", f"folder:{images}", "--image-size", "16", "--vae", "sd-vae",
                 "--vae-path", str(world / "vae"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.png" in err[0], err
    assert not out.exists()


def _folder(root, n_per_class=1):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / c / f"{i}.png")
    return root


def test_fingerprint_sees_a_replaced_image(tmp_path):
    """A file replaced under the same name (other size on disk) is another dataset: refused."""
    from causalfusion.autoencoders import IdentityAutoencoder

    img = _folder(tmp_path / "img")
    cache_latents(load_dataset(f"folder:{img}", 8), tmp_path / "c", IdentityAutoencoder(3), progress=False)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(img / "a" / "0.png")
    with pytest.raises(CacheError, match="other settings"):
        cache_latents(load_dataset(f"folder:{img}", 8), tmp_path / "c", IdentityAutoencoder(3), progress=False)


def test_ranks_encode_only_their_shards(tmp_path):
    """Shard i belongs to rank i mod world: rank 1 of 2 writes shards 1 and 3 only."""
    from causalfusion.autoencoders import IdentityAutoencoder

    ds = load_dataset(f"folder:{_folder(tmp_path / 'img', 2)}", 8)
    (tmp_path / "c").mkdir()  # rank 0 makes it (and writes the index)
    cache_latents(ds, tmp_path / "c", IdentityAutoencoder(3), shard_size=1, rank=1, world=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard_*")) == ["shard_00001.safetensors",
                                                                         "shard_00003.safetensors"]


def test_a_non_empty_directory_without_a_cache_is_refused(tmp_path, capsys):
    """cache-latents --out RUN (a training run, say) wrote index.json and the shards among its files."""
    from causalfusion.autoencoders import IdentityAutoencoder
    from causalfusion.cli import main

    ds = load_dataset(f"folder:{_folder(tmp_path / 'img')}", 8)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(CacheError, match="non-empty directory without a latent cache"):
        cache_latents(ds, run, IdentityAutoencoder(3), progress=False)
    assert main(["cache-latents", "--data", f"folder:{tmp_path / 'img'}", "--image-size", "8", "--out", str(run),
                 "--no-progress"]) == 2
    assert "non-empty directory" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["config.json"]
    # an empty directory is filled, and a cache there is continued as before
    (tmp_path / "empty").mkdir()
    assert cache_latents(ds, tmp_path / "empty", IdentityAutoencoder(3), progress=False)["complete"]
    assert cache_latents(ds, tmp_path / "empty", IdentityAutoencoder(3), progress=False)["complete"]


def test_a_shard_with_a_nan_latent_is_named_when_read(world, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from causalfusion.latent_cache import CacheError

    shutil.copytree(world / "cache", tmp_path / "cache")
    lat = open_latent_cache(tmp_path / "cache")
    shard = tmp_path / "cache" / lat.index["shards"][1]["file"]
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["mean"][0].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    lat = open_latent_cache(tmp_path / "cache")
    size = lat.index["shard_size"]
    assert torch.isfinite(lat.get(torch.tensor([0, size + 1]))).all()  # other rows read as before
    with pytest.raises(CacheError, match=f"{shard.name} holds non-finite values .*'mean'"):
        lat.get(torch.tensor([0, size]))
