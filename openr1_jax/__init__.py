"""openr1-jax: the DeepSeek-R1 recipe (SFT, GRPO) in JAX for TPU pods."""

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.load import load_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__", "load_model"]
