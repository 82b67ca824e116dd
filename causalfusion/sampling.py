"""Next-token(s) diffusion sampling (paper Sec. 3, Fig. 1 and 3b).

The image is generated in S AR steps. At step s the tokens of group k_s start from pure noise and
are denoised over T diffusion steps while attending to the condition tokens and the clean tokens
of steps < s; then the new clean tokens are run once through the model to extend a per-layer
key/value cache. S=1 is plain diffusion (the In-context DiT mode of the paper's headline numbers),
S=L is token-by-token AR; any group sizes and any token order work in between.

* ``sample`` is the general sampler (DDPM ancestral with the fixed large variance, as in the
  release, or DDIM with η); ``one_step_sampler.sample_one_step`` is the original S=1 sampler, kept
  as the reference the general one must reproduce at S=1.
* With ``cache=True`` the keys/values of the condition tokens and of every finished group are
  computed once (``KVCache``, preallocated for C + L tokens) and each diffusion step processes
  only the current group. ``cache=False`` is the reference: at every diffusion step it runs the
  whole sequence [condition | clean finished groups | noisy current group] under the generalized
  causal mask. Both give the same images up to float round-off.
* The runners (``sampling_runners``) see the condition only through a ``Condition``: the embedded
  condition tokens, whether they are causal among themselves, and which rows' image tokens may see
  them. ``sample`` builds the class-token one (``class_condition``) from class ids, or takes any
  ``Condition`` in their place, e.g. a text prompt's (``multimodal.generate.text_to_image``).
* Classifier-free guidance on all channels: the conditional and null-class rows form one doubled
  batch. The cache always holds both halves (the null rows need the clean prefix too); for t
  outside the CFG interval [lo, hi) only the conditional rows run.
* Every sample draws its noise from its own generator seeded from (seed, global index), and a
  random token order from a second per-sample generator, so a sample does not depend on the
  batch it was drawn in. Noise is drawn in image layout (a full [C, H, W] draw, of which the
  current group's tokens are used), so S=1 consumes exactly the draws of ``sample_one_step``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from .progress import progress_bar

from .ar_plan import ORDERS, ARPlanConfig, equal_group_sizes, token_order
from .diffusion import Diffusion
from .generation_path import GenerationPath
from .models import CausalFusion
from .sampling_runners import CachedRunner, Condition, UncachedRunner

SAMPLERS = ("ddpm", "ddim")


# ---- per-sample randomness ---------------------------------------------------------------------
SEED_STRIDE = 1_000_003
# torch.Generator.manual_seed takes -2**63 .. 2**64 - 1 (past that: "Overflow when unpacking long
# long"), and sample i is seeded with seed * SEED_STRIDE + i: the seeds that leave room for any
# index below 2**32. A run's seed samples its grids and evaluations too, so training takes the same.
SEED_RANGE = (-(2**63 // SEED_STRIDE), (2**64 - 2**32) // SEED_STRIDE - 1)


def check_seed(seed: int, flag: str = "--seed") -> None:
    """ValueError naming ``flag`` and the range for a seed the generators cannot take."""
    lo, hi = SEED_RANGE
    try:
        value = operator.index(seed)  # Python and numpy integers; not floats, which would lose digits
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not lo <= value <= hi:
        raise ValueError(f"{flag} must be an integer in {lo}..{hi} (what the random generators take), got {seed!r}")


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the run seed and the sample's global index.
    The CPU generator keeps 32 seed bits, so seed * 1_000_003 + index is read mod 2**32: all pairs
    with seed < 4294 and index < 1_000_003 get distinct streams, and the samples of one seed are
    always distinct; larger seeds can share streams with smaller ones (seed 4295, index 0 draws as
    seed 0, index 45589)."""
    check_seed(seed)
    return [torch.Generator().manual_seed(int(seed) * SEED_STRIDE + int(i)) for i in indices]


