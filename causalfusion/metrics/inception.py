"""Inception-v3 in plain PyTorch (no torchvision) and an extractor that loads it from a local file.

Expected weights (nothing is downloaded at run time; fetch the file once yourself):

* **FID Inception** (default, what FID/IS numbers in papers use): the TF ``inception-2015-12-05``
  graph ported to PyTorch, ``pt_inception-2015-12-05-6726825d.pth`` from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same keys and also works).
  1008 classes; pooling as in the TF graph (average pools ignore padding, last block max-pools).
* **torchvision** ``inception_v3_google-*.pth`` state dict: 1000 classes, torchvision pooling;
  its ``AuxLogits.*`` entries are ignored. Features differ from the FID network: not comparable.

Format: a flat ``{name: tensor}`` state dict, either a ``torch.save`` file (read with
``torch.load(weights_only=True)``, so no arbitrary unpickling) or a ``.safetensors`` file. Key names
follow torchvision's ``Inception3``: ``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.{weight,bias,
running_mean,running_var}``, ... ``Mixed_5b.branch1x1.conv.weight``, ... ``Mixed_7c.branch_pool.bn.*``,
``fc.weight`` [K, 2048], ``fc.bias`` [K]; ``num_batches_tracked`` and a ``module.`` prefix are ignored.
The variant is inferred from K (1008 -> "fid", 1000 -> "torchvision").

Inputs are resized bilinearly to 299x299 (as pytorch-fid does; torch-fidelity/ADM's TF resize differ
slightly, so absolute FIDs agree with pytorch-fid, not bit-exactly with the TF suite) and fed in
[-1, 1], the range both weight sets expect.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .extractor import FeatureExtractor, default_cache_dir
from .preprocess import match_channels, resize

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
INPUT_SIZE = 299
VARIANTS = {1008: "fid", 1000: "torchvision"}


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Same-size 3x3 pooling of a pool branch. 'tf_avg': TF's average pool ignores the zero padding."""
    if mode == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(mode == "avg"))


def _row(c_in: int, c_mid: int, c_out: int) -> list[ConvBN]:
    """1x7 then 7x1 factorised convolutions (ordering given by the caller)."""
    return [ConvBN(c_in, c_mid, (1, 7), padding=(0, 3)), ConvBN(c_mid, c_out, (7, 1), padding=(3, 0))]


class Mixed35(nn.Module):
    """35x35 module (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class Reduce35to17(nn.Module):
    """Grid reduction Mixed_6a: stride-2 3x3 | 1x1-3x3-3x3/2 | max-pool/2 -> 768 channels at 17x17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class Mixed17(nn.Module):
    """17x17 module (Mixed_6b..e) with factorised 7x7 convolutions of width c7 -> 768 channels."""

    def __init__(self, cin: int, c7: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = _row(c7, c7, 192)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        # the double branch starts with 7x1 and alternates: 7x1, 1x7, 7x1, 1x7
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class Reduce17to8(nn.Module):
    """Grid reduction Mixed_7a -> 1280 channels at 8x8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2, self.branch7x7x3_3 = _row(192, 192, 192)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class Mixed8(nn.Module):
    """8x8 module (Mixed_7b/c) with split 1x3 / 3x1 heads -> 320 + 768 + 768 + 192 = 2048 channels."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionV3(nn.Module):
    """Inception-v3 trunk + classifier. forward: x [N, 3, 299, 299] in [-1, 1] -> (pool3 [N, 2048], logits [N, K]).

    ``variant="fid"``: the TF FID graph (pad-excluding average pools, max pool in Mixed_7c) and
    *unbiased* logits ``pool3 @ fc.weight.T`` -- what the original TF Inception Score code and
    torch-fidelity's ``logits_unbiased`` use. ``variant="torchvision"``: torchvision pooling, fc with bias.
    """

    def __init__(self, num_classes: int = 1008, variant: str = "fid"):
        super().__init__()
        if variant not in ("fid", "torchvision"):
            raise ValueError(f"variant must be 'fid' or 'torchvision', got {variant!r}")
        self.variant = variant
        avg = "tf_avg" if variant == "fid" else "avg"
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Mixed35(192, 32, avg)
        self.Mixed_5c = Mixed35(256, 64, avg)
        self.Mixed_5d = Mixed35(288, 64, avg)
        self.Mixed_6a = Reduce35to17(288)
        self.Mixed_6b = Mixed17(768, 128, avg)
        self.Mixed_6c = Mixed17(768, 160, avg)
        self.Mixed_6d = Mixed17(768, 160, avg)
        self.Mixed_6e = Mixed17(768, 192, avg)
        self.Mixed_7a = Reduce17to8(768)
        self.Mixed_7b = Mixed8(1280, avg)
        self.Mixed_7c = Mixed8(2048, "max" if variant == "fid" else avg)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)                      # 147 -> 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                      # 71 -> 35
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean(dim=(2, 3))                             # global average pool -> [N, 2048]
        logits = pool @ self.fc.weight.T if self.variant == "fid" else self.fc(pool)
        return pool, logits


