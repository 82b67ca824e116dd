"""Autoencoders: the latent space the model is trained in (paper Sec. 4, Tab. 9 and 10).

The model never sees the autoencoder: a latent of C channels and h x h cells is just a C-channel
"image" of size h for ``ModelConfig``. Images are encoded before training (``latent_cache``) or on
the fly, and samples are decoded after sampling. Three kinds:

* ``identity``: pixel space (the default for the built-in data); ``downsample`` 1.
* ``sd-vae``: Stable Diffusion's KL-f8 VAE (4 channels, 8x), the paper's ablation setting,
  scale 0.18215. Loaded with diffusers' ``AutoencoderKL`` from a local directory, or from a
  Hugging Face repo id that is already in the local cache (default ``stabilityai/sd-vae-ft-ema``).
* ``kl16``: the KL-16 VAE of MAR used by the paper's system models (16 channels, 16x), scale
  0.2325; also an ``AutoencoderKL`` (see ``kl16_config``). MAR ships it as an LDM checkpoint;
  ``convert_ldm_vae`` turns its weights (as safetensors) into a diffusers directory.

Nothing is ever downloaded (``local_files_only``) and only safetensors weights are read.
``encode`` returns ``(mean - shift) * scale`` of the posterior; ``encode_posterior`` also its
standard deviation, so that training can draw a fresh latent from the posterior for every batch,
as DiT and MAR do (``sample_posterior``); ``decode`` inverts the scaling and returns images in [-1, 1].
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .files import check_dir_path

KINDS = ("identity", "sd-vae", "kl16")
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Paper values: SD-VAE scale 0.18215 (Tab. 9), KL-16 scale 0.2325 (MAR, Tab. 10).
DEFAULTS = {
    "sd-vae": dict(repo="stabilityai/sd-vae-ft-ema", scale=0.18215, channels=4, downsample=8),
    "kl16": dict(repo=None, scale=0.2325, channels=16, downsample=16),
}


class AutoencoderError(ValueError):
    """Missing or unusable autoencoder weights, or latents from a different autoencoder."""


class Autoencoder:
    """What the rest of the library needs from an autoencoder."""

    kind: str = "identity"
    has_posterior: bool = False  # a VAE: encode_posterior gives a non-zero std
    channels: int = 3  # latent channels (what the model sees)
    downsample: int = 1  # image size / latent size
    image_channels: int = 3

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, image_channels, H, W] in [-1, 1] -> scaled latents [B, channels, H/d, W/d] (float32, CPU)."""
        raise NotImplementedError

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (mean, std) of the scaled latent posterior, each [B, channels, H/d, W/d]."""
        mean = self.encode(images)
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, channels, h, w] -> images [B, image_channels, h*d, w*d] in [-1, 1] (float32, CPU)."""
        raise NotImplementedError

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise AutoencoderError(f"image size {image_size} is not a multiple of the {self.kind} "
                                   f"downsampling factor {self.downsample}")
        return image_size // self.downsample

    def spec(self) -> dict:
        """JSON description saved in a run's config.json and a latent cache's index.json."""
        return {"kind": self.kind, "channels": self.channels, "downsample": self.downsample,
                "image_channels": self.image_channels}


