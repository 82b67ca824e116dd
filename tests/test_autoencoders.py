"""Autoencoders offline: tiny random AutoencoderKLs saved with save_pretrained, loaded from disk
(never downloaded); the LDM -> diffusers conversion of MAR's KL-16 checked against an LDM-layout
reference; missing weights refused with one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from causalfusion.autoencoders import (AutoencoderError, IdentityAutoencoder, autoencoder_from_spec,
                                       check_same_autoencoder, convert_ldm_vae, decode_in_batches, kl16_config,
                                       load_autoencoder, resolve_weights)

from conftest import save_tiny_vae

diffusers = pytest.importorskip("diffusers")


def test_identity_is_pixel_space():
    ae = IdentityAutoencoder(3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.decode(ae.encode(x)), x) and ae.latent_size(8) == 8
    assert ae.spec()["kind"] == "identity"


def test_sd_vae_round_trips_through_save_pretrained(tmp_path):
    raw = save_tiny_vae(tmp_path / "vae").eval()
    ae = load_autoencoder("sd-vae", tmp_path / "vae")
    assert (ae.channels, ae.downsample, ae.latent_size(16)) == (4, 2, 8)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():  # encode = posterior mean x 0.18215 (SD-VAE scale), decode inverts the scale
        torch.testing.assert_close(z, raw.encode(x).latent_dist.mean * 0.18215)
        torch.testing.assert_close(ae.decode(z), raw.decode(z / 0.18215).sample.clamp(-1, 1))
    img = decode_in_batches(ae, z, batch_size=2)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    # the spec alone rebuilds it (what `sample` does from config.json)
    spec = ae.spec()
    assert spec["kind"] == "sd-vae" and spec["scale"] == 0.18215 and len(spec["weights_sha256"]) == 64
    torch.testing.assert_close(autoencoder_from_spec(spec).encode(x), z)


def test_weights_found_in_subfolder_and_hf_cache(tmp_path, monkeypatch):
    save_tiny_vae(tmp_path / "pipe" / "vae")
    assert resolve_weights(tmp_path / "pipe") == tmp_path / "pipe" / "vae"
    # an already-populated Hugging Face cache: models--org--name/snapshots/<rev>/..., refs/main
    import huggingface_hub.constants as hc

    repo = tmp_path / "hub" / "models--someorg--tiny-vae"
    snap = repo / "snapshots" / ("0" * 40)
    save_tiny_vae(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_weights("someorg/tiny-vae") == snap
    assert load_autoencoder("sd-vae", "someorg/tiny-vae").channels == 4


def test_missing_weights_are_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    for path in (tmp_path / "nope", tmp_path / "half", None):  # None: the default repo id, not cached here
        with pytest.raises(AutoencoderError) as e:
            load_autoencoder("sd-vae", path)
        msg = str(e.value)
        assert "\n" not in msg and "diffusion_pytorch_model.safetensors" in msg and "nothing is downloaded" in msg
    with pytest.raises(AutoencoderError, match="needs --vae-path"):
        load_autoencoder("kl16")


def test_wrong_channel_count_and_different_weights_are_refused(tmp_path):
    save_tiny_vae(tmp_path / "four", latent_channels=4)
    with pytest.raises(AutoencoderError, match="16"):
        load_autoencoder("kl16", tmp_path / "four")
    save_tiny_vae(tmp_path / "other", seed=1)
    a = load_autoencoder("sd-vae", tmp_path / "four").spec()
    b = load_autoencoder("sd-vae", tmp_path / "other").spec()
    with pytest.raises(AutoencoderError, match="weights"):
        check_same_autoencoder(a, b)
    with pytest.raises(AutoencoderError, match="kind"):
        check_same_autoencoder(a, {"kind": "kl16"})
    check_same_autoencoder(a, {**a, "path": "/moved/elsewhere"})  # the location does not matter


# ---- KL-16: LDM-layout weights (as MAR ships them) -> diffusers --------------------------------------
class _Res(nn.Module):
    def __init__(self, cin, cout, g):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(g, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(g, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.norm = nn.GroupNorm(g, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
        a = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, dim=-1)  # [b, hw(q), hw(k)]
        return x + self.proj_out((v @ a.transpose(1, 2)).reshape(b, c, h, w))


class _LDMVAE(nn.Module):
    """LDM's KL-VAE layout (MAR's kl16 with ch 8, ch_mult (1, 2), 1 res block, attention in the
    encoder's last level), written from the LDM structure: encoder.down[i].block/attn/downsample,
    mid.block_1/attn_1/block_2, decoder.up[i] (applied from the last level down), quant convs."""

    def __init__(self, ch=8, mult=(1, 2), z=16, g=4):
        super().__init__()
        chans = [ch * m for m in mult]
        enc, dec = nn.Module(), nn.Module()
        enc.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        enc.down, cin = nn.ModuleList(), ch
        for i, c in enumerate(chans):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList([_Res(cin, c, g)]), nn.ModuleList()
            if i == len(chans) - 1:
                lvl.attn.append(_Attn(c, g))
            else:
                lvl.downsample = nn.Module()
                lvl.downsample.conv = nn.Conv2d(c, c, 3, stride=2)
            enc.down.append(lvl)
            cin = c
        for m in (enc, dec):
            m.mid = nn.Module()
            m.mid.block_1, m.mid.attn_1, m.mid.block_2 = _Res(cin, cin, g), _Attn(cin, g), _Res(cin, cin, g)
            m.norm_out = nn.GroupNorm(g, chans[-1] if m is enc else chans[0], eps=1e-6)
        enc.conv_out = nn.Conv2d(cin, 2 * z, 3, padding=1)
        dec.conv_in = nn.Conv2d(z, chans[-1], 3, padding=1)
        dec.up = nn.ModuleList([nn.Module() for _ in chans])
        cin = chans[-1]
        for i in reversed(range(len(chans))):
            lvl = dec.up[i]
            lvl.block = nn.ModuleList([_Res(cin if j == 0 else chans[i], chans[i], g) for j in range(2)])
            lvl.attn = nn.ModuleList()
            if i != 0:
                lvl.upsample = nn.Module()
                lvl.upsample.conv = nn.Conv2d(chans[i], chans[i], 3, padding=1)
            cin = chans[i]
        dec.conv_out = nn.Conv2d(chans[0], 3, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def encode_mean(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for lvl in e.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
        return self.quant_conv(e.conv_out(F.silu(e.norm_out(h)))).chunk(2, dim=1)[0]

    def decode(self, z):
        d = self.decoder
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(d.conv_in(self.post_quant_conv(z)))))
        for i in reversed(range(len(d.up))):
            for blk in d.up[i].block:
                h = blk(h)
            if hasattr(d.up[i], "upsample"):
                h = d.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return d.conv_out(F.silu(d.norm_out(h)))


def test_kl16_conversion_reproduces_the_ldm_model(tmp_path):
    torch.manual_seed(0)
    ldm = _LDMVAE().eval()
    with torch.no_grad():  # GroupNorm affine params away from 1/0, so a mix-up would show
        for m in ldm.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    state = {f"model.{k}": v for k, v in ldm.state_dict().items()}  # MAR's {"model": ...} flattened
    state["loss.logvar"] = torch.zeros(())  # training-only keys are skipped
    save_file(state, str(tmp_path / "kl16.safetensors"))
    config = kl16_config(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                         down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D",) * 2)
    out = convert_ldm_vae(tmp_path / "kl16.safetensors", tmp_path / "kl16", config=config)
    ae = load_autoencoder("kl16", out)
    assert (ae.channels, ae.downsample, ae.scale) == (16, 2, 0.2325)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), ldm.encode_mean(x) * 0.2325, atol=1e-5, rtol=1e-4)
        z = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(ae.decode(z * 0.2325), ldm.decode(z).clamp(-1, 1), atol=1e-5, rtol=1e-4)
    with pytest.raises(AutoencoderError, match="not found"):
        convert_ldm_vae(tmp_path / "kl16.ckpt", tmp_path / "x")


def test_full_kl16_config_is_16x_16_channels():
    cfg = kl16_config()
    assert cfg["latent_channels"] == 16 and 2 ** (len(cfg["block_out_channels"]) - 1) == 16
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**cfg)
    names = {k for k, _ in vae.named_parameters()}
    assert "encoder.down_blocks.4.attentions.1.to_q.weight" in names  # attention at 16 px, encoder only
    assert not any(".attentions." in k for k in names if k.startswith("decoder.up_blocks"))


def _ldm_kl16_shapes(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, z=16, attn_px=16, px=256) -> dict[str, tuple]:
    """Every parameter name and shape of MAR's KL-16 in LDM layout, derived from its structure:
    encoder levels of ``blocks`` res blocks (attention after each at ``attn_px``), a stride-2 conv
    between levels; mid block_1/attn_1/block_2; decoder levels of ``blocks`` + 1 res blocks, listed
    as up[level] with level 0 at the output, no attention; 1x1 quant convs."""
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, k=3):
        shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(top, c):
        res(f"{top}.mid.block_1", c, c), attn(f"{top}.mid.attn_1", c), res(f"{top}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch)
    cin, size = ch, px
    for i, m in enumerate(mult):
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if size == attn_px:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
            size //= 2
    mid("encoder", cin), norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, 2 * z)
    conv("decoder.conv_in", z, cin), mid("decoder", cin)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    return shapes


def _tiny_kl16_config() -> dict:
    """kl16_config() shrunk to 2 levels of 8/16 channels, attention in the last encoder level."""
    return kl16_config(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                       down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                       up_block_types=("UpDecoderBlock2D",) * 2)


def test_every_full_size_kl16_key_maps_onto_kl16_config():
    """The real KL-16's ~250 LDM names (not just the tiny test model's) map one-to-one onto the
    diffusers model of ``kl16_config()``, with the same shapes after the 1x1-conv -> linear step."""
    from causalfusion.autoencoders import convert_ldm_state_dict

    ldm = {k: torch.empty(s, device="meta") for k, s in _ldm_kl16_shapes().items()}
    converted = convert_ldm_state_dict(ldm, kl16_config())
    assert len(converted) == len(ldm)  # nothing dropped, no two names merged
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in diffusers.AutoencoderKL(**kl16_config()).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want


@pytest.mark.parametrize("key", ["encoder.mid.attn_2.q.weight", "encoder.down.4.attn.0.qkv.weight",
                                 "encoder.mid.block_3.conv1.weight", "decoder.down.0.block.0.conv1.weight",
                                 "decoder.up.5.block.0.conv1.weight", "encoder.down.x.block.0.conv1.weight",
                                 "encoder.conv_in", "first_stage_model.encoder.conv_in.weight"])
def test_unknown_ldm_keys_are_refused_in_one_line(tmp_path, key):
    """A name outside the LDM layout (a second mid attention, a fused qkv, a level past the last,
    another model's prefix) is an AutoencoderError naming the key, never a silent guess."""
    from causalfusion.autoencoders import ldm_to_diffusers_key

    with pytest.raises(AutoencoderError, match="unexpected key"):
        ldm_to_diffusers_key(key, 5)
    shapes = _ldm_kl16_shapes(ch=8, mult=(1, 2), blocks=1, attn_px=8, px=16)
    save_file({**{k: torch.zeros(s) for k, s in shapes.items()}, key: torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(AutoencoderError, match="unexpected key"):
        convert_ldm_vae(tmp_path / "w.safetensors", tmp_path / "out", config=_tiny_kl16_config())
    assert not (tmp_path / "out").exists()


def test_wrong_shapes_are_refused_in_one_line(tmp_path):
    shapes = _ldm_kl16_shapes(ch=8, mult=(1, 2), blocks=1, attn_px=8, px=16, z=4)  # 4 latent channels, not 16
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(AutoencoderError, match="does not fit the VAE config: size mismatch") as e:
        convert_ldm_vae(tmp_path / "w.safetensors", tmp_path / "out", config=_tiny_kl16_config())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("channels", [4, 16])
def test_sample_grids_of_a_latent_run_without_its_vae_show_latents(tmp_path, capsys, channels):
    """Training from a cache on a machine without the VAE weights: the grids show the first 3 latent
    channels, with a warning (16 KL-16 channels used to stop the run with PIL's TypeError)."""
    from PIL import Image

    from causalfusion.ar_plan import ARPlanConfig
    from causalfusion.data import Dataset
    from causalfusion.models import ModelConfig
    from causalfusion.trainer import TrainConfig, Trainer

    ds = Dataset("latents:x", 2, 4, channels, torch.tensor([0, 1]), images=torch.randn(2, channels, 4, 4))
    ds.autoencoder = {"kind": "kl16", "channels": channels, "downsample": 16, "scale": 0.2325, "shift": 0.0,
                      "path": str(tmp_path / "gone"), "image_channels": 3, "image_size": 64}
    model = ModelConfig(image_size=4, in_channels=channels, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                        num_classes=2, class_tokens=1)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=2, sample_every=0, progress=False,
                      samples_per_class=2, sample_steps=2)
    path = Trainer(model, ARPlanConfig(), cfg, dataset=ds).sample_grid()
    assert "sample grids show latents" in capsys.readouterr().out
    assert Image.open(path).mode == "RGB"


def test_posterior_is_shifted_and_scaled(tmp_path):
    """encode_posterior gives the model-space posterior: mean (μ - shift)·scale, std σ·scale."""
    from causalfusion.autoencoders import DiffusersAutoencoder

    save_tiny_vae(tmp_path / "vae")
    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    ae = DiffusersAutoencoder("sd-vae", tmp_path / "vae", shift=0.3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
    mean, std = ae.encode_posterior(x)
    torch.testing.assert_close(mean, (d.mean - 0.3) * ae.scale)
    torch.testing.assert_close(std, d.std * ae.scale)
    # decode undoes the shift and the scale exactly once: encode -> decode is the VAE's own decode of μ
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(mean), vae.decode(d.mean).sample.clamp(-1, 1), atol=1e-5, rtol=1e-4)


def test_bf16_vae_takes_and_gives_float32_on_the_cpu(tmp_path):
    """A VAE held in bf16 (GPU memory) still hands float32 latents and images to the library, close
    to the fp32 VAE's; the latent is unscaled in float32 before the cast (no bf16 division)."""
    save_tiny_vae(tmp_path / "vae")
    fp32 = load_autoencoder("sd-vae", tmp_path / "vae")
    bf16 = load_autoencoder("sd-vae", tmp_path / "vae", dtype=torch.bfloat16)
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, std = bf16.encode_posterior(x)
    assert z.dtype == std.dtype == torch.float32 and z.device.type == "cpu"
    torch.testing.assert_close(z, fp32.encode(x), atol=0.02 * z.abs().max().item(), rtol=0)
    img = bf16.decode(z)
    assert img.dtype == torch.float32 and img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(img, fp32.decode(z), atol=0.1, rtol=0)


def test_a_vae_with_a_nan_weight_is_refused_naming_the_file_and_tensor(tmp_path):
    from safetensors.torch import load_file

    save_tiny_vae(tmp_path / "vae")
    f = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(AutoencoderError, match=f"non-finite.*{name}"):
        autoencoder_from_spec({"kind": "sd-vae"}, tmp_path / "vae", check=False)
