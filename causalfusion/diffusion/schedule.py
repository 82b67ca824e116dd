"""Linear-beta DDPM with respacing, fixed large variance, DDPM-ancestral and DDIM updates.

What the network predicts is ``prediction``: ``eps`` (the noise; the paper and its release, as
in DiT) or ``v`` (sqrt(ā) eps - sqrt(1-ā) x0, Salimans & Ho 2022). Every sampler update takes the
raw model output and converts it with ``predict_x0`` / ``predict_eps``; training regresses
``target``. v is offered for small pixel-space images: there most of the linear schedule's steps
have almost no signal left, an eps model's tiny errors are multiplied by 1/sqrt(ā) in its x0
estimate, and the layout decided at those steps comes out as noise (docs/multimodal.md).

All schedule tensors are float64 on the CPU; per-call coefficients are cast to the input's
dtype/device. ``t`` always means the *original* 0..999 timestep the model was trained on; a
respaced schedule keeps ``timesteps`` (its kept original steps) so the model sees the same t.
"""
from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` original steps spread evenly over 0..num_timesteps-1, both ends kept."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"number of sampling steps must be in 1..{num_timesteps}, got {count}")
    if count == 1:
        return [num_timesteps - 1]
    # ADM/DiT's respacing exactly: the stride is accumulated (not multiplied), which decides the
    # rounding ties (with 21 steps t=499 is kept, not 500); a single step starts from the last t
    stride, cur, kept = (num_timesteps - 1) / (count - 1), 0.0, set()
    for _ in range(count):
        kept.add(round(cur))
        cur += stride
    return sorted(kept)


def _gather(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped to broadcast against ``like`` (t's dims first, then singleton dims)."""
    out = coef.to(like.device)[t.long()].to(like.dtype)
    return out.reshape(*t.shape, *([1] * (like.ndim - t.ndim)))


class Diffusion:
    """A DDPM over ``timesteps`` (a subset of the 1000 training steps, all of them by default)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 timesteps: list[int] | None = None, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.num_timesteps, self.prediction = num_timesteps, prediction
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

    def check_model(self, model_prediction: str) -> None:
        """Refuse to pair this process with a model whose head means something else: a v model
        trained on eps targets would fail silently, so the losses call this."""
        if model_prediction != self.prediction:
            raise ValueError(f"the model predicts {model_prediction} but this Diffusion is built for "
                             f"{self.prediction}: use Diffusion(prediction=model.cfg.prediction)")

    def respace(self, steps: int) -> "Diffusion":
        """The same process sampled with ``steps`` evenly spaced steps (DiT/ADM respacing)."""
        return Diffusion(self.num_timesteps, self.beta_start, self.beta_end,
                         space_timesteps(self.num_timesteps, steps), self.prediction)

    # ---- training ----------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ā_t) x0 + sqrt(1-ā_t) eps; ``t`` indexes this schedule (the original 0..999 step
        for the full training schedule, which is what training uses), shape = x0's leading dims."""
        return _gather(self.sqrt_ac, t, x0) * x0 + _gather(self.sqrt_1m_ac, t, x0) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses for x_t = q_sample(x0, t, noise): the noise, or v."""
        if self.prediction == "eps":
            return noise
        return _gather(self.sqrt_ac, t, x0) * noise - _gather(self.sqrt_1m_ac, t, x0) * x0

    # ---- sampling (index i into this schedule, i = len-1 .. 0; ``out`` = the model's output) --
    def predict_x0(self, xt: torch.Tensor, i: int, out: torch.Tensor) -> torch.Tensor:
        """x0 from x_t and the model output at respaced index ``i`` (eps or v); any shape, out like xt."""
        ac = float(self.alphas_cumprod[i])
        if self.prediction == "v":
            return ac ** 0.5 * xt - (1.0 - ac) ** 0.5 * out
        return (xt - (1.0 - ac) ** 0.5 * out) / ac ** 0.5

    def predict_eps(self, xt: torch.Tensor, i: int, out: torch.Tensor) -> torch.Tensor:
        """eps from x_t and the model output at respaced index ``i`` (eps or v); any shape, out like xt."""
        if self.prediction == "eps":
            return out
        ac = float(self.alphas_cumprod[i])
        return (1.0 - ac) ** 0.5 * xt + ac ** 0.5 * out

    def ddpm_step(self, xt: torch.Tensor, i: int, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Ancestral step x_i -> x_{i-1} with the fixed large variance (no noise at i = 0)."""
        x0 = self.predict_x0(xt, i, out)
        mean = float(self.posterior_coef_x0[i]) * x0 + float(self.posterior_coef_xt[i]) * xt
        if i == 0:
            return mean
        return mean + float(self.large_variance[i]) ** 0.5 * noise

    def ddim_step(self, xt: torch.Tensor, i: int, out: torch.Tensor, noise: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
        """DDIM (Song et al. 2021) step x_i -> x_{i-1}; eta=0 is deterministic."""
        x0, eps = self.predict_x0(xt, i, out), self.predict_eps(xt, i, out)
        ac, ac_prev = float(self.alphas_cumprod[i]), float(self.alphas_cumprod_prev[i])
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)) ** 0.5
        out = ac_prev ** 0.5 * x0 + max(1 - ac_prev - sigma ** 2, 0.0) ** 0.5 * eps
        return out + sigma * noise if (i > 0 and sigma > 0) else out


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error on the target (the noise, or v), per token, times the AR weight of the
    token (Eq. 4 with w(s,t)). pred, target: [..., L, P]; weights: [L] (or broadcastable to
    [..., L]). Returns a scalar: the plain mean of w * MSE, not divided by the mean weight (the
    facts from the release name no normalisation), so the loss scale, and how often the gradient
    clip at 1.0 acts, grow with lambda and with the share of tokens in early AR steps.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(-1)
    if weights is not None:
        per_token = per_token * weights.to(per_token)
    return per_token.mean()