def _clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries this model does not use (aux classifier, BN step counters, DataParallel prefix)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("AuxLogits.") or key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    return out


def load_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an Inception-v3 state dict (see module docstring) without unpickling arbitrary objects.

    Raises FileNotFoundError (missing file) or ValueError (unreadable / not a state dict).
    """
    path = Path(path).expanduser()
    hint = (f"expected an Inception-v3 state dict such as {FID_WEIGHTS_NAME} "
            f"(download it once from {FID_WEIGHTS_URL}) or a torchvision inception_v3 state dict, "
            f"saved with torch.save or as .safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"Inception-v3 weights not found at {path}: {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""  # torch's text runs to many lines
        if "weights_only" in str(err) or "Weights only" in str(err):  # torch's advice would be to unpickle it
            first = "it holds pickled objects besides tensors, and pickles are never executed here"
        raise ValueError(f"could not read Inception-v3 weights from {path} ({type(err).__name__}: {first}); "
                         f"{hint}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat {{name: tensor}} state dict; {hint}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # every feature, FID and IS would be NaN
        raise ValueError(f"{path} holds non-finite values (NaN or inf in tensor {bad!r})")
    return _clean_state_dict(state)


def build_inception(state: dict[str, torch.Tensor], variant: str = "auto") -> InceptionV3:
    """InceptionV3 with ``state`` loaded (strictly); ``variant="auto"`` picks it from fc's class count."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise ValueError("Inception-v3 state dict has no fc.weight of shape [K, 2048]; is this an Inception-v3?")
    num_classes = fc.shape[0]
    if variant == "auto":
        if num_classes not in VARIANTS:
            raise ValueError(f"cannot infer the Inception variant from {num_classes} classes; pass variant=")
        variant = VARIANTS[num_classes]
    model = InceptionV3(num_classes, variant)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Inception-v3 state dict does not match the architecture: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return model.eval().requires_grad_(False)


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 pool3 features [N, 2048] and logits [N, 1008 or 1000] from a local weights file.

    ``weights_path`` defaults to ``<cache dir>/pt_inception-2015-12-05-6726825d.pth`` (cache dir:
    $CAUSALFUSION_CACHE or ~/.cache/causalfusion). Images of any size are resized to 299x299;
    grayscale is repeated to RGB.

    No class accuracy: the logits are ImageNet's (the TF graph's 1008 outputs are not even in the
    0..999 order of ImageNet labels), so comparing them with a dataset's label ids is meaningless.
    """

    reads_data_labels = False

    def __init__(self, weights_path: str | Path | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 32, variant: str = "auto"):
        super().__init__(device, batch_size)
        path = Path(weights_path) if weights_path is not None else default_cache_dir() / FID_WEIGHTS_NAME
        self.model = build_inception(load_inception_weights(path), variant).to(self.device)
        self.name = f"inception-v3-{self.model.variant}"
        self.num_features = 2048
        self.num_classes = self.model.fc.out_features

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(resize(match_channels(x, 3), INPUT_SIZE))
