"""Generation: the batched sampler with a preallocated KV cache (MLA: latent-only, absorbed decode), the
`generate` job (distillation), and the OpenAI-compatible server."""

from openr1_jax.generate.engine import Completion, Engine, RequestOutput
from openr1_jax.generate.sampling import SamplingParams

__all__ = ["Completion", "Engine", "RequestOutput", "SamplingParams"]
