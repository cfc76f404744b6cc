"""MLA absorbed decode attention over the latent cache of a ragged batch (forward only: decode needs no grad).

    out = latent_decode_attention(q_latent_BxTxNxK, q_rope_BxTxNxR, latent_BxSxK, k_rope_BxSxR, start_B,
                                  scale=softmax_scale)

Row b's T new tokens sit at cache positions start_B[b] + t (already written to the cache, so
0 <= start_B[b] <= S - T); token t sees positions s <= start_B[b] + t. Equals
`openr1_jax.models.mla.latent_attention` over the same cache held positions-minor (`kv_cache.decode_layout`).

implementation: "auto" picks the Pallas TPU kernel when compiling for TPU and the XLA reference elsewhere
(`lax.platform_dependent` lowers only the compiled platform's branch); "tpu" forces the kernel (with
interpret=True it runs in the Pallas interpreter on CPU; interpret=True with "auto" does the same); "xla" is
the reference. There is no Pallas GPU version: "gpu" runs the reference, since per cache block this op is two
skinny matmuls that XLA already does well on GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .reference import latent_decode_attention_reference
from .tpu import BlockSizes, latent_decode_attention_tpu

__all__ = [
    "BlockSizes",
    "latent_decode_attention",
    "latent_decode_attention_reference",
    "latent_decode_attention_tpu",
]

IMPLEMENTATIONS = ("auto", "tpu", "gpu", "xla")


def _validate(q_latent, q_rope, latent, k_rope, start_B, scale, block_sizes, implementation) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a latent_decode.BlockSizes or None, got {type(block_sizes).__name__}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float, got {scale!r}.")
    for name, x, ndim, axes in (
        ("q_latent", q_latent, 4, "[B, T, N, K]"),
        ("q_rope", q_rope, 4, "[B, T, N, R]"),
        ("latent", latent, 3, "[B, S, K]"),
        ("k_rope", k_rope, 3, "[B, S, R]"),
    ):
        if x.ndim != ndim:
            raise ValueError(f"{name} must be {axes}, got shape {x.shape}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}.")
    B, T, N, K = q_latent.shape
    S = latent.shape[1]
    if q_rope.shape[:3] != (B, T, N):
        raise ValueError(f"q_rope's [B, T, N] must equal q_latent's {(B, T, N)}, got {q_rope.shape[:3]}.")
    if latent.shape != (B, S, K):
        raise ValueError(f"latent must be [B, S, K] with B={B} and K={K} from q_latent, got shape {latent.shape}.")
    if k_rope.shape != (B, S, q_rope.shape[-1]):
        raise ValueError(
            f"k_rope must be [B, S, R] = {(B, S, q_rope.shape[-1])} to match latent and q_rope, got {k_rope.shape}."
        )
    if T > S:
        raise ValueError(f"q_latent has T={T} new tokens, more than the cache length S={S}.")
    if q_rope.dtype != q_latent.dtype:
        raise ValueError(f"q_rope's dtype must equal q_latent's {q_latent.dtype}, got {q_rope.dtype}.")
    if k_rope.dtype != latent.dtype:
        raise ValueError(f"k_rope's dtype must equal latent's {latent.dtype}, got {k_rope.dtype}.")
    if start_B.shape != (B,) or not jnp.issubdtype(start_B.dtype, jnp.integer):
        raise ValueError(f"start_B must be an integer array of shape ({B},), got {start_B.dtype}{list(start_B.shape)}.")


def latent_decode_attention(
    q_latent_BxTxNxK: jax.Array,
    q_rope_BxTxNxR: jax.Array,
    latent_BxSxK: jax.Array,
    k_rope_BxSxR: jax.Array,
    start_B: jax.Array,
    *,
    scale: float,
    block_sizes: BlockSizes | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """softmax((q_latent . latent + q_rope . k_rope) * scale) @ latent over each row's visible cache prefix:
    [B, T, N, K] in the latent's dtype, softmax and accumulation in float32."""
    _validate(q_latent_BxTxNxK, q_rope_BxTxNxR, latent_BxSxK, k_rope_BxSxR, start_B, scale, block_sizes, implementation)
    scale = float(scale)
    # Queries and cache may differ in dtype (e.g. fp32 activations over a bf16 cache): lift the small query to
    # the common dtype (exact), never the cache.
    q_dtype = jnp.promote_types(q_latent_BxTxNxK.dtype, latent_BxSxK.dtype)
    args = (q_latent_BxTxNxK.astype(q_dtype), q_rope_BxTxNxR.astype(q_dtype), latent_BxSxK, k_rope_BxSxR, start_B)

    reference = functools.partial(latent_decode_attention_reference, scale=scale)
    kernel = functools.partial(
        latent_decode_attention_tpu, scale=scale, block_sizes=block_sizes or BlockSizes(), interpret=interpret
    )
    if implementation in ("xla", "gpu"):
        return reference(*args)
    if implementation == "tpu" or interpret:
        return kernel(*args)
    return jax.lax.platform_dependent(*args, tpu=kernel, default=reference)