class IdentityAutoencoder(Autoencoder):
    """Pixel space: latents are the images."""

    def __init__(self, channels: int = 3):
        self.channels = self.image_channels = int(channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().cpu()


def _has_weights(d: Path) -> bool:
    return all((d / f).is_file() for f in WEIGHT_FILES)


def resolve_weights(path: str | Path | None, kind: str = "sd-vae") -> Path:
    """A local directory holding ``config.json`` + ``diffusion_pytorch_model.safetensors``.

    ``path`` is such a directory (or one with a ``vae/`` subfolder, e.g. a whole diffusers
    pipeline), or a Hugging Face repo id already in the local cache. Never downloads.
    """
    if path is None:
        path = DEFAULTS.get(kind, {}).get("repo")
        if path is None:
            raise AutoencoderError(f"the {kind} VAE needs --vae-path: a directory holding {' and '.join(WEIGHT_FILES)} "
                                   f"(convert MAR's kl16 checkpoint with `causalfusion convert-vae`)")
    p = Path(path).expanduser()
    for d in (p, p / "vae"):
        if d.is_dir() and _has_weights(d):
            return d
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        found = _from_hf_cache(str(path))
        if found is not None:
            return found
    where = f"directory {p}" if p.exists() else f"{str(path)!r} (neither a directory nor a repo id in the local Hugging Face cache)"
    raise AutoencoderError(f"{kind} VAE weights not found at {where}: expected {' and '.join(WEIGHT_FILES)} "
                           f"(a diffusers AutoencoderKL saved with save_pretrained); nothing is downloaded, "
                           f"fetch them first (e.g. `hf download {DEFAULTS['sd-vae']['repo']}`) or pass --vae-path DIR")


def _from_hf_cache(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for sub in ("", "vae/"):
        hits = [try_to_load_from_cache(repo, sub + f) for f in WEIGHT_FILES]
        if all(isinstance(h, str) for h in hits) and len({str(Path(h).parent) for h in hits}) == 1:
            return Path(hits[0]).parent
    return None


def weights_digest(weights_dir: Path) -> str:
    """sha256 of the weights file: tells two VAEs of the same architecture apart (ft-EMA vs ft-MSE)."""
    h = hashlib.sha256()
    with open(weights_dir / WEIGHT_FILES[1], "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class DiffusersAutoencoder(Autoencoder):
    """SD-VAE or KL-16: a diffusers ``AutoencoderKL`` from local safetensors weights."""

    def __init__(self, kind: str, path: str | Path | None = None, scale: float | None = None,
                 shift: float | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if kind not in DEFAULTS:
            raise AutoencoderError(f"unknown VAE {kind!r}; choose one of {', '.join(KINDS)}")
        weights = resolve_weights(path, kind)
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise AutoencoderError("VAEs need diffusers: pip install -c constraints.txt -e '.[latent]'") from None
        try:
            vae = AutoencoderKL.from_pretrained(str(weights), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AutoencoderError(f"cannot load the {kind} VAE from {weights}: {first}") from None
        bad = next((k for k, v in vae.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:  # every latent and decoded image would be NaN
            raise AutoencoderError(f"{weights} holds non-finite values (NaN or inf in tensor {bad!r})")
        cfg = vae.config
        want = DEFAULTS[kind]["channels"]
        if cfg.latent_channels != want:
            raise AutoencoderError(f"{weights} holds a VAE with {cfg.latent_channels} latent channels; {kind} has {want}")
        self.kind, self.path, self.weights_dir = kind, str(path) if path is not None else DEFAULTS[kind]["repo"], weights
        self.channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale = float(scale if scale is not None else DEFAULTS[kind]["scale"])
        self.shift = float(shift if shift is not None else (getattr(cfg, "shift_factor", None) or 0.0))
        self.device, self.dtype = torch.device(device), dtype
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.digest = weights_digest(weights)

    has_posterior = True

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_posterior(images)[0]

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return ((dist.mean.float() - self.shift) * self.scale).cpu(), (dist.std.float() * self.scale).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scale + self.shift
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1).cpu()

    def spec(self) -> dict:
        return {**super().spec(), "path": self.path, "scale": self.scale, "shift": self.shift,
                "weights_sha256": self.digest}


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """mean + std * eps, eps drawn per sample from a generator seeded with ``seeds`` [B] (so a sample's
    draw does not depend on the batch or the process that loads it). mean, std: [B, C, h, w]."""
    eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return mean + std * eps


def load_autoencoder(kind: str = "identity", path: str | Path | None = None, *, channels: int = 3,
                     scale: float | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
    """``identity`` (pixel space, ``channels`` image channels), ``sd-vae`` or ``kl16``."""
    if kind == "identity":
        return IdentityAutoencoder(channels)
    return DiffusersAutoencoder(kind, path, scale=scale, device=device, dtype=dtype)


def autoencoder_from_spec(spec: dict | None, path: str | Path | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, check: bool = True) -> Autoencoder:
    """Rebuild the autoencoder a run or a cache recorded (``None``: pixel space, 3 channels).

    ``path`` overrides the recorded weights location (weights moved to another machine); with
    ``check`` the weights found must be the recorded ones (same sha256).
    """
    if not spec or spec.get("kind", "identity") == "identity":
        return IdentityAutoencoder((spec or {}).get("channels", 3))
    ae = DiffusersAutoencoder(spec["kind"], path if path is not None else spec.get("path"), scale=spec.get("scale"),
                              shift=spec.get("shift"), device=device, dtype=dtype)
    if check:
        check_same_autoencoder(spec, ae.spec(), "recorded", "loaded")
    return ae


LATENT_KEYS = ("kind", "channels", "downsample", "scale", "shift", "weights_sha256")  # the spec entries that decide the latents (not e.g. the path)


def check_same_autoencoder(a: dict | None, b: dict | None, name_a: str = "cache", name_b: str = "requested") -> None:
    """Refuse (one line) when two autoencoder specs would give different latents."""
    a = a or {"kind": "identity"}
    b = b or {"kind": "identity"}
    for key in LATENT_KEYS:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:  # only what both sides record is compared
            continue
        if va != vb:
            what = "weights (sha256)" if key == "weights_sha256" else key
            raise AutoencoderError(f"the {name_a} latents come from a different autoencoder than the {name_b} one: "
                                   f"{what} {_short(va)} vs {_short(vb)} ({a.get('kind')} vs {b.get('kind')})")


def _short(v):
    return v[:12] if isinstance(v, str) and len(v) == 64 else v


@torch.no_grad()
def decode_in_batches(ae: Autoencoder, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents [N, c, h, w] -> images [N, C, H, W], ``batch_size`` at a time (bounded memory)."""
    if isinstance(ae, IdentityAutoencoder):
        return ae.decode(latents)
    return torch.cat([ae.decode(latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])


# ---- KL-16 (MAR) as a diffusers AutoencoderKL ---------------------------------------------------
def kl16_config(**overrides) -> dict:
    """diffusers ``AutoencoderKL`` config of MAR's KL-16 (LDM KL-VAE: ch 128, ch_mult 1,1,2,2,4,
    2 res blocks per level, self-attention at 16 px in the encoder only, 16 latent channels)."""
    cfg = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 128, 256, 256, 512),
               down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
               up_block_types=("UpDecoderBlock2D",) * 5, sample_size=256, scaling_factor=DEFAULTS["kl16"]["scale"])
    cfg.update(overrides)
    return cfg


_LDM_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
              "nin_shortcut": "conv_shortcut", "norm_out": "conv_norm_out"}
_RES_PARTS = "norm1|conv1|norm2|conv2|nin_shortcut"
_ATTN_PARTS = "norm|q|k|v|proj_out"
# Every parameter name an LDM KL-VAE has (weight or bias), as one pattern per kind of layer. A name
# that fits none is an error, not a guess: a loose rule (e.g. "any mid.* that is not a block is the
# mid attention") would map two checkpoint keys onto one diffusers key and keep either silently.
_LDM_KEY = re.compile(
    r"(?P<top>encoder|decoder)\.(?:"
    r"(?P<io>conv_in|conv_out|norm_out)"
    r"|(?P<dir>down|up)\.(?P<level>\d+)\.(?:block\.(?P<res>\d+)\.(?P<res_part>" + _RES_PARTS + r")"
    r"|attn\.(?P<attn>\d+)\.(?P<attn_part>" + _ATTN_PARTS + r")|(?P<resample>downsample|upsample)\.conv)"
    r"|mid\.(?:block_(?P<mid_res>[12])\.(?P<mid_res_part>" + _RES_PARTS + r")"
    r"|attn_1\.(?P<mid_attn_part>" + _ATTN_PARTS + r"))"
    r")\.(?P<param>weight|bias)")


def ldm_to_diffusers_key(key: str, num_levels: int) -> str | None:
    """One LDM KL-VAE parameter name -> its diffusers ``AutoencoderKL`` name (None: not a VAE weight,
    i.e. the training loss's). Any other name is an ``AutoencoderError``."""
    if key.startswith("loss."):
        return None
    if re.fullmatch(r"(?:post_)?quant_conv\.(?:weight|bias)", key):
        return key
    m = _LDM_KEY.fullmatch(key)
    # the encoder only goes down and the decoder only up, through the config's levels
    if m is None or (m["dir"] is not None and (m["dir"] == "down") != (m["top"] == "encoder")) or (
            m["level"] is not None and int(m["level"]) >= num_levels):
        raise AutoencoderError(f"unexpected key {key!r} in an LDM KL-VAE checkpoint "
                               f"(for a VAE of {num_levels} levels)")
    if m["io"]:
        new = [_LDM_PARTS.get(m["io"], m["io"])]
    elif m["dir"]:
        level = int(m["level"])  # LDM numbers the decoder's levels from the output; diffusers from the input
        new = [f"down_blocks.{level}" if m["dir"] == "down" else f"up_blocks.{num_levels - 1 - level}"]
        if m["res"] is not None:
            new += ["resnets", m["res"], _LDM_PARTS.get(m["res_part"], m["res_part"])]
        elif m["attn"] is not None:
            new += ["attentions", m["attn"], _LDM_PARTS[m["attn_part"]]]
        else:
            new += ["downsamplers" if m["resample"] == "downsample" else "upsamplers", "0", "conv"]
    elif m["mid_res"]:
        new = ["mid_block", "resnets", str(int(m["mid_res"]) - 1), _LDM_PARTS.get(m["mid_res_part"], m["mid_res_part"])]
    else:
        new = ["mid_block", "attentions", "0", _LDM_PARTS[m["mid_attn_part"]]]
    return ".".join([m["top"], *new, m["param"]])


def convert_ldm_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """LDM/MAR KL-VAE weights -> diffusers ``AutoencoderKL`` weights for ``config``."""
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = ldm_to_diffusers_key(key, levels)  # one-to-one: no two LDM names give the same new name
        if new is None:
            continue
        if ".attentions." in new and new.rsplit(".", 1)[-1] == "weight" and value.ndim == 4:
            value = value[:, :, 0, 0]  # LDM's 1x1 convolutions are diffusers' linear layers
        out[new] = value
    return out


def _read_ldm_weights(src: Path) -> dict[str, torch.Tensor]:
    """An LDM VAE's tensors from a .safetensors file or a torch.save checkpoint (``{"model": ...}``)."""
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(src))
        except Exception as e:  # safetensors raises several error types for damaged files
            raise AutoencoderError(f"{src} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    from .torch_files import load_torch_file

    obj = load_torch_file(src)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AutoencoderError(f"{src} is not an LDM VAE checkpoint (a state dict, or a dict with one under 'model')")
    return state


def convert_ldm_vae(src: str | Path, out_dir: str | Path, config: dict | None = None) -> Path:
    """Convert LDM-format KL-VAE weights into a diffusers directory that ``--vae kl16 --vae-path OUT``
    loads: a ``.safetensors`` state dict, or MAR's ``kl16.ckpt`` as published (``{"model": state dict}``,
    read with ``torch_files.load_torch_file``: plain data only, never run). Returns ``out_dir``."""
    check_dir_path(out_dir)  # before the conversion, not at its save
    src = Path(src)
    if not src.is_file():
        raise AutoencoderError(f"{src} not found")
    from diffusers import AutoencoderKL

    config = config or kl16_config()
    state = _read_ldm_weights(src)
    if any(k.startswith("model.") for k in state):  # a {"model": state_dict} checkpoint flattened with a prefix
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    vae = AutoencoderKL(**config)
    try:
        missing, unexpected = vae.load_state_dict(convert_ldm_state_dict(state, config), strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape (another ch / ch_mult / z_channels)
        first = str(e).strip().splitlines()
        raise AutoencoderError(f"{src} does not fit the VAE config: {first[1].strip() if len(first) > 1 else first[0]}") from None
    if missing or unexpected:
        raise AutoencoderError(f"{src} does not fit the VAE config: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    out_dir = Path(out_dir)
    vae.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "causalfusion_source.json").write_text(json.dumps({"converted_from": str(src)}, indent=2))
    return out_dir
