"""The CausalFusion decoder-only transformer (paper Sec. 4, Tab. 9/10; Fig. 3b).

In-context conditioning, no adaLN: the class label becomes C tokens at the front of the
sequence, the diffusion timestep embedding is *added* to the noisy image tokens, and everything
else is a plain pre-LN transformer (qkv without bias, head-wise QK LayerNorm, MLP 4x GELU-tanh).
One input projection is shared by clean and noisy tokens; 2-D sin-cos positions are added
*before* the tokens are put in AR order, so every token keeps its own position whatever the
order. The output head is zero-initialised and predicts the noise epsilon (or v, see
``diffusion.schedule``; ``ModelConfig.prediction`` says which).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .diffusion import PREDICTIONS
from .kv_cache import KVCache
from .masks import generalized_causal_mask

# depth, width, heads. S/B follow DiT; L/XL/H are the paper's Tab. 10 (the release's H has 48 layers).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(depth=6, hidden_size=192, num_heads=6),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=32, hidden_size=1280, num_heads=20),
    "H": dict(depth=40, hidden_size=1408, num_heads=22),
}


@dataclass
class ModelConfig:
    """Everything that fixes the weights' shapes, and what the output means. Saved as JSON next to
    every checkpoint."""

    image_size: int = 8  # pixels (or latent cells) per side
    in_channels: int = 1
    patch_size: int = 1
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10  # id num_classes is the null class used by classifier-free guidance
    class_tokens: int = 4  # distinct learned class tokens (paper: 4 for ablations, 64 for system)
    class_repeat: int = 1  # Tab. 8: e.g. 4 tokens repeated 16x
    learn_pos: bool = False  # fixed sin-cos (ablations) or learnable, sin-cos initialised (system)
    pos_order: str = "row-col"  # sin-cos channel halves: [row | column]; "col-row" is the release's [column | row]
    qk_norm: bool = True
    prediction: str = "eps"  # what the head outputs: the noise (paper) or v (small pixel images)

    def __post_init__(self) -> None:
        sizes = ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "class_tokens",
                 "class_repeat")
        for name in sizes + ("num_classes",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (name in sizes):
                raise ValueError(f"model {name} must be an integer >= {int(name in sizes)}, got {v!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"model mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.pos_order not in POS_ORDERS:
            raise ValueError(f"unknown pos_order {self.pos_order!r}; choose one of {', '.join(POS_ORDERS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def num_cond(self) -> int:
        return self.class_tokens * self.class_repeat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


POS_ORDERS = ("row-col", "col-row")


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], order: str = "row-col") -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[H*W, dim]``: half the channels encode the row, half the column,
    in that order ("row-col") or column first ("col-row", the authors' release)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a hidden size divisible by 4, got {dim}")

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    halves = [one_axis(dim // 2, rows), one_axis(dim // 2, cols)]
    emb = np.concatenate(halves if order == "row-col" else halves[::-1], axis=1)
    return torch.from_numpy(emb).float()


class TimestepEmbedder(nn.Module):
    """t (any shape, float or int, 0..999 scale) -> [..., hidden] via sinusoids and an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # Head-wise QK LayerNorm (normalise each head's query/key vector): stabilises large batches.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; see ``CausalFusion.run_blocks`` for ``mask`` and ``cache``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:  # keys/values of the prefix come from the cache; ours are written after it
            k, v = cache.write(layer, k, v)
        out = attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class CausalFusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.input_proj = nn.Linear(cfg.patch_dim, d)  # shared by clean and noisy tokens
        self.t_embedder = TimestepEmbedder(d)
        # One row per class holds its C class tokens side by side; the extra last row is the null
        # class of classifier-free guidance. With class_repeat > 1 the tokens are repeated and
        # cond_pos tells the copies apart (C = num_cond = class_tokens x class_repeat, Tab. 8).
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.class_tokens * d)
        self.cond_pos = nn.Parameter(torch.zeros(cfg.num_cond, d))
        pos = sincos_pos_embed_2d(d, cfg.grid, cfg.pos_order)
        if cfg.learn_pos:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.learn_pos:
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid, self.cfg.pos_order))
        nn.init.zeros_(self.head.weight)  # predict eps = 0 at start: the loss begins at 1
        nn.init.zeros_(self.head.bias)

    # ---- token <-> image -------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] in raster order."""
        p, (gh, gw), c = self.cfg.patch_size, self.cfg.grid, self.cfg.in_channels
        x = x.reshape(x.shape[0], c, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(x.shape[0], gh * gw, p * p * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] (raster order) -> [B, C, H, W]."""
        p, (gh, gw), c = self.cfg.patch_size, self.cfg.grid, self.cfg.in_channels
        x = tokens.reshape(tokens.shape[0], gh, gw, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, gh * p, gw * p)

    # ---- embeddings ------------------------------------------------------------------------
    def embed_cond(self, y: torch.Tensor) -> torch.Tensor:
        """Class ids [B] (num_classes = null) -> condition tokens [B, C, D]."""
        tok = self.class_embed(y).view(y.shape[0], self.cfg.class_tokens, self.cfg.hidden_size)
        return tok.repeat(1, self.cfg.class_repeat, 1) + self.cond_pos

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens [B, n, P] at raster positions [B, n] (and timesteps [B, n], or [B, 1] shared by the
        row's tokens, if noisy) -> [B, n, D]."""
        # F.embedding, not pos_embed[positions]: indexing's backward (index_put with accumulate) sums the
        # repeated positions in a thread-dependent order on CPU, so learnable positions would not train
        # bit-reproducibly (nor resume bit-identically); embedding's backward does.
        h = self.input_proj(tokens) + F.embedding(positions, self.pos_embed)
        return h if t is None else h + self.t_embedder(t)

    def run_blocks(self, h: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states [B, N, D] through every block -> [B, N, D]. ``mask`` bool [N, N] (or [N, prefix + N]),
        True = may attend; with ``cache`` the keys/values of its prefix are prepended and ours written after it."""
        for i, block in enumerate(self.blocks):
            h = block(h, mask, cache, i)
        return h

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, n, D] -> the model's output tokens [B, n, P] (eps, or v with ``prediction="v"``)."""
        return self.head(self.final_norm(h))

    # ---- training forward (Alg. 1 layout) ----------------------------------------------------
    def forward(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        group_sizes: list[int],
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise (or v) of every noisy token.

        x0: clean images [B, C, H, W]; xt: K noisy versions [B, K, C, H, W]; t: [B, K, L]
        timesteps in AR order (K=1 too); y: [B]; order: [B, L] (or [L], shared) raster index of each AR
        position.
        Returns output tokens [B, K, L, P] in AR order (eps, or v with ``prediction="v"``).
        """
        order = self._check_forward_shapes(x0, xt, t, y, group_sizes, order)
        mask = generalized_causal_mask(group_sizes, self.cfg.num_cond, xt.shape[1], device=x0.device)
        return self.forward_sequence(x0, xt, shared_timesteps(t), y, order, num_tokens_before_last(group_sizes), mask)

    def forward_sequence(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         order: torch.Tensor, n_clean: int, mask: torch.Tensor) -> torch.Tensor:
        """``forward`` after its checks, with no Python-side work (what ``compiling`` compiles): t [B, K, L],
        or [B, K, 1] when shared by all tokens; order [B, L]; the first ``n_clean`` tokens in AR order
        enter clean; mask bool [N, N] for N = C + n_clean + K * L. -> [B, K, L, P], AR order."""
        b, k = xt.shape[:2]
        num_tokens = self.cfg.num_tokens
        idx = order[..., None].expand(b, num_tokens, self.cfg.patch_dim)
        clean = torch.gather(self.patchify(x0), 1, idx)[:, :n_clean]
        noisy = torch.gather(self.patchify(xt.flatten(0, 1)), 1, idx.repeat_interleave(k, 0))
        h = torch.cat([
            self.embed_cond(y),
            self.embed_tokens(clean, order[:, :n_clean]),
            self.embed_tokens(noisy, order.repeat_interleave(k, 0), t.flatten(0, 1)).view(b, k * num_tokens, -1),
        ], dim=1)
        h = self.run_blocks(h, mask)
        return self.output(h[:, -k * num_tokens:]).view(b, k, num_tokens, self.cfg.patch_dim)

    def _check_forward_shapes(self, x0, xt, t, y, group_sizes, order) -> torch.Tensor:
        """One clear line for a mis-shaped ``forward`` input; a shared order [L] -> [B, L]."""
        c, b, L = self.cfg, x0.shape[0], self.cfg.num_tokens
        image = (c.in_channels, c.image_size, c.image_size)
        if tuple(x0.shape[1:]) != image:
            raise ValueError(f"x0 must be [B, {', '.join(map(str, image))}], got {list(x0.shape)}")
        if xt.ndim != 5 or xt.shape[0] != b or tuple(xt.shape[2:]) != image:
            raise ValueError(f"xt must be [B, K, {', '.join(map(str, image))}] (K noisy copies, K=1 too), "
                             f"got {list(xt.shape)}")
        if tuple(t.shape) != (b, xt.shape[1], L):
            raise ValueError(f"t must be [B, K, L] = {[b, xt.shape[1], L]} (AR order), got {list(t.shape)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y must be [B] = [{b}], got {list(y.shape)}")
        if sum(group_sizes) != L:
            raise ValueError(f"group sizes {list(group_sizes)} sum to {sum(group_sizes)}, not L={L}")
        order = order.expand(b, L) if order.ndim == 1 else order
        if tuple(order.shape) != (b, L):
            raise ValueError(f"order must be [B, L] or [L] = [{L}], got {list(order.shape)}")
        return order

    # ---- one-AR-step denoiser (S = 1, In-context DiT mode) -----------------------------------
    def predict_one_step(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """S=1: noisy images [B, C, H, W], timesteps [B], labels [B] -> output [B, C, H, W]
        (eps, or v when ``cfg.prediction`` is "v")."""
        return self.unpatchify(self.output(self.hidden_one_step(xt, y, t[:, None])))

    def hidden_one_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The S=1 sequence [condition | L image tokens in raster order]: images [B, C, H, W], labels
        [B], timesteps [B, L] or [B, 1] (None: clean tokens, no timestep) -> image-token hidden states [B, L, D].
        Condition tokens see themselves, image tokens see the condition and each other."""
        b, num_tokens = x.shape[0], self.cfg.num_tokens
        raster = torch.arange(num_tokens, device=x.device).expand(b, num_tokens)
        h = torch.cat([self.embed_cond(y), self.embed_tokens(self.patchify(x), raster, t)], dim=1)
        mask = generalized_causal_mask([num_tokens], self.cfg.num_cond, device=h.device)
        return self.run_blocks(h, mask)[:, -num_tokens:]


def shared_timesteps(t: torch.Tensor) -> torch.Tensor:
    """t [..., L] -> [..., 1] when every token of a row has the same timestep (the default plan):
    the timestep MLP then runs once per row instead of once per token (its result is broadcast)."""
    return t[..., :1] if t.shape[-1] > 1 and bool((t == t[..., :1]).all()) else t


def num_tokens_before_last(group_sizes: list[int]) -> int:
    """Clean tokens in the training sequence: all but the last AR step's."""
    return sum(group_sizes[:-1])


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of a config, built on the meta device (no memory for the weights)."""
    with torch.device("meta"):
        model = CausalFusion(cfg)
    return sum(p.numel() for p in model.parameters())
