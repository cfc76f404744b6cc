"""Attention shared by MLA and GQA: masks for packed causal rows, the XLA dot-product attention, and the
grouped-query attention of the dense students.

Legend beyond `layers.py`: G query heads per key/value head, O value head dim (differs from H in MLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models import kernels, kv_cache
from openr1_jax.models.config import GQAConfig
from openr1_jax.models.kv_cache import KVCache
from openr1_jax.models.layers import Dtype, Linear
from openr1_jax.models.rope import apply_rope


def causal_segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T, S] True where query t may attend key s: s <= t and both lie in the same packed segment."""
    T = segment_ids_BxT.shape[1]
    causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxS[None] & same_BxTxS


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxMxH: jax.Array,
    v_BxSxMxO: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v with the softmax in float32; N = M * G query heads share a key head.

    Both products run head-major ([B, M, G, T, .] x [B, M, S, .]), the layout of a plain batched matmul: with T
    ahead of the heads in an operand or the output, XLA:CPU falls back to a contraction 2-3x slower."""
    B, T, N, H = q_BxTxNxH.shape
    M = k_BxSxMxH.shape[2]
    q_BxMxGxTxH = q_BxTxNxH.reshape(B, T, M, N // M, H).transpose(0, 2, 3, 1, 4)
    k_BxMxSxH = k_BxSxMxH.transpose(0, 2, 1, 3)
    v_BxMxSxO = v_BxSxMxO.transpose(0, 2, 1, 3)
    scores = jnp.einsum("BMGTH,BMSH->BMGTS", q_BxMxGxTxH, k_BxMxSxH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxTxS[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxMxO.dtype)
    out_BxMxGxTxO = jnp.einsum("BMGTS,BMSO->BMGTO", probs, v_BxMxSxO)
    return out_BxMxGxTxO.transpose(0, 3, 1, 2, 4).reshape(B, T, N, v_BxSxMxO.shape[-1])


def attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale: float, impl: str) -> jax.Array:
    """Causal self-attention within packed segments; the backend switch (`attention_impl` in the model config):
    "xla" materialises the [T, T] scores, "pallas" runs the flash attention kernel of the platform (XLA on CPU),
    "pallas_interpret" the TPU kernel in the Pallas interpreter (tests)."""
    if impl == "xla":
        return dot_product_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, causal_segment_mask(segment_ids_BxT), scale)
    return kernels.flash_attention(
        q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale, interpret=impl == "pallas_interpret"
    )


class GQAttention(nnx.Module):
    """Qwen2/Llama attention: q, k, v projections (optional biases), rotary on q and k, M <= N kv heads."""

    def __init__(self, cfg: GQAConfig, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, M, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        bias = cfg.qkv_bias
        self.q_proj = Linear(
            "BTD,DNH->BTNH",
            (D, N, H),
            ("embed", "q_heads", "head_dim"),
            bias_shape=(N, H) if bias else None,
            bias_axes=("q_heads", "head_dim"),
            **kw,
        )
        self.k_proj = Linear(
            "BTD,DMH->BTMH",
            (D, M, H),
            ("embed", "kv_heads", "head_dim"),
            bias_shape=(M, H) if bias else None,
            bias_axes=("kv_heads", "head_dim"),
            **kw,
        )
        self.v_proj = Linear(
            "BTD,DMH->BTMH",
            (D, M, H),
            ("embed", "kv_heads", "head_dim"),
            bias_shape=(M, H) if bias else None,
            bias_axes=("kv_heads", "head_dim"),
            **kw,
        )
        self.o_proj = Linear(
            "BTNH,NHD->BTD",
            (N, H, D),
            ("q_heads", "head_dim", "embed"),
            bias_shape=(D,) if cfg.o_bias else None,
            bias_axes=("embed",),
            **kw,
        )

    def _qkv(self, x_BxTxD, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = apply_rope(self.q_proj(x_BxTxD), cos, sin, interleaved=False)
        k = apply_rope(self.k_proj(x_BxTxD), cos, sin, interleaved=False)
        return q, k, self.v_proj(x_BxTxD)

    def __call__(self, x_BxTxD, cos, sin, segment_ids_BxT):
        q, k, v = self._qkv(x_BxTxD, cos, sin)
        return self.o_proj(attention(q, k, v, segment_ids_BxT, self.cfg.softmax_scale, self.cfg.impl))

    def prefill(self, x_BxTxD, cos, sin, segment_ids_BxT, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """A prompt from position 0 of an empty cache: attention over the prompt, its keys/values cached."""
        q, k, v = self._qkv(x_BxTxD, cos, sin)
        start_B = jnp.zeros((x_BxTxD.shape[0],), jnp.int32)
        cache = KVCache(kv_cache.write(cache.k_BxSxMxH, k, start_B), kv_cache.write(cache.v_BxSxMxH, v, start_B))
        return self.o_proj(attention(q, k, v, segment_ids_BxT, self.cfg.softmax_scale, self.cfg.impl)), cache

    def decode(self, x_BxTxD, cos, sin, cache: KVCache, start_B) -> tuple[jax.Array, KVCache]:
        """T new tokens per row at positions start_B[b] + t, attending over the whole (masked) cache."""
        q, k, v = self._qkv(x_BxTxD, cos, sin)
        cache = KVCache(kv_cache.write(cache.k_BxSxMxH, k, start_B), kv_cache.write(cache.v_BxSxMxH, v, start_B))
        T, S = x_BxTxD.shape[1], cache.k_BxSxMxH.shape[1]

        def attend(L: int) -> jax.Array:  # over the first L cache positions
            mask_BxTxL = kv_cache.visible_mask(start_B, T, L)
            k, v = cache.k_BxSxMxH[:, :L], cache.v_BxSxMxH[:, :L]
            return dot_product_attention(q, k, v, mask_BxTxL, self.cfg.softmax_scale)

        out_BxTxNxH = kv_cache.over_filled_prefix(attend, jnp.max(start_B) + T, S)
        return self.o_proj(out_BxTxNxH), cache
