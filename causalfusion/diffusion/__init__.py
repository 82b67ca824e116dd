"""Gaussian diffusion math (DDPM, Ho et al. 2020), kept apart from the model as in DiT."""
from .schedule import PREDICTIONS, Diffusion, denoising_loss, space_timesteps

__all__ = ["PREDICTIONS", "Diffusion", "denoising_loss", "space_timesteps"]
