"""Multi-head Latent Attention (DeepSeek-V2 report, section 2.1; V3 report, section 2.1.1).

c_Q   = RMSNorm(h W_DQ)                    [B, T, Q]    (or no q compression: q = h W_Q, V2-Lite)
q     = c_Q W_UQ -> [q_nope ; q_rope]      [B, T, N, Hn + R]
[c_KV ; k_rope] = h W_DKV                  [B, T, K + R]; k_rope is one key shared by all heads
c_KV  = RMSNorm(c_KV)
[k_nope ; v] = c_KV W_UKV                  [B, T, N, Hn + O]
o     = softmax([q_nope ; RoPE(q_rope)] . [k_nope ; RoPE(k_rope)] * scale) v W_O

Decoding caches only [c_KV ; RoPE(k_rope)] per token and absorbs W_UK into the query and W_UV into the output
(`MLA.decode`); training and prefill use the expanded form above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models import kernels, kv_cache
from openr1_jax.models.attention import attention
from openr1_jax.models.config import MLAConfig
from openr1_jax.models.kv_cache import DecodeLatentCache, LatentCache
from openr1_jax.models.layers import Dtype, Linear, RMSNorm
from openr1_jax.models.rope import apply_rope

# DeepSeek's latent norms use the RMSNorm default eps, not the model's `rms_norm_eps`.
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: MLAConfig, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        Hn, O = cfg.qk_nope_head_dim, cfg.v_head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Linear("BTD,DNH->BTNH", (D, N, Hn + R), ("embed", "q_heads", "head_dim"), **kw)
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = Linear(
                "BTD,DQ->BTQ",
                (D, Q),
                ("embed", "q_lora"),
                bias_shape=(Q,) if bias else None,
                bias_axes=("q_lora",),
                **kw,
            )
            self.q_a_norm = RMSNorm(Q, LATENT_NORM_EPS, param_dtype=param_dtype)
            self.q_b_proj = Linear("BTQ,QNH->BTNH", (Q, N, Hn + R), ("q_lora", "q_heads", "head_dim"), **kw)
        self.kv_a_proj = Linear(
            "BTD,DK->BTK",
            (D, K + R),
            ("embed", "kv_lora"),
            bias_shape=(K + R,) if bias else None,
            bias_axes=("kv_lora",),
            **kw,
        )
        self.kv_a_norm = RMSNorm(K, LATENT_NORM_EPS, param_dtype=param_dtype)
        self.kv_b_proj = Linear("BSK,KNH->BSNH", (K, N, Hn + O), ("kv_lora", "q_heads", "head_dim"), **kw)
        self.o_proj = Linear(
            "BTNO,NOD->BTD",
            (N, O, D),
            ("q_heads", "head_dim", "embed"),
            bias_shape=(D,) if bias else None,
            bias_axes=("embed",),
            **kw,
        )

    def queries(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x_BxTxD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BxTxD)))

    def latents(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The compressed KV latent c_KV [B, T, K] (normed) and the shared rope key [B, T, R] (not rotated)."""
        ckv_BxTxKR = self.kv_a_proj(x_BxTxD)
        K = self.cfg.kv_lora_rank
        return self.kv_a_norm(ckv_BxTxKR[..., :K]), ckv_BxTxKR[..., K:]

    def rotated_queries(self, x_BxTxD, cos, sin) -> tuple[jax.Array, jax.Array]:
        """q_nope [B, T, N, Hn] and RoPE(q_rope) [B, T, N, R]."""
        Hn = self.cfg.qk_nope_head_dim
        q_BxTxNxH = self.queries(x_BxTxD)
        return q_BxTxNxH[..., :Hn], apply_rope(q_BxTxNxH[..., Hn:], cos, sin, self.cfg.rope.interleaved)

    def rotated_latents(self, x_BxTxD, cos, sin) -> tuple[jax.Array, jax.Array]:
        """What the decode cache holds: c_KV [B, T, K] and RoPE(k_rope) [B, T, R]."""
        ckv_BxTxK, k_rope_BxTxR = self.latents(x_BxTxD)
        k_rope_BxTxR = apply_rope(k_rope_BxTxR[:, :, None, :], cos, sin, self.cfg.rope.interleaved)[:, :, 0]
        return ckv_BxTxK, k_rope_BxTxR

    def __call__(self, x_BxTxD, cos, sin, segment_ids_BxT):
        out, _ = self._expanded(x_BxTxD, cos, sin, segment_ids_BxT)
        return out

    def _expanded(self, x_BxTxD, cos, sin, segment_ids_BxT):
        """Training and prefill: up-project c_KV to per-head keys and values, then ordinary attention."""
        cfg = self.cfg
        Hn, N = cfg.qk_nope_head_dim, cfg.num_heads
        q_nope, q_rope = self.rotated_queries(x_BxTxD, cos, sin)
        q_BxTxNxH = jnp.concatenate([q_nope, q_rope], axis=-1)

        ckv_BxSxK, k_rope_BxSxR = self.rotated_latents(x_BxTxD, cos, sin)
        kv_BxSxNxH = self.kv_b_proj(ckv_BxSxK)
        k_nope, v_BxSxNxO = kv_BxSxNxH[..., :Hn], kv_BxSxNxH[..., Hn:]
        k_rope = jnp.broadcast_to(k_rope_BxSxR[:, :, None, :], (*k_nope.shape[:2], N, k_rope_BxSxR.shape[-1]))
        k_BxSxNxH = jnp.concatenate([k_nope, k_rope], axis=-1)

        out_BxTxNxO = attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxO, segment_ids_BxT, cfg.softmax_scale, cfg.impl)
        return self.o_proj(out_BxTxNxO), (ckv_BxSxK, k_rope_BxSxR)

    def prefill(self, x_BxTxD, cos, sin, segment_ids_BxT, cache: LatentCache) -> tuple[jax.Array, LatentCache]:
        """A prompt from position 0 of an empty cache: the expanded attention over the prompt itself (cheaper
        than the absorbed form when T is large), keeping only the latents in the cache."""
        out, latents = self._expanded(x_BxTxD, cos, sin, segment_ids_BxT)
        start_B = jnp.zeros((x_BxTxD.shape[0],), jnp.int32)
        return out, kv_cache.write_entries(cache, LatentCache(*latents), start_B)

    def decode(self, x_BxTxD, cos, sin, cache: LatentCache | DecodeLatentCache, start_B):
        """T new tokens per row at positions start_B[b] + t, absorbed (V2 report, section 2.1.3):

          q_nope . k_nope = q_nope . (c_KV W_UK) = (q_nope W_UK^T) . c_KV     -> queries move into latent space
          probs (c_KV W_UV) W_O = (probs c_KV) W_UV W_O                       -> values stay latent until the end

        so attention reads the K + R cached values per token and never builds per-head keys or values. It reads
        every position of the cache it is given, masked per row: the engine passes each decode chunk the shortest
        cache prefix that holds its rows (`kv_cache.prefix_lengths`), so nothing is sliced per step. The XLA path
        reads the cache positions-minor (`kv_cache.DecodeLatentCache`), the kernel positions-major; the engine
        holds a chunk's caches in the layout the path reads (`Transformer.caches_for_decode_loop`), and a cache in
        the other layout is converted for this call. Returns the updated cache in the layout it came in."""
        cfg = self.cfg
        Hn = cfg.qk_nope_head_dim
        new, given = LatentCache(*self.rotated_latents(x_BxTxD, cos, sin)), cache
        w_KxNxH = self.kv_b_proj.kernel.value.astype(self.kv_b_proj.dtype)
        w_uk_KxNxHn, w_uv_KxNxO = w_KxNxH[..., :Hn], w_KxNxH[..., Hn:]

        q_nope, q_rope_BxTxNxR = self.rotated_queries(x_BxTxD, cos, sin)
        q_latent_BxTxNxK = jnp.einsum("BTNH,KNH->BTNK", q_nope, w_uk_KxNxHn)
        if cfg.impl == "xla":  # every position of the given cache, masked per row
            cache = kv_cache.write_entries(kv_cache.decode_layout(cache), new, start_B)
            T, S = x_BxTxD.shape[1], cache.latent_BxKxS.shape[2]
            out_latent_BxTxNxK = latent_attention(
                q_latent_BxTxNxK,
                q_rope_BxTxNxR,
                cache.latent_BxKxS,
                cache.k_rope_BxRxS,
                kv_cache.visible_mask(start_B, T, S),
                cfg.softmax_scale,
            )
        else:  # the kernel reads each row's cache only up to that row's own length
            cache = kv_cache.write_entries(kv_cache.storage_layout(cache), new, start_B)
            out_latent_BxTxNxK = kernels.latent_decode_attention(
                q_latent_BxTxNxK,
                q_rope_BxTxNxR,
                cache.latent_BxSxK,
                cache.k_rope_BxSxR,
                start_B,
                cfg.softmax_scale,
                interpret=cfg.impl == "pallas_interpret",
            )
        out_BxTxNxO = jnp.einsum("BTNK,KNO->BTNO", out_latent_BxTxNxK, w_uv_KxNxO)
        cache = kv_cache.in_layout_of(cache, given)
        return self.o_proj(out_BxTxNxO), cache


