"""Linear-beta DDPM with respacing, fixed large variance, DDPM-ancestral and DDIM updates.

All schedule tensors are float64 on the CPU; per-call coefficients are cast to the input's
dtype/device. ``t`` always means the *original* 0..999 timestep the model was trained on; a
respaced schedule keeps ``timesteps`` (its kept original steps) so the model sees the same t.
"""
from __future__ import annotations

import torch


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` original steps spread evenly over 0..num_timesteps-1, both ends kept."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"number of sampling steps must be in 1..{num_timesteps}, got {count}")
    if count == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def _gather(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped to broadcast against ``like`` (t's dims first, then singleton dims)."""
    out = coef.to(like.device)[t.long()].to(like.dtype)
    return out.reshape(*t.shape, *([1] * (like.ndim - t.ndim)))


class Diffusion:
    """A DDPM over ``timesteps`` (a subset of the 1000 training steps, all of them by default)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 timesteps: list[int] | None = None):
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        base = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        base_ac = torch.cumprod(1.0 - base, 0)
        self.timesteps = torch.arange(num_timesteps) if timesteps is None else torch.tensor(sorted(timesteps))
        # Respacing: keep alphā at the kept steps and re-derive the betas between them.
        ac = base_ac[self.timesteps]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas = 1.0 - ac / ac_prev
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1.0 - ac).sqrt()
        self.posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_coef_x0 = self.betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_coef_xt = (1.0 - ac_prev) * (1.0 - self.betas).sqrt() / (1.0 - ac)
        # "Fixed large" variance: beta_t, with the first replaced by the posterior variance of
        # step 1 so that log(variance) stays finite (as in DDPM/ADM).
        if len(self.betas) > 1:
            self.large_variance = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        else:
            self.large_variance = self.betas.clone()

    def __len__(self) -> int:
        return len(self.timesteps)

    def respace(self, steps: int) -> "Diffusion":
        """The same process sampled with ``steps`` evenly spaced steps (DiT/ADM respacing)."""
        return Diffusion(self.num_timesteps, self.beta_start, self.beta_end,
                         space_timesteps(self.num_timesteps, steps))

    # ---- training ----------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ā_t) x0 + sqrt(1-ā_t) eps; ``t`` indexes this schedule, shape = x0's leading dims."""
        return _gather(self.sqrt_ac, t, x0) * x0 + _gather(self.sqrt_1m_ac, t, x0) * noise

    # ---- sampling (index i into this schedule, i = len-1 .. 0) ------------------------------
    def predict_x0(self, xt: torch.Tensor, i: int, eps: torch.Tensor) -> torch.Tensor:
        ac = float(self.alphas_cumprod[i])
        return (xt - (1.0 - ac) ** 0.5 * eps) / ac ** 0.5

    def ddpm_step(self, xt: torch.Tensor, i: int, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Ancestral step x_i -> x_{i-1} with the fixed large variance (no noise at i = 0)."""
        x0 = self.predict_x0(xt, i, eps)
        mean = float(self.posterior_coef_x0[i]) * x0 + float(self.posterior_coef_xt[i]) * xt
        if i == 0:
            return mean
        return mean + float(self.large_variance[i]) ** 0.5 * noise

    def ddim_step(self, xt: torch.Tensor, i: int, eps: torch.Tensor, noise: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
        """DDIM (Song et al. 2021) step x_i -> x_{i-1}; eta=0 is deterministic."""
        x0 = self.predict_x0(xt, i, eps)
        ac, ac_prev = float(self.alphas_cumprod[i]), float(self.alphas_cumprod_prev[i])
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)) ** 0.5
        out = ac_prev ** 0.5 * x0 + max(1 - ac_prev - sigma ** 2, 0.0) ** 0.5 * eps
        return out + sigma * noise if (i > 0 and sigma > 0) else out


def epsilon_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error on the noise, per token, times the AR weight of the token (Eq. 4 with w(s,t)).

    eps_pred, noise: [..., L, P]; weights: [L] (or broadcastable to [..., L]). Returns a scalar.
    """
    per_token = (eps_pred.float() - noise.float()).pow(2).mean(-1)
    if weights is not None:
        per_token = per_token * weights.to(per_token)
    return per_token.mean()
