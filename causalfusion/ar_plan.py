"""How a training batch is cut into AR steps (paper Sec. 5, Tab. 2, 3, 7).

* the number of AR steps S is drawn with P(S) ∝ γ^(S-1) over 1..L (γ=1: uniform, Tab. 2's
  "random"; γ→0: always S=1, i.e. In-context DiT), or fixed (Tab. 2's S_train, equal groups);
* the S-1 cut points are a uniformly random subset of {1..L-1}: one split per batch, so one
  attention mask serves the batch (as in the official release);
* the token order is a permutation of the L positions, per sample (`random`, the default) or
  fixed (`raster`, `block`, `dilated`, Tab. 3b);
* the AR loss weight falls linearly from λ at the first step towards 1 (Tab. 3c);
* t is shared by all AR steps of a sample (default) or drawn per step, and a sample may carry
  K timesteps ("K x t per AR step", Tab. 7).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ORDERS = ("random", "raster", "block", "dilated")
WEIGHTINGS = ("release", "step")


def ar_step_probs(num_tokens: int, gamma: float) -> torch.Tensor:
    """P(S) for S = 1..L, proportional to γ^(S-1). Shape [L], float64."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    s = torch.arange(num_tokens, dtype=torch.float64)
    p = torch.pow(torch.tensor(gamma, dtype=torch.float64), s)  # 0**0 == 1: γ=0 gives S=1
    return p / p.sum()


def sample_num_steps(num_tokens: int, gamma: float, generator: torch.Generator | None = None) -> int:
    """Draw S in 1..L with P(S) ∝ γ^(S-1)."""
    return int(torch.multinomial(ar_step_probs(num_tokens, gamma), 1, generator=generator)) + 1


def random_group_sizes(num_tokens: int, num_steps: int, generator: torch.Generator | None = None) -> list[int]:
    """|k_1|..|k_S| from S-1 cut points drawn uniformly without replacement from {1..L-1}."""
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"number of AR steps must be in 1..{num_tokens}, got {num_steps}")
    cuts = (torch.randperm(num_tokens - 1, generator=generator)[: num_steps - 1] + 1).sort().values
    bounds = [0] + cuts.tolist() + [num_tokens]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def equal_group_sizes(num_tokens: int, num_steps: int) -> list[int]:
    """S groups as equal as possible (exactly L/S each when S divides L; earlier groups get the rest)."""
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"number of AR steps must be in 1..{num_tokens}, got {num_steps}")
    base, extra = divmod(num_tokens, num_steps)
    return [base + (1 if i < extra else 0) for i in range(num_steps)]


