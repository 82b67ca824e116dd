"""Gaussian diffusion math (DDPM, Ho et al. 2020), kept apart from the model as in DiT."""
from .schedule import Diffusion, epsilon_loss, space_timesteps

__all__ = ["Diffusion", "epsilon_loss", "space_timesteps"]
