"""Pixels in and out: image files to tensors (range, layout, the ADM centre crop), tensors to uint8
(rounding, clamping) and sample grids (row-major, white padding)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from causalfusion.data import center_crop_resize, image_to_tensor
from causalfusion.images import make_grid, to_uint8


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.6 / 127.5, 1.0, 1.7]).view(1, 1, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]


def test_make_grid_is_row_major_with_white_padding():
    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    g = make_grid(imgs, nrow=2, pad=1)
    assert g.shape == (7, 7, 1)
    assert g[1, 1, 0] == 0 and g[1, 4, 0] == 128 and g[4, 1, 0] == 255  # images 0, 1 | 2
    assert g[0, 0, 0] == 255 and g[4, 4, 0] == 255  # padding and the empty slot stay white


def test_image_to_tensor_exact_range_and_layout():
    t = image_to_tensor(Image.fromarray(np.array([[0, 255, 0]], np.uint8)), 1)
    assert t.tolist() == [[[-1.0, 1.0, -1.0]]]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 2] = (255, 0, 0)
    t = image_to_tensor(Image.fromarray(rgb), 3)
    assert t.shape == (3, 2, 3) and t[0, 0, 2] == 1.0 and t[0, 1, 0] == -1.0 and t[1, 0, 2] == -1.0


def test_center_crop_takes_the_middle():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:30] = (0, 255, 0)
    a[:, 30:] = (0, 0, 255)
    out = np.asarray(center_crop_resize(Image.fromarray(a), 10))
    assert out.shape == (10, 10, 3) and (out[..., 1] > 200).all() and (out[..., 0] < 50).all()


def test_folder_batch_read_in_threads_keeps_index_order(tmp_path):
    from causalfusion.data import load_folder

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_folder(tmp_path, 16)
    idx = torch.tensor([7, 0, 11, 3, 3, 5])
    one_by_one = torch.cat([ds.get(idx[k:k + 1]) for k in range(len(idx))])
    assert torch.equal(ds.get(idx), one_by_one) and not torch.equal(one_by_one[0], one_by_one[1])


def _adm_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's recipe, step by step: RGB first, halve with BOX while the short side is >= 2x the
    target, BICUBIC-resize the short side to the target (rounded sizes), then the central square."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def test_center_crop_is_adms_recipe_for_every_image_mode():
    """A 70x150 image to 16 px goes through two BOX halvings, then BICUBIC. Palette and RGBA files
    (GIFs, PNGs) must give the pixels of their RGB conversion, as in ADM: PIL resizes P with
    NEAREST and RGBA premultiplied, so converting only after the resize differs by up to ~140."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 150, 3), dtype=np.uint8)
    alpha = (rng.integers(0, 2, (70, 150, 1)) * 255).astype(np.uint8)  # half the pixels transparent
    grey = Image.fromarray(rgb).convert("L")
    images = {"RGB": Image.fromarray(rgb), "P": Image.fromarray(rgb).quantize(64), "L": grey,
              "RGBA": Image.fromarray(np.concatenate([rgb, alpha], -1)), "LA": grey.convert("LA"),
              "CMYK": Image.fromarray(rgb).convert("CMYK")}
    for mode, img in images.items():
        assert img.mode == mode
        out = center_crop_resize(img, 16)
        assert out.size == (16, 16)
        np.testing.assert_array_equal(np.asarray(out.convert("RGB")), _adm_crop(img, 16), err_msg=mode)
    # what the data pipeline feeds the model: the same pixels, in [-1, 1]
    t = image_to_tensor(center_crop_resize(images["P"], 16), 3)
    assert torch.equal(t, torch.from_numpy(_adm_crop(images["P"], 16).copy()).permute(2, 0, 1).float() / 127.5 - 1)
