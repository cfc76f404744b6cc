"""Ablation sweeps (`openr1-jax ablate`): arms x seeds of an SFT or GRPO recipe, a results table and plots."""

from openr1_jax.ablate.config import SweepConfig, load_sweep_config
from openr1_jax.ablate.runner import AblationResult, run_ablation

__all__ = ["AblationResult", "SweepConfig", "load_sweep_config", "run_ablation"]
