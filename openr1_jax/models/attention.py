"""Attention shared by MLA and GQA: causal attention within packed rows (in XLA, block by block along the
diagonal, with a flash-style backward), attention under any mask over a decode loop's cache, and the
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
from openr1_jax.models.kv_cache import DecodeKVCache, KVCache
from openr1_jax.models.layers import Dtype, Linear
from openr1_jax.models.rope import apply_rope

_MASKED = jnp.finfo(jnp.float32).min

# Layout. Both products run head-major, [B, M, R, .] x [B, M, S, .], the layout of a plain batched matmul (with T
# ahead of the heads in an operand or the output, XLA:CPU falls back to a contraction 2-3x slower). R = T * G query
# rows per key head, ordered (t, g), so a block of query positions is a contiguous block of rows.


def _query_rows(q_BxTxNxH: jax.Array, M: int) -> jax.Array:
    B, T, N, H = q_BxTxNxH.shape
    return q_BxTxNxH.reshape(B, T, M, N // M, H).transpose(0, 2, 1, 3, 4).reshape(B, M, T * (N // M), H)


def _from_query_rows(out_BxMxRxO: jax.Array, T: int) -> jax.Array:
    B, M, R, O = out_BxMxRxO.shape
    return out_BxMxRxO.reshape(B, M, T, R // T, O).transpose(0, 2, 1, 3, 4).reshape(B, T, M * (R // T), O)


def _head_major(x_BxSxMxH: jax.Array) -> jax.Array:
    return x_BxSxMxH.transpose(0, 2, 1, 3)


def _row_mask(mask_BxTxS: jax.Array, G: int) -> jax.Array:
    """[B, T, S] -> [B, 1, T * G, S]: each query position's mask for its G rows."""
    B, T, S = mask_BxTxS.shape
    return jnp.broadcast_to(mask_BxTxS[:, :, None], (B, T, G, S)).reshape(B, 1, T * G, S)


def _scores(q_BxMxRxH, k_BxMxSxH, mask_Bx1xRxS, scale: float) -> jax.Array:
    scores = jnp.einsum("BMRH,BMSH->BMRS", q_BxMxRxH, k_BxMxSxH, preferred_element_type=jnp.float32)
    return jnp.where(mask_Bx1xRxS, scores * scale, _MASKED)


def _attend(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, mask_Bx1xRxS, scale: float) -> tuple[jax.Array, jax.Array]:
    """(p v) / l with p = exp(s - max s), l = sum p (the softmax in float32), and logsumexp(s) per row."""
    scores = _scores(q_BxMxRxH, k_BxMxSxH, mask_Bx1xRxS, scale)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - peak)
    total = jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.einsum("BMRS,BMSO->BMRO", p.astype(v_BxMxSxO.dtype), v_BxMxSxO, preferred_element_type=jnp.float32)
    return (pv / total).astype(v_BxMxSxO.dtype), peak + jnp.log(total)


def decode_attention(q_BxTxNxH, k_BxMxHxS, v_BxMxSxO, mask_BxTxS, scale: float) -> jax.Array:
    """softmax(q k^T * scale + mask) v, the softmax in float32, over keys and values laid out as a decode loop
    holds them (`kv_cache.DecodeKVCache`): both products are plain batched matmuls over the cache as it lies,
    [R, H] x [H, S] and [R, S] x [S, O] per key head. N = M * G query heads share a key head; every query must
    see at least one key (true of the decode masks)."""
    M = k_BxMxHxS.shape[1]
    G = q_BxTxNxH.shape[2] // M
    scores = jnp.einsum("BMRH,BMHS->BMRS", _query_rows(q_BxTxNxH, M), k_BxMxHxS, preferred_element_type=jnp.float32)
    scores = jnp.where(_row_mask(mask_BxTxS, G), scores * scale, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxMxSxO.dtype)
    out_BxMxRxO = jnp.einsum("BMRS,BMSO->BMRO", probs, v_BxMxSxO)
    return _from_query_rows(out_BxMxRxO, q_BxTxNxH.shape[1])


