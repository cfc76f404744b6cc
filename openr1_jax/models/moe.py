"""DeepSeekMoE (V3 report, section 2.1.2): shared experts + top-k routed experts, dropless.

  h' = h + sum_i FFN_shared_i(h) + sum_{i in TopK} g_i FFN_routed_i(h)

Routing (`Router`) follows the reference implementations exactly; dispatch has paths with the same math:
`ragged` sorts the (token, expert) pairs by expert and runs `jax.lax.ragged_dot` grouped matmuls (no token is
ever dropped), `pallas` runs the same sorted rows through the Pallas grouped matmul `gmm` (per device, in
`jax.shard_map` under a sharding context), `dense` runs every expert on every token (E/K times the routed
FLOPs; the reference the tests use, and what `ragged` runs off TPU when that costs little: decoding a small MoE,
see `dense_costs_little`). Under a sharding context whose mesh splits the experts (`expert` axis
> 1), the routed experts run expert-parallel in `jax.shard_map` (`sharding/expert_parallel.py`, same math,
dropless).

Every call sows two `nnx.Intermediate` statistics for the train step: `expert_load` (float32 [E], the global
number of (token, expert) assignments per routed expert) and `balance_loss` (float32 scalar, DeepSeek-V3's
complementary sequence-wise balance loss without its alpha, eqs. 17-20).
"""

from __future__ import annotations

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.blocked_matmul import block_count, default_block
from openr1_jax.models.config import MLPConfig, MoEConfig
from openr1_jax.models.kernels import grouped_matmul
from openr1_jax.models.layers import MLP, Dtype, RouterBias, param
from openr1_jax.sharding.context import current
from openr1_jax.sharding.expert_parallel import expert_axis, expert_parallel_ffn