def latent_attention(
    q_latent_BxTxNxK: jax.Array,
    q_rope_BxTxNxR: jax.Array,
    latent_BxKxS: jax.Array,
    k_rope_BxRxS: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """softmax((q_latent . c_KV + q_rope . k_rope) * scale) c_KV over a positions-minor cache, softmax in
    float32; every head reads the same K + R values per key (MQA-like), which is what makes MLA decode
    memory-light. The queries of all T tokens and N heads are the rows of one product per cache row:
    scores [T*N, K] x [K, S], a plain matrix product over the cache as it lies, and the values as
    c_KV^T probs^T, [K, S] x [S, T*N], whose transposed operand is the small probs rather than the cache."""
    B, T, N, K = q_latent_BxTxNxK.shape

    def scores(q_BxTxNxH, keys_BxHxS):  # [B, T, N, S]
        q_BxQxH = q_BxTxNxH.reshape(B, T * N, -1)
        dims = (((2,), (1,)), ((0,), (0,)))
        return jax.lax.dot_general(q_BxQxH, keys_BxHxS, dims, preferred_element_type=jnp.float32).reshape(B, T, N, -1)

    scores_BxTxNxS = scores(q_latent_BxTxNxK, latent_BxKxS) + scores(q_rope_BxTxNxR, k_rope_BxRxS)
    scores_BxTxNxS = jnp.where(mask_BxTxS[:, :, None], scores_BxTxNxS * scale, jnp.finfo(jnp.float32).min)
    probs_BxQxS = jax.nn.softmax(scores_BxTxNxS, axis=-1).astype(latent_BxKxS.dtype).reshape(B, T * N, -1)
    out_BxKxQ = jax.lax.dot_general(latent_BxKxS, probs_BxQxS, (((2,), (2,)), ((0,), (0,))))
    # Else XLA folds the swapaxes below into the product and computes probs . c_KV^T, repacking the cache.
    out_BxKxQ = jax.lax.optimization_barrier(out_BxKxQ)
    return jnp.swapaxes(out_BxKxQ, 1, 2).reshape(B, T, N, K)
