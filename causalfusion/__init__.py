"""causalfusion: Causal Diffusion Transformers (Deng et al., 2024) in plain PyTorch."""
from .ar_plan import ARPlan, ARPlanConfig, sample_plan
from .diffusion import Diffusion
from .masks import generalized_causal_mask
from .models import PRESETS, CausalFusion, ModelConfig, count_parameters

__version__ = "0.1.0"
__all__ = ["ARPlan", "ARPlanConfig", "CausalFusion", "Diffusion", "ModelConfig", "PRESETS",
           "count_parameters", "generalized_causal_mask", "sample_plan"]