class Router(nnx.Module):
    """Token -> (top-k gate weights g [T, k], expert indices [T, k], affinity scores s [T, E]), in float32."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E = cfg.num_experts
        self.kernel = param(rngs, (cfg.hidden_size, E), ("embed", None), jnp.float32)
        if cfg.uses_correction_bias:
            self.e_score_correction_bias = param(None, (E,), (None,), jnp.float32, kind=RouterBias)

    def __call__(self, x_TxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        logits_TxE = x_TxD.astype(jnp.float32) @ self.kernel.value.astype(jnp.float32)
        if cfg.scoring_func == "sigmoid":
            scores_TxE = jax.nn.sigmoid(logits_TxE)
        else:
            scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)

        if cfg.uses_correction_bias:
            # V3: the bias steers which experts are chosen, never the gate values.
            choice_TxE = scores_TxE + self.e_score_correction_bias.value
            choice_TxE = _limit_to_groups(choice_TxE, cfg, group_top=2, fill=-jnp.inf)
        elif cfg.topk_method == "group_limited_greedy":
            choice_TxE = _limit_to_groups(scores_TxE, cfg, group_top=1, fill=0.0)
        else:
            choice_TxE = scores_TxE
        _, experts_TxK = jax.lax.top_k(choice_TxE, cfg.num_experts_per_tok)
        gates_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)

        if cfg.uses_correction_bias:  # V3: normalise (if asked), then always rescale
            if cfg.norm_topk_prob:
                gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
            gates_TxK = gates_TxK * cfg.routed_scaling_factor
        elif cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:  # V2: normalise *or* rescale
            gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
        else:
            gates_TxK = gates_TxK * cfg.routed_scaling_factor
        return gates_TxK, experts_TxK, scores_TxE


def _limit_to_groups(scores_TxE: jax.Array, cfg: MoEConfig, group_top: int, fill: float) -> jax.Array:
    """Keep only the experts of the `topk_group` best groups; a group's score is the sum of its best
    `group_top` scores (V3: 2, V2: the max)."""
    G = cfg.n_group
    if G == 1:
        return scores_TxE
    T, E = scores_TxE.shape
    per_group_TxGxE = scores_TxE.reshape(T, G, E // G)
    group_score_TxG = jax.lax.top_k(per_group_TxGxE, min(group_top, E // G))[0].sum(-1)
    _, best_groups = jax.lax.top_k(group_score_TxG, cfg.topk_group)
    keep_TxG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], best_groups].set(True)
    keep_TxE = jnp.repeat(keep_TxG, E // G, axis=1)
    return jnp.where(keep_TxE, scores_TxE, fill)


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D]."""

    def __init__(self, cfg: MoEConfig, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.gate_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype)
        self.up_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype)
        self.down_proj = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), param_dtype)

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(w.value.astype(self.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))

    def __call__(self, x_TxD: jax.Array, gates_TxK: jax.Array, experts_TxK: jax.Array) -> jax.Array:
        if self.cfg.impl == "dense":
            return self.dense(x_TxD, gates_TxK, experts_TxK)
        ctx = current()
        kernel = self.cfg.impl.startswith("pallas")  # a Mosaic kernel runs per device, inside shard_map
        if ctx is not None and (kernel or expert_axis(*ctx, self.cfg.num_experts) is not None):
            mesh, rules = ctx
            return expert_parallel_ffn(
                x_TxD,
                gates_TxK,
                experts_TxK,
                self.weights(),
                mesh=mesh,
                rules=rules,
                dtype=self.dtype,
                impl=self.cfg.impl,
                token_chunks=self.cfg.token_chunks,
            )
        if self.cfg.impl == "ragged" and dense_costs_little(*experts_TxK.shape, self.cfg.num_experts):
            # Off TPU (where ragged_dot is native) few tokens per expert (decoding) run faster densely.
            return jax.lax.platform_dependent(x_TxD, gates_TxK, experts_TxK, tpu=self.ragged, default=self.dense)
        return self.ragged(x_TxD, gates_TxK, experts_TxK)

    def ragged(self, x_TxD, gates_TxK, experts_TxK) -> jax.Array:
        """Dropless: sort the T*k (token, expert) pairs by expert, grouped matmuls, unsort, weighted sum."""
        T, K = experts_TxK.shape
        w_gate, w_up, w_down = self.weights()
        expert_of_pair = experts_TxK.reshape(-1)
        order = jnp.argsort(expert_of_pair, stable=True)
        x_sorted = x_TxD.astype(self.dtype)[order // K]
        group_sizes_E = jnp.bincount(expert_of_pair, length=self.cfg.num_experts).astype(jnp.int32)
        impl = self.cfg.impl
        h = jax.nn.silu(grouped_matmul(x_sorted, w_gate, group_sizes_E, impl))
        h = h * grouped_matmul(x_sorted, w_up, group_sizes_E, impl)
        y_sorted = grouped_matmul(h, w_down, group_sizes_E, impl)
        y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, K, -1)
        y = jnp.einsum("TKD,TK->TD", y_TxKxD.astype(jnp.float32), gates_TxK)
        return y.astype(self.dtype)

    def dense(self, x_TxD, gates_TxK, experts_TxK) -> jax.Array:
        """Every expert on every token, as two plain matmuls over the experts laid side by side:

          h = silu(x [W_gate,1 .. W_gate,E]) * (x [W_up,1 .. W_up,E])         [T, E*F]
          y = (h * c) [W_down,1 ; .. ; W_down,E] = sum_e c_e FFN_e(x)          c [T, E]: g_i on top-k, else 0

        E/K times the routed FLOPs, none of the sorting: the reference the tests compare against."""
        w_gate, w_up, w_down = self.weights()
        E, D, F = w_gate.shape
        T = x_TxD.shape[0]
        x = x_TxD.astype(self.dtype)

        def side_by_side(w_ExDxF):  # [E, D, F] -> [D, E*F]
            return w_ExDxF.transpose(1, 0, 2).reshape(D, E * F)

        h_TxExF = (jax.nn.silu(x @ side_by_side(w_gate)) * (x @ side_by_side(w_up))).reshape(T, E, F)
        combine_TxE = (gates_TxK[..., None] * jax.nn.one_hot(experts_TxK, E, dtype=gates_TxK.dtype)).sum(axis=1)
        h_TxExF = (h_TxExF.astype(jnp.float32) * combine_TxE[..., None]).astype(self.dtype)
        return (h_TxExF.reshape(T, E * F) @ w_down.reshape(E * F, D)).astype(self.dtype)


