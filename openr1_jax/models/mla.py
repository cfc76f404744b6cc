"""Multi-head Latent Attention (DeepSeek-V2 report, section 2.1; V3 report, section 2.1.1).

c_Q   = RMSNorm(h W_DQ)                    [B, T, Q]    (or no q compression: q = h W_Q, V2-Lite)
q     = c_Q W_UQ -> [q_nope ; q_rope]      [B, T, N, Hn + R]
[c_KV ; k_rope] = h W_DKV                  [B, T, K + R]; k_rope is one key shared by all heads
c_KV  = RMSNorm(c_KV)
[k_nope ; v] = c_KV W_UKV                  [B, T, N, Hn + O]
o     = softmax([q_nope ; RoPE(q_rope)] . [k_nope ; RoPE(k_rope)] * scale) v W_O
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.attention import attention
from openr1_jax.models.config import MLAConfig
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

    def __call__(self, x_BxTxD, cos, sin, mask_BxTxS):
        cfg = self.cfg
        Hn, N = cfg.qk_nope_head_dim, cfg.num_heads
        interleaved = cfg.rope.interleaved

        q_BxTxNxH = self.queries(x_BxTxD)
        q_rope = apply_rope(q_BxTxNxH[..., Hn:], cos, sin, interleaved)
        q_BxTxNxH = jnp.concatenate([q_BxTxNxH[..., :Hn], q_rope], axis=-1)

        ckv_BxSxK, k_rope_BxSxR = self.latents(x_BxTxD)
        k_rope_BxSx1xR = apply_rope(k_rope_BxSxR[:, :, None, :], cos, sin, interleaved)
        kv_BxSxNxH = self.kv_b_proj(ckv_BxSxK)
        k_nope, v_BxSxNxO = kv_BxSxNxH[..., :Hn], kv_BxSxNxH[..., Hn:]
        k_rope = jnp.broadcast_to(k_rope_BxSx1xR, (*k_nope.shape[:2], N, k_rope_BxSx1xR.shape[-1]))
        k_BxSxNxH = jnp.concatenate([k_nope, k_rope], axis=-1)

        out_BxTxNxO = attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxO, mask_BxTxS, cfg.softmax_scale, cfg.impl)
        return self.o_proj(out_BxTxNxO)