def _mix32(x: int) -> int:
    """A bijection of 32-bit ints (odd multiply, xor-shift): the CPU generator keeps 32 seed bits."""
    x = (x * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    return x ^ (x >> 16)


def order_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """Per-sample generators for the random token order, a stream apart from the sample's noise."""
    return [torch.Generator().manual_seed(_mix32(int(seed) * SEED_STRIDE + int(i))) for i in indices]


def per_sample_randn(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack of one standard normal tensor per generator: [len(generators), *shape]."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


# ---- argument checks (each raises ValueError with one clear line) -------------------------------
def check_cfg(scale: float, interval: tuple[float, float]) -> None:
    if not (math.isfinite(scale) and scale >= 0):  # NaN would pass `scale < 0` and give black images
        raise ValueError(f"CFG scale must be a finite number >= 0, got {scale}")
    lo, hi = interval
    if not 0 <= lo <= hi <= 1000:
        raise ValueError(f"CFG interval must satisfy 0 <= lo <= hi <= 1000, got {lo:g},{hi:g}")


def check_sampler(sampler: str, eta: float, precision: str) -> None:
    """Refuse an unknown sampler, a DDIM eta that is not a finite number >= 0, or a precision other
    than fp32 / bf16, in one line each."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"DDIM eta must be a finite number >= 0, got {eta}")
    if precision not in ("fp32", "bf16"):  # fp16 is refused everywhere (unusably slow on CPU, range issues)
        raise ValueError(f"sampling precision must be fp32 or bf16, got {precision!r}")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {list(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"class ids must be in 0..{num_classes - 1} (or {num_classes} for unconditional)")


def resolve_groups(num_tokens: int, ar_steps: int | None = None, groups: Sequence[int] | None = None) -> list[int]:
    """|k_1|..|k_S|: explicit ``groups`` (must sum to L), else S equal groups (default S=1)."""
    if groups is not None:
        if ar_steps is not None:
            raise ValueError("give either the number of AR steps or the group sizes, not both")
        sizes = [int(g) for g in groups]
        if not sizes or any(g < 1 for g in sizes):
            raise ValueError(f"group sizes must be positive integers, got {','.join(map(str, sizes)) or 'none'}")
        if sum(sizes) != num_tokens:
            raise ValueError(f"group sizes {','.join(map(str, sizes))} sum to {sum(sizes)}, "
                             f"not the {num_tokens} tokens of an image")
        return sizes
    s = 1 if ar_steps is None else int(ar_steps)
    if not 1 <= s <= num_tokens:
        raise ValueError(f"number of AR steps must be in 1..{num_tokens} (tokens per image), got {s}")
    return equal_group_sizes(num_tokens, s)


def resolve_steps(steps: int | Sequence[int], num_ar_steps: int, num_timesteps: int = 1000) -> list[int]:
    """Diffusion steps of every AR step: one number for all, or one per AR step (list, array or tensor)."""
    per = [int(v) for v in torch.as_tensor(steps).reshape(-1).tolist()]
    if len(per) == 1:
        per = per * num_ar_steps
    if len(per) != num_ar_steps:
        raise ValueError(f"got {len(per)} diffusion step counts for {num_ar_steps} AR steps "
                         f"(give one number, or one per AR step)")
    bad = [v for v in per if not 1 <= v <= num_timesteps]
    if bad:
        raise ValueError(f"diffusion steps per AR step must be in 1..{num_timesteps}, got {bad[0]}")
    return per


def model_order(model: torch.nn.Module, order: str | Sequence[int] | torch.Tensor | None = None,
                block: int | None = None, dilation: int | None = None) -> tuple:
    """(order, block, dilation): the given ones, and for those left None the ones ``model`` was
    trained with (``model.trained_order``, set by ``checkpoint.load_model``), else the paper's
    random order."""
    trained = getattr(model, "trained_order", None) or {}
    given = dict(order=order, block=block, dilation=dilation)
    return tuple(trained.get(k, getattr(ARPlanConfig, k)) if v is None else v for k, v in given.items())


def resolve_order(order: str | Sequence[int] | torch.Tensor, batch: int, grid: tuple[int, int],
                  generators: list[torch.Generator] | None = None, block: int = 4, dilation: int = 2) -> torch.Tensor:
    """Token orders [B, L] (raster index of each AR position) from a name or an explicit permutation.

    ``random`` draws one permutation per sample from its own generator (``generators``).
    An explicit order is a permutation of 0..L-1 ([L], shared) or one per sample ([B, L]).
    """
    num_tokens = grid[0] * grid[1]
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown token order {order!r}; choose one of {', '.join(ORDERS)} "
                             f"or give a permutation of 0..{num_tokens - 1}")
        if order == "random":
            gens = generators if generators is not None else [None] * batch
            if len(gens) != batch:
                raise ValueError(f"need one order generator per sample, got {len(gens)} for {batch}")
            return torch.stack([torch.randperm(num_tokens, generator=g) for g in gens])
        return token_order(order, batch, grid, block=block, dilation=dilation)
    perm = torch.as_tensor(order)
    if perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError("an explicit token order must be integers")
    perm = perm.long()
    if perm.ndim == 1:
        perm = perm.unsqueeze(0).expand(batch, -1)
    if perm.ndim != 2 or perm.shape != (batch, num_tokens):
        raise ValueError(f"an explicit token order must be a permutation of 0..{num_tokens - 1} "
                         f"(length {num_tokens}), got shape {list(torch.as_tensor(order).shape)}")
    if not torch.equal(perm.sort(dim=1).values, torch.arange(num_tokens).expand(batch, -1)):
        raise ValueError(f"the token order is not a permutation of 0..{num_tokens - 1}")
    return perm.clone()


# ---- the condition and classifier-free guidance ------------------------------------------------
def class_condition(model: CausalFusion, labels: torch.Tensor, null_rows: bool) -> Condition:
    """Class ids [B] (on the model's device) -> their class tokens as a ``Condition`` [B, C, D], or
    [2B, C, D] with ``null_rows`` (CFG: the null class, last). Every row sees its class tokens."""
    y = torch.cat([labels, torch.full_like(labels, model.cfg.num_classes)]) if null_rows else labels
    return Condition(model.embed_cond(y))


def guided_output(runner, xs: torch.Tensor, pos: torch.Tensor, t: int, cfg: float,
                  interval: tuple[float, float]) -> torch.Tensor:
    """The model's output (eps, or v) for the current group's noisy tokens xs [B, n, P] at raster
    positions pos [B, n] and original timestep t, fp32; classifier-free guidance with the null rows
    batched after the conditional ones, only for t in [lo, hi) (guidance is linear, so it applies to
    eps and v alike). Outside the interval, or with cfg 1, only the conditional rows run."""
    b = xs.shape[0]
    guide = cfg != 1.0 and interval[0] <= t < interval[1]
    rows = 2 * b if guide else b
    t_in = torch.full((rows, 1), t, device=xs.device)  # one embedding per row, broadcast over tokens
    if not guide:
        return runner.output(xs, pos, t_in).float()
    out_c, out_u = runner.output(torch.cat([xs, xs]), torch.cat([pos, pos]), t_in).float().chunk(2)
    return out_u + cfg * (out_c - out_u)


def _condition(model: CausalFusion, labels: torch.Tensor | Condition, cfg: float, device: torch.device) -> Condition:
    """``sample``'s ``labels`` as a checked ``Condition``: class ids [B] embedded (with the null rows
    when ``cfg`` != 1), or a given condition that fits the model and the guidance."""
    if not isinstance(labels, Condition):
        check_labels(labels, model.cfg.num_classes)
        return class_condition(model, labels.to(device), null_rows=cfg != 1.0)
    if labels.tokens.shape[2] != model.cfg.hidden_size:
        raise ValueError(f"condition tokens are {labels.tokens.shape[2]} wide, the model {model.cfg.hidden_size}")
    if cfg != 1.0 and labels.rows % 2:
        raise ValueError(f"classifier-free guidance needs 2B condition rows (null rows last), got {labels.rows}")
    return labels


# ---- the sampler -----------------------------------------------------------------------------------
def _noise_tokens(model: CausalFusion, gens: list[torch.Generator], order_idx: torch.Tensor) -> torch.Tensor:
    """A full-image standard normal draw per sample, as tokens in AR order [B, L, P]."""
    c = model.cfg
    img = per_sample_randn(gens, (c.in_channels, c.image_size, c.image_size), order_idx.device)
    return torch.gather(model.patchify(img), 1, order_idx)


def tokens_to_images(model: CausalFusion, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Tokens in AR order [B, L, P] -> images [B, C, H, W]."""
    idx = order[..., None].expand_as(tokens)
    return model.unpatchify(torch.empty_like(tokens).scatter_(1, idx, tokens))


@torch.no_grad()
def sample(
    model: CausalFusion,
    labels: torch.Tensor | Condition,
    *,
    ar_steps: int | None = None,
    groups: Sequence[int] | None = None,
    order: str | Sequence[int] | torch.Tensor | None = None,
    steps: int | Sequence[int] = 250,
    sampler: str = "ddpm",
    eta: float = 0.0,
    cfg: float = 1.0,
    cfg_interval: tuple[float, float] = (0, 1000),
    seed: int = 0,
    first_index: int = 0,
    cache: bool = True,
    block: int | None = None,
    dilation: int | None = None,
    path: GenerationPath | None = None,
    progress: bool = False,
    precision: str = "fp32",
    known: torch.Tensor | None = None,
    known_tokens: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Next-token(s) diffusion. labels [B] (``num_classes`` = unconditional) -> images [B, C, H, W].
    ``labels`` may also be a ``Condition`` (any condition tokens, e.g. a text prompt's,
    ``multimodal.generate``): B rows, or 2B when ``cfg`` != 1 (the null rows last).

    ``ar_steps`` S (equal groups, default 1) or explicit ``groups`` |k_1|..|k_S| (sum L); ``order``
    a name of ``ORDERS`` or a permutation (None, and ``block``/``dilation`` None: the model's training
    ones, see ``model_order``); ``steps`` diffusion steps per AR step (one number, or one
    per AR step; the paper's default is 250 DDPM steps); ``sampler`` ``ddpm`` (ancestral, fixed
    large variance) or ``ddim`` with ``eta``; ``cfg``/``cfg_interval`` classifier-free guidance for
    t in [lo, hi); ``first_index`` the global index of the first sample (per-sample seeding);
    ``cache=False`` the uncached reference; ``path`` an optional ``GenerationPath`` recorder;
    ``precision`` ``fp32`` or ``bf16`` (the model under autocast, as in training; the sampler's
    arithmetic stays fp32); ``compile`` runs the model calls through ``torch.compile``
    (``compiling.CompiledCachedRunner``; needs the cache).

    Editing (``causalfusion.editing``): ``known`` images [B, C, H, W] (model space) and
    ``known_tokens`` bool [L] or [B, L] (raster token index, True = kept; the same count in every
    row) make the kept tokens a clean first AR step, committed to the cache like a finished group;
    ``ar_steps``/``groups``/``order`` then apply to the other tokens only (the order keeps its
    relative order of them), and the kept tokens come back bit-identical. With no token kept this
    is plain sampling, draw for draw.
    """
    c = model.cfg
    check_cfg(cfg, cfg_interval)
    check_sampler(sampler, eta, precision)
    if compile and not cache:
        raise ValueError("compiled sampling runs on the KV cache; drop cache=False (--no-cache) or compile")
    device = next(model.parameters()).device
    cond = _condition(model, labels, cfg, device)
    b = cond.rows // 2 if cfg != 1.0 else cond.rows
    keep = _known_tokens(known, known_tokens, b, c)  # None: nothing known, plain sampling
    n_known = 0 if keep is None else int(keep[0].sum())
    sizes = resolve_groups(c.num_tokens - n_known, ar_steps, groups) if n_known < c.num_tokens else []
    per_step = resolve_steps(steps, len(sizes)) if sizes else []
    if b == 0:
        return torch.empty(0, c.in_channels, c.image_size, c.image_size, device=device)
    num_tokens, patch_dim = c.num_tokens, c.patch_dim
    indices = range(first_index, first_index + b)
    order, block, dilation = model_order(model, order, block, dilation)
    order = resolve_order(order, b, c.grid, order_generators(seed, indices), block, dilation).to(device)
    if keep is not None:  # the known tokens first, the others in the order's relative order
        order = order.gather(1, torch.argsort((~keep.to(device).gather(1, order)).int(), dim=1, stable=True))

    gens = sample_generators(seed, indices)
    order_idx = order[..., None].expand(b, num_tokens, patch_dim)
    # bf16: the model runs under autocast (as in training); the sampler's arithmetic stays fp32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        runner = _runner(cache, compile)(model, cond)
        schedules = {n: Diffusion(prediction=c.prediction).respace(n) for n in set(per_step)}
        x = torch.zeros(b, num_tokens, patch_dim, device=device)  # AR order; finished groups are clean
        bar = progress_bar(total=sum(per_step), desc="sampling", disable=not progress, leave=False)
        start = 0
        if n_known:  # the known tokens are the clean first AR step: exact copies, committed like a finished group
            x[:, :n_known] = torch.gather(model.patchify(known.to(device, x.dtype)), 1, order_idx)[:, :n_known]
            if sizes:
                runner.commit(x[:, :n_known], order[:, :n_known])
            start = n_known
        for s, n in enumerate(sizes):
            diffusion, stop = schedules[per_step[s]], start + n
            pos = order[:, start:stop]
            # A full-image draw of which only this group's tokens are used: wasteful at large S, but it
            # keeps S=1 draw-for-draw equal to sample_one_step and a token's noise independent of S.
            xs = _noise_tokens(model, gens, order_idx)[:, start:stop]
            bar.set_description(f"AR step {s + 1}/{len(sizes)}")
            for i in range(len(diffusion) - 1, -1, -1):
                out = guided_output(runner, xs, pos, int(diffusion.timesteps[i]), cfg, cfg_interval)
                if path is not None and path.wants(s, len(sizes), i, len(diffusion)):
                    x0 = diffusion.predict_x0(xs, i, out)
                    _record(path, model, x, start, stop, x0 if path.show == "x0" else xs, order, s, len(sizes), i)
                need_noise = i > 0 and (sampler == "ddpm" or eta > 0)
                noise = _noise_tokens(model, gens, order_idx)[:, start:stop] if need_noise else torch.zeros_like(xs)
                if sampler == "ddpm":
                    xs = diffusion.ddpm_step(xs, i, out, noise)
                else:
                    xs = diffusion.ddim_step(xs, i, out, noise, eta)
                bar.update(1)
            x[:, start:stop] = xs
            if s < len(sizes) - 1:  # the last group's clean tokens are never looked at
                runner.commit(xs, pos)
            start = stop
        bar.close()
    images = tokens_to_images(model, x, order)
    if path is not None:
        path.finish(images)
    return images


def _runner(cache: bool, compile: bool) -> type:
    if compile:
        from .compiling import CompiledCachedRunner
        return CompiledCachedRunner
    return CachedRunner if cache else UncachedRunner


def _known_tokens(known: torch.Tensor | None, known_tokens: torch.Tensor | None, b: int, c) -> torch.Tensor | None:
    """Check ``sample``'s editing inputs; bool [B, L] of the kept tokens, or None when none is kept."""
    if known is None and known_tokens is None:
        return None
    if known is None or known_tokens is None:
        raise ValueError("editing needs both the known images and the known-token mask")
    want = (b, c.in_channels, c.image_size, c.image_size)
    if tuple(known.shape) != want:
        raise ValueError(f"known images must be {list(want)} (model space), got {list(known.shape)}")
    keep = torch.as_tensor(known_tokens)
    if keep.dtype != torch.bool or keep.ndim not in (1, 2) or keep.shape[-1] != c.num_tokens:
        raise ValueError(f"the known-token mask must be bool [{c.num_tokens}] or [B, {c.num_tokens}], "
                         f"got {keep.dtype} {list(keep.shape)}")
    keep = keep.expand(b, -1) if keep.ndim == 1 else keep
    if keep.shape[0] != b:
        raise ValueError(f"the known-token mask has {keep.shape[0]} rows for {b} samples")
    counts = keep.sum(1)
    if b and (counts != counts[0]).any():
        raise ValueError("every sample must keep the same number of known tokens (they form one AR step)")
    return keep.cpu() if b and counts[0] > 0 else None


def _record(path, model, x, start, stop, current, order, s, num_ar_steps, i) -> None:
    """Give the recorder the picture of this moment: finished groups clean, the current group's
    prediction (or noisy state), the groups to come marked pending."""
    tokens = x.clone()
    tokens[:, start:stop] = current
    pending = torch.zeros_like(x)
    pending[:, stop:] = 1.0
    pixels = tokens_to_images(model, pending, order)[:, :1] > 0.5
    path.add(tokens_to_images(model, tokens, order), pixels, s, num_ar_steps, i)