def dense_costs_little(tokens: int, k: int, num_experts: int) -> bool:
    """Whether every expert on every token is at most twice the rows of the blocked grouped matmul that XLA:CPU
    and XLA:GPU run for `ragged` (`blocked_matmul.py`: each expert's rows padded to whole blocks, one weight
    copy per block). With few rows per expert (decoding) that form pads every expert to a block and gathers
    more weight copies than there are experts, and its sorting and scattering cost more than the dense path's
    extra FLOPs: at tiny-moe's decode shapes (ratio 2) dense decodes 3-5% faster. Large E/K (DeepSeek-V3's
    256/8) never qualifies."""
    rows = tokens * k
    block = default_block(rows, num_experts)
    return tokens * num_experts <= 2 * block_count(rows, num_experts, block) * block


class MoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        shared = MLPConfig(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.shared_experts = (
            MLP(shared, param_dtype=param_dtype, dtype=dtype, rngs=rngs) if cfg.n_shared_experts else None
        )

    def __call__(self, x_BxTxD: jax.Array, token_mask_BxT: jax.Array | None = None) -> jax.Array:
        """`token_mask_BxT`: the tokens that count in the routing statistics (e.g. not padding); default all."""
        B, T, D = x_BxTxD.shape
        x_TxD = x_BxTxD.reshape(B * T, D)
        gates_TxK, experts_TxK, scores_TxE = self.router(x_TxD)
        self._sow_statistics(experts_TxK.reshape(B, T, -1), scores_TxE.reshape(B, T, -1), token_mask_BxT)
        y = self.experts(x_TxD, gates_TxK, experts_TxK).reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BxTxD)
        return y

    def _sow_statistics(
        self, experts_BxTxK: jax.Array, scores_BxTxE: jax.Array, token_mask_BxT: jax.Array | None
    ) -> None:
        """expert_load [E] and the sequence-wise balance loss sum_i f_i P_i averaged over rows, with
        f_i = E / (K T) * #{t: i in TopK(t)} and P_i = mean_t s_{i,t} / sum_j s_{j,t}, over the counted tokens
        (T = a row's counted tokens; rows with none are left out)."""
        B, T, K = experts_BxTxK.shape
        E = self.cfg.num_experts
        mask_BxT = jnp.ones((B, T)) if token_mask_BxT is None else jnp.broadcast_to(token_mask_BxT, (B, T))
        w_BxTx1 = mask_BxT.astype(jnp.float32)[..., None]
        chosen_BxTxE = jax.nn.one_hot(experts_BxTxK, E, dtype=jnp.float32).sum(axis=2) * w_BxTx1
        load_E = chosen_BxTxE.sum(axis=(0, 1))
        tokens_Bx1 = w_BxTx1.sum(axis=1)
        f_BxE = chosen_BxTxE.sum(axis=1) * E / (K * jnp.maximum(tokens_Bx1, 1.0))
        affinity_BxTxE = scores_BxTxE / scores_BxTxE.sum(axis=-1, keepdims=True)
        p_BxE = (affinity_BxTxE * w_BxTx1).sum(axis=1) / jnp.maximum(tokens_Bx1, 1.0)
        rows_B = (tokens_Bx1[:, 0] > 0).astype(jnp.float32)
        balance = jnp.sum(jnp.sum(f_BxE * p_BxE, axis=-1) * rows_B) / jnp.maximum(rows_B.sum(), 1.0)
        try:
            self.sow(nnx.Intermediate, "expert_load", load_E)
            self.sow(nnx.Intermediate, "balance_loss", balance)
        except flax.errors.TraceContextError:
            # An eager module closed over by a plain `jax.jit`/`jax.grad` cannot be mutated inside it (merge
            # it inside the traced function, or use nnx.jit, to collect statistics); such a caller could not
            # read them anyway, so the forward pass goes on without them.
            pass
