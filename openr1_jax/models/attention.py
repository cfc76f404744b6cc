"""Attention shared by MLA and GQA: masks for packed causal rows, the XLA dot-product attention, and the
grouped-query attention of the dense students.

Legend beyond `layers.py`: G query heads per key/value head, O value head dim (differs from H in MLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openr1_jax.models import kernels, kv_cache
from openr1_jax.models.config import GQAConfig
from openr1_jax.models.kv_cache import KVCache
from openr1_jax.models.layers import Dtype, Linear
from openr1_jax.models.rope import apply_rope


_MASKED = jnp.finfo(jnp.float32).min


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxMxH: jax.Array,
    v_BxSxMxO: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v with the softmax in float32; N = M * G query heads share a key head.

    Both products run head-major ([B, M, G, T, .] x [B, M, S, .]), the layout of a plain batched matmul: with T
    ahead of the heads in an operand or the output, XLA:CPU falls back to a contraction 2-3x slower. Every query
    must see at least one key (true of causal rows and of the decode masks)."""
    B, T, N, H = q_BxTxNxH.shape
    M = k_BxSxMxH.shape[2]
    G = N // M
    # Query rows of one key head as one axis (g, t): plain 4-d batched matmuls, no size-1 G axis to transpose.
    q_BxMxRxH = q_BxTxNxH.reshape(B, T, M, G, H).transpose(0, 2, 3, 1, 4).reshape(B, M, G * T, H)
    k_BxMxSxH = k_BxSxMxH.transpose(0, 2, 1, 3)
    v_BxMxSxO = v_BxSxMxO.transpose(0, 2, 1, 3)
    mask_Bx1xRxS = jnp.broadcast_to(mask_BxTxS[:, None], (B, G, T, mask_BxTxS.shape[-1])).reshape(B, 1, G * T, -1)
    out_BxMxRxO = _softmax_attention(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, scale)
    O = v_BxSxMxO.shape[-1]
    return out_BxMxRxO.reshape(B, M, G, T, O).transpose(0, 3, 1, 2, 4).reshape(B, T, N, O)


def _scores(q_BxMxRxH, k_BxMxSxH, mask_Bx1xRxS, scale: float) -> jax.Array:
    scores = jnp.einsum("BMRH,BMSH->BMRS", q_BxMxRxH, k_BxMxSxH, preferred_element_type=jnp.float32)
    return jnp.where(mask_Bx1xRxS, scores * scale, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, scale: float) -> jax.Array:
    return _softmax_attention_fwd(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, scale)[0]


def _softmax_attention_fwd(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, scale: float):
    """out = (p v) / l with p = exp(s - max s), l = sum p; keeps logsumexp(s) instead of the [T, S] probabilities,
    which the backward pass recomputes from q and k (flash attention's backward, here in plain XLA): fewer passes
    over [T, S] arrays than differentiating the softmax, and no [T, S] residuals."""
    scores = _scores(q_BxMxRxH, k_BxMxSxH, mask_Bx1xRxS, scale)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - peak)
    total = jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.einsum("BMRS,BMSO->BMRO", p.astype(v_BxMxSxO.dtype), v_BxMxSxO, preferred_element_type=jnp.float32)
    out = (pv / total).astype(v_BxMxSxO.dtype)
    lse = peak + jnp.log(total)
    return out, (q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, out, lse)


def _softmax_attention_bwd(scale: float, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    p = jnp.exp(_scores(q, k, mask, scale) - lse)
    d_v = jnp.einsum("BMRS,BMRO->BMSO", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_p = jnp.einsum("BMRO,BMSO->BMRS", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = (p * (d_p - row) * scale).astype(q.dtype)
    d_q = jnp.einsum("BMRS,BMSH->BMRH", d_s, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("BMRS,BMRH->BMSH", d_s, q, preferred_element_type=jnp.float32)
    d_mask = np.zeros(mask.shape, jax.dtypes.float0)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_mask


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def causal_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale: float) -> jax.Array:
    """Self-attention within packed causal segments in up to 8 query blocks of >= 32 rows: block i attends only to
    the keys up to its own last row, so the scores above the diagonal blocks are never computed ((n + 1) / 2n of
    the full [T, T] product for n blocks) and each block's arrays are small enough to stay in cache."""
    T = q_BxTxNxH.shape[1]
    n = max(1, min(8, T // 32))  # measured on CPU at T = 146-512: 32-64 rows a block are best
    ends = [round(T * (i + 1) / n) for i in range(n)]
    outs, start = [], 0
    for end in ends:
        causal_QxS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same_BxQxS = segment_ids_BxT[:, start:end, None] == segment_ids_BxT[:, None, :end]
        outs.append(
            dot_product_attention(
                q_BxTxNxH[:, start:end], k_BxTxMxH[:, :end], v_BxTxMxO[:, :end], causal_QxS[None] & same_BxQxS, scale
            )
        )
        start = end
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale: float, impl: str) -> jax.Array:
    """Causal self-attention within packed segments; the backend switch (`attention_impl` in the model config):
    "xla" runs `causal_attention` (the scores materialised block by block), "pallas" the flash attention kernel of
    the platform (XLA on CPU), "pallas_interpret" the TPU kernel in the Pallas interpreter (tests)."""
    if impl == "xla":
        return causal_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale)
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