def causal_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale: float) -> jax.Array:
    """Self-attention within packed causal segments, in up to 8 blocks of >= 32 query positions: block i attends
    only to the keys up to its own last position, so the scores above the diagonal blocks are never computed
    ((n + 1) / 2n of the [T, T] product for n blocks) and each block's arrays are small enough to stay in cache.
    The backward pass is flash attention's, in plain XLA: it recomputes each block's probabilities from the saved
    logsumexp instead of differentiating the softmax (fewer passes over [T, S] arrays, no [T, S] residuals), and
    adds each block's key and value gradients into their prefix in place."""
    T, M = q_BxTxNxH.shape[1], k_BxTxMxH.shape[2]
    n = max(1, min(8, T // 32))  # measured on CPU at T = 146-512: 32-64 positions a block are best
    ends = tuple(round(T * (i + 1) / n) for i in range(n))
    out_BxMxRxO = _blocked_causal(
        _query_rows(q_BxTxNxH, M), _head_major(k_BxTxMxH), _head_major(v_BxTxMxO), segment_ids_BxT, scale, ends
    )
    return _from_query_rows(out_BxMxRxO, T)


def _block_masks(segment_ids_BxT: jax.Array, G: int, ends: tuple[int, ...]):
    """(first row, last row, key count, [B, 1, rows, keys] mask) of each block of query positions."""
    start = 0
    for end in ends:
        causal_QxS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same_BxQxS = segment_ids_BxT[:, start:end, None] == segment_ids_BxT[:, None, :end]
        yield start * G, end * G, end, _row_mask(causal_QxS[None] & same_BxQxS, G)
        start = end


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_causal(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, segment_ids_BxT, scale: float, ends: tuple[int, ...]):
    return _blocked_causal_fwd(q_BxMxRxH, k_BxMxSxH, v_BxMxSxO, segment_ids_BxT, scale, ends)[0]


def _blocked_causal_fwd(q, k, v, segment_ids_BxT, scale: float, ends: tuple[int, ...]):
    G = q.shape[2] // segment_ids_BxT.shape[1]
    outs, lses = [], []
    for r0, r1, e, mask in _block_masks(segment_ids_BxT, G, ends):
        out, lse = _attend(q[:, :, r0:r1], k[:, :, :e], v[:, :, :e], mask, scale)
        outs.append(out)
        lses.append(lse)
    out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return out, (q, k, v, segment_ids_BxT, out, lse)


def _blocked_causal_bwd(scale: float, ends: tuple[int, ...], residuals, d_out):
    q, k, v, segment_ids_BxT, out, lse = residuals
    G = q.shape[2] // segment_ids_BxT.shape[1]
    f32 = jnp.float32
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # sum_o dO * O = sum_s P * dP
    d_qs, d_k, d_v = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for r0, r1, e, mask in _block_masks(segment_ids_BxT, G, ends):
        q_i, k_i, v_i, d_out_i = q[:, :, r0:r1], k[:, :, :e], v[:, :, :e], d_out[:, :, r0:r1]
        p = jnp.exp(_scores(q_i, k_i, mask, scale) - lse[:, :, r0:r1])
        d_p = jnp.einsum("BMRO,BMSO->BMRS", d_out_i, v_i, preferred_element_type=f32)
        d_s = (p * (d_p - row[:, :, r0:r1]) * scale).astype(q.dtype)
        d_qs.append(jnp.einsum("BMRS,BMSH->BMRH", d_s, k_i, preferred_element_type=f32))
        d_k = d_k.at[:, :, :e].add(jnp.einsum("BMRS,BMRH->BMSH", d_s, q_i, preferred_element_type=f32))
        d_v_i = jnp.einsum("BMRS,BMRO->BMSO", p.astype(d_out.dtype), d_out_i, preferred_element_type=f32)
        d_v = d_v.at[:, :, :e].add(d_v_i)
    d_q = jnp.concatenate(d_qs, axis=2)
    d_segments = np.zeros(segment_ids_BxT.shape, jax.dtypes.float0)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_segments


_blocked_causal.defvjp(_blocked_causal_fwd, _blocked_causal_bwd)


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
        cache = kv_cache.write_entries(cache, KVCache(k, v), start_B)
        return self.o_proj(attention(q, k, v, segment_ids_BxT, self.cfg.softmax_scale, self.cfg.impl)), cache

    def decode(self, x_BxTxD, cos, sin, cache: KVCache | DecodeKVCache, start_B):
        """T new tokens per row at positions start_B[b] + t, attending over the whole (masked) cache it is given
        (the engine passes each decode chunk the shortest prefix that holds its rows). Reads the cache in
        `kv_cache.DecodeKVCache` layout, which the engine holds for a whole chunk; a KVCache is converted for
        this call. Returns the updated cache in the layout it came in."""
        q, k, v = self._qkv(x_BxTxD, cos, sin)
        given, cache = cache, kv_cache.write_entries(kv_cache.decode_layout(cache), KVCache(k, v), start_B)
        mask_BxTxS = kv_cache.visible_mask(start_B, x_BxTxD.shape[1], cache.k_BxMxHxS.shape[3])
        out_BxTxNxH = decode_attention(q, cache.k_BxMxHxS, cache.v_BxMxSxH, mask_BxTxS, self.cfg.softmax_scale)
        return self.o_proj(out_BxTxNxH), kv_cache.in_layout_of(cache, given)