def token_order(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    block: int = 4,
    dilation: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample token orders ``[B, L]``: ``order[b, i]`` is the raster index of the i-th token.

    ``raster``: row by row. ``block``: ``block x block`` tiles in raster order, raster inside each
    tile. ``dilated``: the sub-grid of every ``dilation``-th row/column first (phase (0,0), then
    (0,1), ...), each phase in raster order. ``random``: an independent permutation per sample.
    """
    h, w = grid
    n = h * w
    if kind == "random":
        return torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    rows = torch.arange(n) // w
    cols = torch.arange(n) % w
    if kind == "raster":
        key = torch.arange(n)
    elif kind == "block":
        if block < 1:
            raise ValueError(f"block size must be >= 1, got {block}")
        nbw = -(-w // block)  # tiles per row (ceil), so any grid size works
        tile = (rows // block) * nbw + cols // block
        key = tile * n + (rows % block) * block + cols % block
    elif kind == "dilated":
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        phase = (rows % dilation) * dilation + cols % dilation
        key = phase * n + torch.arange(n)
    else:
        raise ValueError(f"unknown token order {kind!r}; choose one of {', '.join(ORDERS)}")
    return torch.argsort(key).unsqueeze(0).expand(batch, n).clone()


def ar_loss_weights(group_sizes: list[int], lam: float = 2.0, mode: str = "release") -> torch.Tensor:
    """Loss weight of every token, in AR order. Shape [L].

    ``release`` (default, the official code): a step whose first token has AR index ``start``
    gets ``λ - (λ-1) * start / L``: λ for the first step, falling linearly towards 1 but never
    reaching it (two halves of L tokens: 2, then 1.5).
    ``step`` (the paper's text, Sec. 5): λ at s=1 to exactly 1 at s=S, linear in the step index
    (λ everywhere when S=1).
    """
    num_tokens, num_steps = sum(group_sizes), len(group_sizes)
    starts = torch.tensor([0] + list(group_sizes[:-1])).cumsum(0).double()
    if mode == "release":
        w = lam - (lam - 1.0) * starts / num_tokens
    elif mode == "step":
        frac = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
        w = lam - (lam - 1.0) * frac
    else:
        raise ValueError(f"unknown AR weighting {mode!r}; choose one of {', '.join(WEIGHTINGS)}")
    return torch.repeat_interleave(w, torch.tensor(group_sizes)).float()


@dataclass
class ARPlan:
    """One batch's factorisation: shared split, per-sample orders, weights and timesteps."""

    group_sizes: list[int]  # |k_1|..|k_S|, sum L
    order: torch.Tensor  # [B, L] long: raster index of each AR position
    weights: torch.Tensor  # [L] float: loss weight of each AR position
    t: torch.Tensor  # [B, K, L] long: diffusion step of each noisy token, AR order

    @property
    def num_steps(self) -> int:
        return len(self.group_sizes)


@dataclass
class ARPlanConfig:
    """Training-time choices of Sec. 5. ``fixed_steps`` > 0 overrides γ (Tab. 2)."""

    gamma: float = 0.9
    fixed_steps: int = 0
    order: str = "random"
    block: int = 4
    dilation: int = 2
    lam: float = 2.0
    weighting: str = "release"
    t_per_step: bool = False
    t_copies: int = 1

    def validate(self, num_tokens: int) -> None:
        """One clear ValueError for a plan no batch of ``num_tokens`` tokens can use."""
        ar_step_probs(num_tokens, self.gamma)  # called for its check of gamma
        if self.fixed_steps and not 1 <= self.fixed_steps <= num_tokens:
            raise ValueError(f"--ar-steps must be in 1..{num_tokens} (tokens per image), got {self.fixed_steps}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown token order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.order == "block" and self.block < 1:
            raise ValueError(f"block size must be >= 1, got {self.block}")
        if self.order == "dilated" and self.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown AR weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not self.lam >= 1.0 or self.lam == float("inf"):  # (NaN fails every comparison: written to pass none)
            raise ValueError(f"AR loss weight lambda must be a finite number >= 1, got {self.lam}")
        if self.t_copies < 1:
            raise ValueError(f"t copies must be >= 1, got {self.t_copies}")


def sample_plan(
    cfg: ARPlanConfig,
    batch: int,
    grid: tuple[int, int],
    num_timesteps: int,
    generator: torch.Generator | None = None,
) -> ARPlan:
    """Draw S, the cut points, the orders and the timesteps for one batch."""
    num_tokens = grid[0] * grid[1]
    cfg.validate(num_tokens)
    if cfg.fixed_steps:
        sizes = equal_group_sizes(num_tokens, cfg.fixed_steps)
    else:
        sizes = random_group_sizes(num_tokens, sample_num_steps(num_tokens, cfg.gamma, generator), generator)
    order = token_order(cfg.order, batch, grid, cfg.block, cfg.dilation, generator)
    k = cfg.t_copies
    if cfg.t_per_step:
        t_step = torch.randint(0, num_timesteps, (batch, k, len(sizes)), generator=generator)
        t = torch.repeat_interleave(t_step, torch.tensor(sizes), dim=2)
    else:
        t = torch.randint(0, num_timesteps, (batch, k, 1), generator=generator).expand(batch, k, num_tokens)
    return ARPlan(sizes, order, ar_loss_weights(sizes, cfg.lam, cfg.weighting), t.contiguous())
