"""Zero-shot editing (issue 4): visible tokens kept bit-identical, the degenerate masks (everything
visible / nothing visible), cached vs uncached, latent-space editing through a toy autoencoder,
mask parsing and the `edit` command's refusals.

The model is a depth-2, 32-wide CausalFusion with the digits' shape (1x8x8, 10 classes, patch 2:
16 tokens) fitted for a few seconds to noisy class prototypes, so its samples stay O(1) and the
cached-vs-uncached tolerance means something (see tests/test_sampling.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from causalfusion.ar_plan import ARPlanConfig
from causalfusion.autoencoders import Autoencoder
from causalfusion.cli import main
from causalfusion.diffusion import Diffusion
from causalfusion.edit_masks import REGIONS, load_image, parse_mask, region_mask, token_mask
from causalfusion.editing import edit, edit_accuracy, edit_figure, edit_region, format_accuracy, new_classes
from causalfusion.models import CausalFusion
from causalfusion.objective import causalfusion_loss, drop_labels
from causalfusion.sampling import sample
from conftest import save_run, tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = CausalFusion(tiny_config(in_channels=1, num_classes=10)).train()
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 1, 8, 8, generator=g).clamp(-1, 1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    diffusion, plan = Diffusion(), ARPlanConfig(gamma=0.9)
    for _ in range(150):
        y = torch.randint(0, 10, (16,), generator=g)
        x0 = (protos[y] + 0.1 * torch.randn(16, 1, 8, 8, generator=g)).clamp(-1, 1)
        loss, _ = causalfusion_loss(m, diffusion, x0, drop_labels(y, 0.1, 10, g), plan, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield m.eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---- the edit itself -------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(mask="top"),
    dict(mask="bottom", ar_steps=4, order="raster", cfg=2.0),
    dict(mask="center", ar_steps=2, order="dilated", sampler="ddim", eta=0.5),
    dict(mask="outer", groups=[4, 8], order="random", cfg=1.5, cfg_interval=(0, 600)),
    dict(mask="left", fraction=0.25, ar_steps=4, order="block"),
], ids=["top", "bottom-S4-cfg", "center-ddim", "outer-groups", "left-quarter"])
def test_visible_tokens_bit_identical_and_masked_region_changes(model, images, kw):
    kw = {"steps": 6, "seed": 3, "n": 2, **kw}
    mask = kw.pop("mask")
    out = edit(model, images, mask, 7, **kw)
    assert out.shape == (6, 1, 8, 8) and torch.isfinite(out).all()
    _, area = edit_region(model, mask, fraction=kw.get("fraction"))
    src = images.repeat_interleave(2, 0)
    assert torch.equal(out[:, :, ~area], src[:, :, ~area])  # bit-identical, not merely close
    changed = (out[:, :, area] != src[:, :, area]).flatten(1).any(1)
    assert changed.all()


def test_whole_image_visible_changes_nothing(model, images):
    out = edit(model, images, torch.zeros(8, 8, dtype=torch.bool), 2, n=3, steps=5)
    assert torch.equal(out, images.repeat_interleave(3, 0))


@pytest.mark.parametrize("kw", [dict(), dict(ar_steps=4, order="random", cfg=2.0), dict(ar_steps=2, order="raster")])
def test_nothing_visible_is_plain_generation_with_the_same_seed(model, images, kw):
    kw = {"steps": 6, "seed": 11, **kw}
    out = edit(model, images[0], torch.ones(8, 8, dtype=torch.bool), 4, n=4, **kw)
    ref = sample(model, torch.full((4,), 4), **kw)
    assert torch.equal(out, ref)
    outer = edit(model, images[0], "outer", 4, n=4, fraction=1.0, **kw)  # the named form of "everything"
    assert torch.equal(outer, ref)


@pytest.mark.parametrize("kw", [
    dict(mask="top"), dict(mask="center", ar_steps=4, order="random", cfg=2.0),
    dict(mask="outer", ar_steps=12, order="raster", cfg=1.5, cfg_interval=(300, 1000)),
], ids=["top", "center-S4-cfg", "outer-token-by-token"])
def test_cached_and_uncached_editing_agree(model, images, kw):
    kw = {"steps": 8, "seed": 5, "n": 2, **kw}
    mask = kw.pop("mask")
    a = edit(model, images, mask, [1, 5, 9], **kw)
    b = edit(model, images, mask, [1, 5, 9], cache=False, **kw)
    assert a.abs().max() < 20
    assert float((a - b).abs().max()) <= TOL


def test_edit_is_deterministic_per_sample_and_class_matters(model, images):
    a = edit(model, images, "top", 3, n=2, steps=5, seed=1)
    b = edit(model, images[1:], "top", 3, n=2, steps=5, seed=1, first_index=2)
    assert torch.equal(a[2:], b)  # image 1's variations do not depend on the batch
    c = edit(model, images, "top", 8, n=2, steps=5, seed=1)
    assert not torch.equal(a, c)


def test_regenerated_region_reads_the_visible_tokens(model, images):
    """The visible tokens are a clean first AR step the masked ones attend to: change only the
    visible half and the regenerated half changes too (same seed, class and noise)."""
    other = images[0].clone()
    other[:, 4:] = -other[:, 4:]  # the bottom half: visible under the "top" mask
    a = edit(model, images[0], "top", 3, n=2, steps=5, seed=1)
    b = edit(model, other, "top", 3, n=2, steps=5, seed=1)
    _, area = edit_region(model, "top")
    assert not torch.equal(a[:, :, area], b[:, :, area])


def test_masked_tokens_keep_the_orders_relative_order(monkeypatch):
    """With a known prefix the other tokens are generated in the given order's relative order (a
    stable sort: at L=64 an unstable one scrambles them)."""
    from causalfusion.sampling_runners import CachedRunner

    big = CausalFusion(tiny_config(image_size=16, in_channels=1, num_classes=10)).eval()  # L = 64
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20]] = True
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    seen = []
    real = CachedRunner.output

    def spy(self, tokens, pos, t):
        if not seen or seen[-1] != pos[0].tolist():
            seen.append(pos[0].tolist())
        return real(self, tokens, pos, t)

    monkeypatch.setattr(CachedRunner, "output", spy)
    sample(big, torch.tensor([1]), steps=1, order=perm, ar_steps=44, known=torch.zeros(1, 1, 16, 16), known_tokens=keep)
    assert [p for group in seen for p in group] == [p for p in perm.tolist() if not keep[p]]


def test_known_prefix_in_sample_orders_known_tokens_first(model, images):
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[0, 5, 10, 15]] = True
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    out = sample(model, torch.tensor([1, 2, 3]), steps=4, order=perm, groups=[6, 6], known=images, known_tokens=keep)
    tok = model.patchify(out)
    assert torch.equal(tok[:, keep], model.patchify(images)[:, keep])
    with pytest.raises(ValueError, match="same number of known tokens"):
        rows = torch.stack([keep, keep.roll(1), ~keep])
        sample(model, torch.tensor([1, 2, 3]), steps=2, known=images, known_tokens=rows)
    with pytest.raises(ValueError, match="group sizes"):
        sample(model, torch.tensor([1, 2, 3]), steps=2, groups=[16], known=images, known_tokens=keep)


class PoolAutoencoder(Autoencoder):
    """Toy 2x VAE: encode = 2x2 average pool, decode = nearest upsampling (exact round trip of latents)."""

    kind, channels, downsample, image_channels = "toy", 1, 2, 1

    def encode(self, images):
        return torch.nn.functional.avg_pool2d(images.float(), 2)

    def decode(self, latents):
        return latents.float().repeat_interleave(2, -1).repeat_interleave(2, -2)


def test_latent_space_edit_keeps_visible_latent_tokens(model):
    ae = PoolAutoencoder()
    img = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pix = torch.zeros(16, 16, dtype=torch.bool)
    pix[0, 5] = True  # one pixel: one latent token (2x2 latent cells = 4x4 pixels) is regenerated
    tokens, area = edit_region(model, pix, ae)
    assert tokens.sum() == 1 and tokens[1] and area.sum() == 16 and area[:4, 4:8].all()
    out = edit(model, img, pix, 6, n=2, steps=5, autoencoder=ae)
    assert out.shape == (4, 1, 16, 16)
    z_in, z_out = ae.encode(img).repeat_interleave(2, 0), ae.encode(out)
    keep = ~token_mask(pix, model.cfg.grid, 4)
    assert torch.equal(model.patchify(z_out)[:, keep], model.patchify(z_in)[:, keep])
    assert not torch.equal(model.patchify(z_out)[:, ~keep], model.patchify(z_in)[:, ~keep])
    with pytest.raises(ValueError, match=r"images must be \[1, 16, 16\]"):
        edit(model, img[..., :8, :8], "top", 1, autoencoder=ae)


# ---- masks --------------------------------------------------------------------------------------
def test_region_masks():
    m = {r: region_mask(r, 8) for r in REGIONS}
    assert m["top"][:4].all() and not m["top"][4:].any()
    assert m["bottom"][4:].all() and not m["bottom"][:4].any()
    assert m["left"][:, :4].all() and not m["left"][:, 4:].any()
    assert m["right"][:, 4:].all() and not m["right"][:, :4].any()
    assert m["center"].sum() == 16 and m["center"][2:6, 2:6].all()
    assert torch.equal(m["outer"], ~m["center"])
    assert region_mask("top", 8, 0.25).sum() == 16
    assert region_mask("outer", 8, 1.0).all()
    with pytest.raises(ValueError, match="empty"):
        region_mask("center", 8, 0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        region_mask("top", 8, 1.5)


def test_token_mapping_any_pixel_regenerates_the_token():
    pix = torch.zeros(8, 8, dtype=torch.bool)
    pix[3, 4] = True  # token row 1, column 2 of the 4x4 grid of 2x2 patches
    tok = token_mask(pix, (4, 4), 2)
    assert tok.sum() == 1 and tok[1 * 4 + 2]
    assert token_mask(region_mask("top", 8, 0.375), (4, 4), 2).sum() == 8  # 3 rows -> 2 token rows


def test_mask_file_white_is_regenerate(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[:, :3] = 255
    arr[0, 7] = 100  # dark grey: kept
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = parse_mask(str(tmp_path / "m.png"), 8)
    assert m[:, :3].all() and m.sum() == 24
    for spec in (str(tmp_path / "m.png"), m):  # a fraction would be silently ignored there
        with pytest.raises(ValueError, match="named regions only"):
            parse_mask(spec, 8, fraction=0.5)


def test_load_image_checks_size_and_channels(tmp_path):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", 8, 1)
    assert x.shape == (1, 8, 8) and float(x.min()) == 1.0
    with pytest.raises(ValueError, match="1 channels"):
        load_image(tmp_path / "g.png", 8, 3)
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 16-bit: rescaled, not clipped at 255
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    want = torch.from_numpy(np.rint(ramp / 257.0)).float()[None] / 127.5 - 1
    assert torch.allclose(load_image(tmp_path / "g16.png", 8, 1), want)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="floating-point"):
        load_image(tmp_path / "f.tif", 8, 1)


def test_edit_figure_layout(images):
    area = region_mask("top", 8)
    fig = edit_figure(images[:2], area, torch.zeros(6, 1, 8, 8), 3)
    assert fig.shape == (10, 1, 8, 8)
    assert torch.equal(fig[0], images[0]) and (fig[1][:, :4] == 0).all() and torch.equal(fig[1][:, 4:], images[0][:, 4:])


def test_bad_api_arguments(model, images):
    with pytest.raises(ValueError, match="out of range"):
        edit(model, images, "top", 10, steps=2)
    with pytest.raises(ValueError, match="must be in 1..8"):
        edit(model, images, "top", 1, steps=2, ar_steps=9)
    with pytest.raises(ValueError, match="images must be"):
        edit(model, images[:, :, :4], "top", 1, steps=2)
    with pytest.raises(ValueError, match="the mask is 4x4"):
        edit(model, images, torch.ones(4, 4, dtype=torch.bool), 1, steps=2)


def test_edit_accuracy_rows(model):
    rows = edit_accuracy(model, regions=("top", "bottom"), num=6, cfgs=(1.0,), steps=3, batch_size=4)
    assert [r["region"] for r in rows] == ["top", "bottom"]
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("baseline_new", "edited_new", "edited_old", "generated_new"))
    assert "baseline" in format_accuracy(rows)
    y = torch.arange(10).repeat(3)
    t = new_classes(y)
    assert (t != y).all() and set(t.tolist()) == set(range(10))


# ---- the command -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    return save_run(model, tmp_path_factory.mktemp("run"))


def test_cli_edit_writes_grid_and_npz(run_dir, tmp_path, capsys):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "in.png")
    png, npz = tmp_path / "out.png", tmp_path / "e.npz"
    argv = ["edit", "--ckpt", str(run_dir), "--image", str(tmp_path / "in.png"), "--mask", "center", "--class", "7",
            "--n", "3", "--sample-steps", "4", "--ar-steps", "2", "--cfg", "1.5", "--out", str(png), "--npz", str(npz)]
    assert main(argv) == 0
    grid = np.asarray(Image.open(png))
    assert grid.shape == (1 * 33 + 1, 5 * 33 + 1)  # one row: original | masked | 3 variations, 8px x4 + pad
    data = np.load(npz)
    assert data["arr_0"].shape == (3, 8, 8, 1) and (data["labels"] == 7).all()
    src = np.asarray(Image.open(tmp_path / "in.png"))
    keep = ~region_mask("center", 8).numpy()
    assert (data["arr_0"][..., 0][:, keep] == src[keep]).all()  # uint8 round trip of the visible pixels
    png2 = tmp_path / "gen.png"
    assert main(["edit", "--ckpt", str(run_dir), "--generate-class", "3,4", "--mask", "top", "--class", "8",
                 "--n", "2", "--sample-steps", "3", "--out", str(png2)]) == 0
    assert np.asarray(Image.open(png2)).shape == (2 * 33 + 1, 4 * 33 + 1)
    png3 = tmp_path / "two.png"  # --image repeated: every image is edited (not only the last)
    assert main(["edit", "--ckpt", str(run_dir), "--image", str(tmp_path / "in.png"), "--image", str(tmp_path / "in.png"),
                 "--mask", "top", "--class", "8", "--n", "1", "--sample-steps", "2", "--out", str(png3)]) == 0
    assert np.asarray(Image.open(png3)).shape == (2 * 33 + 1, 3 * 33 + 1)
    assert main(["edit", "--ckpt", str(run_dir), "--eval-digits", "4", "--mask", "top", "--sample-steps", "2"]) == 0
    assert "| top |" in capsys.readouterr().out


def test_cli_eval_digits_passes_every_sampler_option_on(run_dir, monkeypatch):
    """--eval-digits samples and edits with the given sampler, eta, CFG interval and block tiles."""
    import causalfusion.editing as editing

    calls = []

    def record(model, labels, **kw):
        calls.append(kw)
        return torch.zeros(len(labels), 1, 8, 8)

    monkeypatch.setattr(editing, "sample", record)
    assert main(["edit", "--ckpt", str(run_dir), "--eval-digits", "2", "--mask", "top", "--sample-steps", "2",
                 "--sampler", "ddim", "--eta", "0.5", "--cfg-interval", "100,600", "--order", "block", "--block", "1",
                 "--ar-steps", "2", "--precision", "bf16"]) == 0
    assert len(calls) == 2  # the plain samples (generated_new), then the edits
    for kw in calls:
        assert (kw["sampler"], kw["eta"], kw["cfg_interval"], kw["precision"]) == ("ddim", 0.5, (100.0, 600.0), "bf16")
    assert (calls[1]["order"], calls[1]["block"], calls[1]["ar_steps"]) == ("block", 1, 2)


def _bad_inputs(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.full((6, 6), 255, np.uint8)).save(tmp_path / "mask6.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "notimg.png").write_text("not a png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")


@pytest.mark.parametrize("args, needle", [
    (["--image", "{d}/ok.png", "--mask", "{d}/mask6.png", "--class", "1"], "mask6.png is 6x6"),
    (["--image", "{d}/ok.png", "--mask", "{d}/empty.png", "--class", "1"], "is empty"),
    (["--image", "{d}/ok.png", "--mask", "{d}/notimg.png", "--class", "1"], "is not an image"),
    (["--image", "{d}/big.png", "--mask", "top", "--class", "1"], "is 16x16"),
    (["--image", "{d}/rgb.png", "--mask", "top", "--class", "1"], "3 channels"),
    (["--image", "{d}/ok.png", "--mask", "top", "--class", "10"], "out of range"),
    (["--generate-class", "12", "--mask", "top", "--class", "1"], "out of range"),
    (["--image", "{d}/ok.png", "--mask", "middle", "--class", "1"], "unknown mask region"),
    (["--image", "{d}/ok.png", "--mask", "top", "--mask-frac", "0.05", "--class", "1"], "empty"),
    (["--image", "{d}/missing.png", "--mask", "top", "--class", "1"], "not found"),
    (["--image", "{d}/ok.png", "--mask", "top"], "give --class"),
], ids=["mask-size", "mask-empty", "mask-not-image", "image-size", "image-channels", "class-range",
        "generate-class-range", "mask-name", "mask-frac-empty", "image-missing", "no-class"])
def test_cli_bad_edit_input_is_one_line(run_dir, tmp_path, capsys, args, needle):
    _bad_inputs(tmp_path)
    out, npz = tmp_path / "out.png", tmp_path / "out.npz"
    argv = ["edit", "--ckpt", str(run_dir), "--sample-steps", "2", "--out", str(out), "--npz", str(npz)]
    assert main(argv + [a.format(d=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not npz.exists()
