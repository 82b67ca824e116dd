"""The web app's logic without the web (app_core): controls, uploads, masks, and that sampling and
editing go through the library's own ``sample`` / ``edit``."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from causalfusion import app_core as core
from causalfusion.autoencoders import IdentityAutoencoder
from causalfusion.edit_masks import region_mask
from causalfusion.editing import edit
from causalfusion.sampling import sample

from conftest import make_tiny_model, one_error_line, save_run

FIELDS = dict(ar_steps=2, groups="", order="raster", sample_steps="3", cfg=1.0, cfg_interval="0,1000", seed=7)


@pytest.fixture
def am() -> core.AppModel:
    """A 1-channel 8x8 model with 5 classes (random weights) as the app holds it."""
    return core.AppModel(make_tiny_model(in_channels=1), IdentityAutoencoder(1), "tiny")


def cell(picture: np.ndarray, index: int, nrow: int, side: int, scale: int) -> np.ndarray:
    """Image ``index`` of a shown grid, back at its own size (one value per enlarged block) [side, side, 3]."""
    r, c = divmod(index, nrow)
    step = side * scale + core.PAD
    block = picture[core.PAD + r * step: core.PAD + r * step + side * scale,
                    core.PAD + c * step: core.PAD + c * step + side * scale]
    return block[scale // 2::scale, scale // 2::scale]


def to_u8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---- controls ---------------------------------------------------------------------------------------
def test_sampler_controls_become_the_library_arguments(am):
    kw = core.parse_sampler_controls(am, **{**FIELDS, "sample_steps": "4,2", "cfg": "1.5", "cfg_interval": "0,700"})
    assert kw == dict(ar_steps=2, groups=None, order="raster", steps=[4, 2], cfg=1.5, cfg_interval=(0.0, 700.0), seed=7)
    kw = core.parse_sampler_controls(am, **{**FIELDS, "groups": "4, 12", "order": ""})
    assert kw["groups"] == [4, 12] and kw["ar_steps"] is None and kw["order"] is None  # None: the run's order


@pytest.mark.parametrize("field, value, words", [
    ("ar_steps", "two", "AR steps"), ("ar_steps", 2.5, "AR steps"), ("ar_steps", 0, "AR steps"),
    ("groups", "4,x", "group sizes"), ("order", "spiral", "unknown order"), ("sample_steps", "", "diffusion steps"),
    ("cfg_interval", "700", "CFG interval"), ("cfg", "nan", "CFG scale"), ("seed", -1, "seed"),
])
def test_a_bad_control_is_one_line_naming_the_field(am, field, value, words):
    with pytest.raises(ValueError, match=words) as e:
        core.parse_sampler_controls(am, **{**FIELDS, field: value})
    assert "\n" not in str(e.value)


# ---- uploads ----------------------------------------------------------------------------------------
def test_an_upload_of_the_model_size_is_used_pixel_for_pixel(am, tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr).save(tmp_path / "digit.png")
    image, note = core.prepare_upload(tmp_path / "digit.png", am)
    assert image.shape == (1, 8, 8) and "used as it is" in note
    assert np.array_equal(to_u8(image)[0], arr)


def test_a_larger_non_square_colour_upload_is_cropped_resized_and_made_grey(am, tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60, 0] = 255  # the centre square is red, the sides black: the crop keeps the red
    Image.fromarray(arr).save(tmp_path / "wide.png")
    image, note = core.prepare_upload(tmp_path / "wide.png", am)
    assert image.shape == (1, 8, 8)
    assert "80x40" in note and "centre-cropped to 40x40" in note and "resized to 8x8" in note
    grey = to_u8(image)[0]
    assert (grey[:, 1:7] == 76).all()  # red as grey (ITU-R 601 luma); the edge columns blend a little
    assert (grey[:, [0, 7]] > 60).all()


def test_an_upload_that_is_not_an_image_is_refused_in_one_line(am, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png is not an image"):
        core.prepare_upload(tmp_path / "notes.png", am)


def test_a_model_of_other_channels_refuses_uploads(tmp_path):
    two = core.AppModel(make_tiny_model(), IdentityAutoencoder(2), "tiny")  # 2-channel images
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="2 channels"):
        core.prepare_upload(tmp_path / "a.png", two)


# ---- masks ------------------------------------------------------------------------------------------
def test_painted_strokes_mark_the_model_pixels_they_cover(am):
    k = am.scale
    layer = np.zeros((8 * k, 8 * k, 4), dtype=np.uint8)
    layer[0:k, 0:3 * k, 3] = 255  # model row 0, columns 0..2, fully painted
    layer[5 * k: 5 * k + k // 8, 6 * k: 7 * k, 3] = 255  # an eighth of pixel (5, 6): below PAINT_COVER
    layer[7 * k: 7 * k + k // 2, 7 * k: 8 * k, 3] = 128  # half of pixel (7, 7), half-transparent paint
    mask = core.painted_mask([layer], 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[0, 0:3] = True
    want[7, 7] = True
    assert torch.equal(mask, want)


def test_painted_layers_of_the_wrong_size_are_refused(am):
    with pytest.raises(ValueError, match="multiple of 8"):
        core.painted_mask([np.zeros((100, 100, 4), dtype=np.uint8)], 8)


def test_mask_choices(am):
    assert torch.equal(core.build_mask(am, "top", 0.25, None), region_mask("top", 8, 0.25))
    with pytest.raises(ValueError, match="the mask is empty"):
        core.build_mask(am, core.PAINTED, 0.5, [np.zeros((8 * am.scale, 8 * am.scale, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match="unknown mask"):
        core.build_mask(am, "spiral", 0.5, None)


# ---- sampling and editing ---------------------------------------------------------------------------
def test_sample_is_the_library_sample_shown_enlarged(am, tmp_path):
    r = core.run_sample(am, classes="1,3", n=4, gif=tmp_path / "path.gif", progress=False, **FIELDS)
    labels = torch.tensor([1, 1, 3, 3])
    direct = sample(am.model, labels, ar_steps=2, order="raster", steps=[3], seed=7)
    assert torch.equal(r.images, direct) and r.labels == labels.tolist()
    step = 8 * am.scale + core.PAD
    assert r.nrow == 2 and r.picture.shape == (2 * step + core.PAD, 2 * step + core.PAD, 3)
    for i in range(4):
        assert np.array_equal(cell(r.picture, i, r.nrow, 8, am.scale)[..., 0], to_u8(direct[i])[0])
    assert r.gif and Image.open(r.gif).n_frames > 2


def test_sample_refuses_out_of_range_classes_and_counts(am):
    with pytest.raises(ValueError, match="class 7 is out of range"):
        core.run_sample(am, classes="7", n=2, progress=False, **FIELDS)
    with pytest.raises(ValueError, match="number of images"):
        core.run_sample(am, classes="1", n=core.MAX_IMAGES + 1, progress=False, **FIELDS)


def test_edit_keeps_the_unmasked_pixels_and_is_the_library_edit(am, tmp_path):
    source = sample(am.model, torch.tensor([2]), steps=3, seed=1)[0]
    mask = core.build_mask(am, "top", 0.5, None)
    r = core.run_edit(am, source, mask, new_class=4, n=3, gif=tmp_path / "edit.gif", progress=False, **FIELDS)
    direct = edit(am.model, source, mask, 4, n=3, ar_steps=2, order="raster", steps=[3], seed=7)
    assert torch.equal(r.edits, direct)
    kept = ~r.regenerated
    assert kept[4:].all() and not kept[:4].any()
    step = 8 * am.scale + core.PAD
    assert r.picture.shape == (step + core.PAD, 5 * step + core.PAD, 3)  # original | masked | 3 variations
    original = cell(r.picture, 0, 5, 8, am.scale)[..., 0]
    assert np.array_equal(original, to_u8(source)[0])
    for i in range(3):
        shown = cell(r.picture, 2 + i, 5, 8, am.scale)[..., 0]
        assert np.array_equal(shown[kept.numpy()], original[kept.numpy()])
        assert not np.array_equal(shown, original)  # the top half was regenerated


def test_edit_refusals(am):
    mask = core.build_mask(am, "center", 0.5, None)
    image = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="no image to edit"):
        core.run_edit(am, None, mask, new_class=1, n=1, progress=False, **FIELDS)
    with pytest.raises(ValueError, match="new class must be in 0..4"):
        core.run_edit(am, image, mask, new_class=5, n=1, progress=False, **FIELDS)
    with pytest.raises(ValueError, match="AR steps must be in 1..4"):  # a centre half is 4 tokens
        core.run_edit(am, image, mask, new_class=1, n=1, progress=False, **{**FIELDS, "ar_steps": 5})


def test_a_run_directory_loads_with_its_geometry(tmp_path):
    model = make_tiny_model(in_channels=1, image_size=16)
    am = core.load_app_model(save_run(model, tmp_path / "run"))
    assert (am.size, am.channels, am.num_classes, am.scale) == (16, 1, 5, 16)
    assert am.trained_order == "random"  # a run with no plan section: the paper's order
    assert core.editor_background(torch.zeros(1, 16, 16), am).shape == (256, 256, 3)


# ---- the command ------------------------------------------------------------------------------------
def test_app_command_refuses_a_missing_run_and_a_bad_port_in_one_line(tmp_path, capsys):
    from causalfusion.cli import main

    pytest.importorskip("gradio")
    assert main(["app", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "nothing" in one_error_line(capsys)
    assert main(["app", "--ckpt", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in one_error_line(capsys)


def test_app_command_without_gradio_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from causalfusion.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app", "--ckpt", str(tmp_path)]) == 2
    assert "pip install 'causalfusion[app]'" in one_error_line(capsys)


def test_app_help_shows_the_defaults(capsys):
    from causalfusion.cli import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1)" in out and "(default: 7860)" in out
