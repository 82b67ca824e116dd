"""`convert-release`: tiny checkpoints in the authors' exact layout (bare state dict; training
checkpoint with args, optimizer and scheduler) convert into folders whose tensors are the source's
under the mapping and whose model computes what a forward written here from the source tensors
computes; crafted, truncated and mis-shaped files are refused in one line, writing nothing."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_error_line
from release_layout import release_state, save_release

from causalfusion.checkpoint import load_model
from causalfusion.cli import main
from causalfusion.models import ModelConfig, sincos_pos_embed_2d

FULL_ARGS = dict(model="CausalFusion-XL", image_size=64, num_classes=5, lr=1e-4)  # 64 px -> 4x4 latents


def expected_name(key: str) -> str:
    """The mapping the release's names follow onto this library's model, spelled out per part."""
    parts = {"x_proj": "input_proj", "y_embedder.embedding_table": "class_embed", "cond_pos_embed": "cond_pos",
             "final_layer.0": "final_norm", "final_layer.1": "head", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
    for old, new in parts.items():
        key = key.replace(old, new)
    return key


def reference_output(s: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """The release's one-AR-step forward, computed directly from its tensors: [cond tokens | image
    tokens], the condition seeing only itself; pre-LN blocks with head-wise QK LayerNorm."""
    b, c, hgt, wid = x.shape
    p, width = patch, s["x_proj.weight"].shape[0]
    tok = x.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)

    def ln(h, name):
        return F.layer_norm(h, (h.shape[-1],), s[name + ".weight"], s[name + ".bias"], 1e-5)

    def lin(h, name, bias=True):
        out = h @ s[name + ".weight"].T
        return out + s[name + ".bias"] if bias else out

    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    ang = t[:, None].float() * freqs
    temb = lin(F.silu(lin(torch.cat([torch.cos(ang), torch.sin(ang)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond_n = s["cond_pos_embed"].shape[1]
    cond = s["y_embedder.embedding_table.weight"][y].view(b, cond_n, width) + s["cond_pos_embed"][0]
    h = torch.cat([cond, lin(tok, "x_proj") + s["pos_embed"][0] + temb[:, None]], 1)
    n, hd = h.shape[1], width // heads
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[:cond_n, cond_n:] = False
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        q, k, v = lin(ln(h, pre + "norm1"), pre + "attn.qkv", bias=False).view(b, n, 3, heads, hd).unbind(2)
        q, k = ln(q, pre + "attn.q_norm"), ln(k, pre + "attn.k_norm")
        att = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(hd)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + lin(torch.einsum("bhnm,bmhd->bnhd", att, v).reshape(b, n, width), pre + "attn.proj")
        h = h + lin(F.gelu(lin(ln(h, pre + "norm2"), pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
    out = lin(ln(h[:, cond_n:], "final_layer.0"), "final_layer.1")
    g = hgt // p
    return out.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hgt, wid)


@pytest.mark.parametrize("form", ["bare", "full"])
def test_converted_tensors_and_outputs_equal_the_release(tmp_path, form):
    # full: 4 image tokens of 16 values on 64 px (4x4 latents) -> patch 2 of 4 channels
    state = release_state(tokens=4 if form == "full" else 16, patch_dim=16)
    save_release(tmp_path / "ck.pt", state, full=form == "full", args=FULL_ARGS, raw=release_state(seed=7, tokens=4))
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 0
    model = load_model(tmp_path / "m")
    c = model.cfg
    assert (c.depth, c.hidden_size, c.num_heads, c.num_classes, c.class_tokens) == (2, 32, 4, 5, 3)
    assert (c.patch_size, c.in_channels, c.image_size) == ((2, 4, 4) if form == "full" else (1, 16, 4))
    got = model.state_dict()
    assert len(got) == len(state)
    for key, value in state.items():  # the EMA weights (the full form's "model" ones differ)
        assert torch.equal(got[expected_name(key)], value[0] if key in ("pos_embed", "cond_pos_embed") else value), key
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, c.in_channels, c.image_size, c.image_size, generator=g)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])  # 5: the null class
    with torch.no_grad():
        torch.testing.assert_close(model.predict_one_step(x, t, y),
                                   reference_output(state, x, t, y, heads=4, patch=c.patch_size), atol=1e-5, rtol=1e-5)


def test_release_sincos_order_is_column_first_and_default_stays_row_first():
    def axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    rows, cols = np.divmod(np.arange(12), 4)  # a 3x4 grid in raster order
    col_first = torch.from_numpy(np.concatenate([axis(8, cols), axis(8, rows)], 1)).float()
    row_first = torch.from_numpy(np.concatenate([axis(8, rows), axis(8, cols)], 1)).float()
    assert torch.equal(sincos_pos_embed_2d(16, (3, 4), "col-row"), col_first)
    assert torch.equal(sincos_pos_embed_2d(16, (3, 4)), row_first)
    assert ModelConfig.from_dict({"image_size": 8}).pos_order == "row-col"  # a config saved without the field


class _CreatesFile:
    """Unpickling this creates ``path``: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path, capsys):
    target = tmp_path / "created"
    pickle.loads(pickle.dumps(_CreatesFile(target))).close()  # the payload works when unpickled unsafely
    assert target.exists()
    target.unlink()
    torch.save({"ema": release_state(), "args": _CreatesFile(target)}, tmp_path / "evil.pt")
    assert main(["convert-release", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "refused" in one_error_line(capsys)
    assert not target.exists() and not (tmp_path / "m").exists()


def _truncated(tmp_path):
    save_release(tmp_path / "ok.pt", release_state())
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "ck.pt").write_bytes(data[: len(data) // 2])


def _wrong_shape(tmp_path):
    s = release_state()
    s["blocks.1.attn.proj.weight"] = torch.zeros(32, 31)
    save_release(tmp_path / "ck.pt", s)


def _unknown_key(tmp_path):
    save_release(tmp_path / "ck.pt", {**release_state(), "blocks.0.attn.qkv.bias": torch.zeros(96)})


def _wrong_classes(tmp_path):
    save_release(tmp_path / "ck.pt", release_state(), full=True, args={**FULL_ARGS, "num_classes": 1000})


@pytest.mark.parametrize("make, words", [(_truncated, "truncated"), (_wrong_shape, "blocks.1.attn.proj.weight"),
                                         (_unknown_key, "unknown key 'blocks.0.attn.qkv.bias'"),
                                         (_wrong_classes, "num_classes")])
def test_bad_files_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, make, words):
    make(tmp_path)
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "m").exists()


def test_an_existing_model_folder_is_not_overwritten(tmp_path, capsys):
    save_release(tmp_path / "ck.pt", release_state())
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 0
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    save_release(tmp_path / "ck.pt", release_state(seed=3))
    assert main(["convert-release", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "already holds" in one_error_line(capsys)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
