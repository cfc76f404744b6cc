"""Multi-Token Prediction (DeepSeek-V3 report, section 2.2).

Module k (k = 1..D) sees, at position i, the previous depth's representation h_i^{k-1} and the embedding
of token t_{i+k}, and predicts t_{i+k+1}:

  h'_i^k = W_eh [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h_i^{k-1})]      (eh_proj, [2D] -> [D])
  h^k    = TRM_k(h'^k)                                               (one causal transformer block)
  P^k    = OutHead(RMSNorm_k(h^k))                                   (shared head, own final norm)

The concatenation order (embedding first) is the one the released DeepSeek-V3 weights use (the report writes
it the other way round). h^0 is the main model's output representation, the input of its output head. Emb
and OutHead are shared with the main model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.layers import Dtype, Linear, RMSNorm


class MTPModule(nnx.Module):
    def __init__(
        self,
        block: nnx.Module,
        hidden_size: int,
        eps: float,
        *,
        param_dtype: Dtype,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        D = hidden_size
        self.enorm = RMSNorm(D, eps, param_dtype=param_dtype)
        self.hnorm = RMSNorm(D, eps, param_dtype=param_dtype)
        self.eh_proj = Linear(
            "BTC,CD->BTD",
            (2 * D, D),
            ("embed_concat", "embed"),
            param_dtype=param_dtype,
            dtype=dtype,
            rngs=rngs,
        )
        self.block = block
        self.norm = RMSNorm(D, eps, param_dtype=param_dtype)

    def __call__(
        self, h_prev_BxTxD, emb_next_BxTxD, cos, sin, segment_ids_BxT, token_mask_BxT=None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns h^k (fed to the next depth) and RMSNorm_k(h^k) (fed to the shared output head)."""
        joined = jnp.concatenate([self.enorm(emb_next_BxTxD), self.hnorm(h_prev_BxTxD)], axis=-1)
        h_BxTxD = self.block(self.eh_proj(joined), cos, sin, segment_ids_BxT, token_mask_BxT)
        return h_BxTxD, self.norm(h_BxTxD)


def shift_left(ids_BxT: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """t_{i+k} at position i; the last k positions have no such token and get `fill` (their MTP predictions
    are meaningless and must be masked out of any loss)."""
    return jnp.concatenate([ids_BxT[:, k:], jnp.full((ids_BxT.shape[0], k), fill, ids_BxT.dtype)], axis=1)
