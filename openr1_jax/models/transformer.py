"""The causal language model of the family: embedding -> decoder blocks -> RMSNorm -> output head, plus the
DeepSeek-V3 MTP modules. One class serves DeepSeek-V3/V2 (MLA, DeepSeekMoE) and the dense students (GQA, MLP).

Activations are constrained at block boundaries (a no-op without a sharding context): the residual stream
[B, T, D] to ("batch", None, None), logits to ("batch", None, "vocab"). `config.remat` wraps each decoder
block (and MTP module) in `nnx.remat` with the chosen policy. `config.scan_layers` stores each run of alike
layers stacked (`layer_stacks`, see `models/scan.py`) and runs it as one `lax.scan`; without it the layers
are a list (`layers`) unrolled in the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from openr1_jax.models import kv_cache
from openr1_jax.models.attention import GQAttention
from openr1_jax.models.config import GQAConfig, MLAConfig, MLPConfig, ModelConfig, MoEConfig
from openr1_jax.models.kv_cache import LayerCache, init_layer_cache
from openr1_jax.models.layers import MLP, Dtype, Embed, Linear, RMSNorm
from openr1_jax.models.mla import MLA
from openr1_jax.models.moe import MoE
from openr1_jax.models.mtp import MTPModule, shift_left
from openr1_jax.models.rope import rope_cos_sin
from openr1_jax.models.scan import scan_blocks, stack_blocks, stack_unroll, unstack_blocks
from openr1_jax.sharding.context import constrain

RESIDUAL = ("batch", None, None)
LOGITS = ("batch", None, "vocab")


@struct.dataclass
class CausalLMOutput:
    logits: jax.Array  # [B, T, V]: logits[:, i] predicts token i + 1
    mtp_logits: tuple[jax.Array, ...] = ()  # depth k: [B, T, V], position i predicts token i + k + 1
    hidden_states: jax.Array | None = None  # [B, T, D]: the input of the output head


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(.)), FFN = MLP or MoE."""

    def __init__(
        self,
        attn: MLAConfig | GQAConfig,
        ffn: MLPConfig | MoEConfig,
        eps: float,
        *,
        param_dtype: Dtype,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        D = attn.hidden_size
        self.input_norm = RMSNorm(D, eps, param_dtype=param_dtype)
        self.attn = MLA(attn, **kw) if isinstance(attn, MLAConfig) else GQAttention(attn, **kw)
        self.post_attention_norm = RMSNorm(D, eps, param_dtype=param_dtype)
        self.mlp = MoE(ffn, **kw) if isinstance(ffn, MoEConfig) else MLP(ffn, **kw)

    def __call__(self, x_BxTxD, cos, sin, segment_ids_BxT, token_mask_BxT=None):
        x_BxTxD = x_BxTxD + self.attn(self.input_norm(x_BxTxD), cos, sin, segment_ids_BxT)
        return self._ffn(x_BxTxD, token_mask_BxT)

    def _ffn(self, x_BxTxD, token_mask_BxT=None):
        h_BxTxD = self.post_attention_norm(x_BxTxD)
        return x_BxTxD + (self.mlp(h_BxTxD, token_mask_BxT) if isinstance(self.mlp, MoE) else self.mlp(h_BxTxD))

    def prefill(self, x_BxTxD, cos, sin, segment_ids_BxT, cache: LayerCache, token_mask_BxT=None):
        attn_BxTxD, cache = self.attn.prefill(self.input_norm(x_BxTxD), cos, sin, segment_ids_BxT, cache)
        return self._ffn(x_BxTxD + attn_BxTxD, token_mask_BxT), cache

    def decode(self, x_BxTxD, cos, sin, cache: LayerCache, start_B):
        attn_BxTxD, cache = self.attn.decode(self.input_norm(x_BxTxD), cos, sin, cache, start_B)
        return self._ffn(x_BxTxD + attn_BxTxD), cache


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions that restart at 0 at the start of every packed segment."""
    T = segment_ids_BxT.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids_BxT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]],
        axis=1,
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class CausalLM(nnx.Module):
    def __init__(
        self, config: ModelConfig, *, dtype: Dtype = "float32", param_dtype: Dtype = "float32", rngs: nnx.Rngs
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        attn = config.attention_config()
        self.rope = attn.rope
        self.embed = Embed(config.vocab_size, config.hidden_size, **kw)
        if config.scan_layers:
            self.layer_stacks = nnx.List(
                [stack_blocks([self._block(i, attn, kw) for i in group]) for group in config.layer_groups()]
            )
        else:
            self.layers = nnx.List([self._block(i, attn, kw) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear("BTD,DV->BTV", (config.hidden_size, config.vocab_size), ("embed", "vocab"), **kw)
        self.mtp = nnx.List(
            [
                MTPModule(
                    self._block(config.num_hidden_layers + k, attn, kw),
                    config.hidden_size,
                    config.rms_norm_eps,
                    **kw,
                )
                for k in range(config.num_nextn_predict_layers)
            ]
        )

    def _block(self, index: int, attn, kw) -> DecoderBlock:
        ffn = self.config.moe_config() if self.config.is_moe_layer(index) else self.config.mlp_config()
        return DecoderBlock(attn, ffn, self.config.rms_norm_eps, **kw)

    def decoder_layers(self) -> list[DecoderBlock]:
        """Every decoder layer in order, as a module (for a scanned model: views of the stacked variables)."""
        if not self.config.scan_layers:
            return list(self.layers)
        groups = self.config.layer_groups()
        return [block for stack, group in zip(self.layer_stacks, groups) for block in unstack_blocks(stack, len(group))]

    def head(self, h_BxTxD: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return constrain(self.embed.attend(h_BxTxD), LOGITS)
        return constrain(self.lm_head(h_BxTxD), LOGITS)

    def _remat_policy(self):
        # "full": no policy = nothing saveable, everything inside the block is recomputed in the backward pass.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.config.remat == "save_dots" else None

    def _remat(self, fn):
        """`fn(module, *args)` under `nnx.remat` with the configured policy (or as is)."""
        if self.config.remat == "none":
            return fn
        return nnx.remat(fn, policy=self._remat_policy(), prevent_cse=True)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        with_mtp: bool = True,
        token_mask: jax.Array | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; optional positions and segment_ids [B, T] for packed rows (a token attends only
        to earlier tokens of its own segment; positions default to restarting per segment). `token_mask` [B, T]:
        the tokens that count in the MoE routing statistics (training passes "not padding"); default all."""
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        if positions is None:
            positions = segment_positions(segment_ids)
        cos, sin = rope_cos_sin(positions, self.rope)

        x_BxTxD = constrain(self.embed(input_ids), RESIDUAL)
        if self.config.scan_layers:

            def apply(block, x):
                return constrain(block(x, cos, sin, segment_ids, token_mask), RESIDUAL)

            remat = self.config.remat != "none"
            for k, stack in enumerate(self.layer_stacks):
                x_BxTxD = scan_blocks(stack, x_BxTxD, apply, self._remat_policy(), remat, stack_unroll(k))
        else:
            run_block = self._remat(lambda block, x, *rest: constrain(block(x, *rest), RESIDUAL))
            for layer in self.layers:
                x_BxTxD = run_block(layer, x_BxTxD, cos, sin, segment_ids, token_mask)
        h_BxTxD = constrain(self.norm(x_BxTxD), RESIDUAL)

        mtp_logits = []
        if with_mtp:
            run_mtp = self._remat(lambda module, *args: module(*args))
            h_prev = h_BxTxD
            for k, module in enumerate(self.mtp, start=1):
                emb_BxTxD = constrain(self.embed(shift_left(input_ids, k)), RESIDUAL)
                h_prev, normed = run_mtp(module, h_prev, emb_BxTxD, cos, sin, segment_ids, token_mask)
                h_prev = constrain(h_prev, RESIDUAL)
                mtp_logits.append(self.head(normed))
        return CausalLMOutput(logits=self.head(h_BxTxD), mtp_logits=tuple(mtp_logits), hidden_states=h_BxTxD)

    # ------------------------------------------------------------------------------------------------------
    # Cached generation: prefill a prompt into per-layer caches, then decode a few tokens at a time. The layers
    # are unrolled here even when scanned (views of the stacked weights): decode programs are small, and a
    # per-layer cache tuple keeps the engine's row gathers and slot updates on the batch axis.
    # ------------------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, length: int) -> tuple[LayerCache, ...]:
        """Empty caches of `length` positions for every decoder layer, in the compute dtype."""
        attn = self.config.attention_config()
        return tuple(init_layer_cache(attn, batch, length, self.dtype) for _ in range(self.config.num_hidden_layers))

    def prefill(
        self, input_ids_BxT: jax.Array, lengths_B: jax.Array, caches: tuple[LayerCache, ...]
    ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Right-padded prompts (row b's first lengths_B[b] tokens are real) from position 0 of empty caches.
        Returns the final hidden states [B, T, D] (the input of `head`) and the filled caches; padding is its
        own segment, so it never reaches the real tokens and its cache entries are overwritten by decoding."""
        B, T = input_ids_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        real_BxT = positions_BxT < lengths_B[:, None]
        cos, sin = rope_cos_sin(positions_BxT, self.rope)
        segment_ids_BxT = real_BxT.astype(jnp.int32)
        x_BxTxD = constrain(self.embed(input_ids_BxT), RESIDUAL)
        new_caches = []
        for layer, cache in zip(self.decoder_layers(), caches, strict=True):
            x_BxTxD, cache = layer.prefill(x_BxTxD, cos, sin, segment_ids_BxT, cache, real_BxT)
            new_caches.append(constrain_cache(cache))
            x_BxTxD = constrain(x_BxTxD, RESIDUAL)
        return constrain(self.norm(x_BxTxD), RESIDUAL), tuple(new_caches)

    def caches_for_decode_loop(self, caches: tuple[LayerCache, ...]) -> tuple[LayerCache, ...]:
        """The caches in the layout `decode` reads fastest, to hold across a loop of decode steps (a cache in
        the other layout is converted on every call): `kv_cache.decode_layout`, but for the MLA decode kernel,
        which reads the storage layout. Back with `kv_cache.storage_layout`."""
        if self.config.attention_impl != "xla" and isinstance(self.config.attention_config(), MLAConfig):
            return caches
        return tuple(kv_cache.decode_layout(cache) for cache in caches)

    def decode(
        self, input_ids_BxT: jax.Array, start_B: jax.Array, caches: tuple[LayerCache, ...]
    ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """T new tokens per row at positions start_B[b] .. start_B[b] + T - 1, each attending to its row's
        cache up to itself. Returns the final hidden states [B, T, D] and the updated caches."""
        T = input_ids_BxT.shape[1]
        positions_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        cos, sin = rope_cos_sin(positions_BxT, self.rope)
        x_BxTxD = constrain(self.embed(input_ids_BxT), RESIDUAL)
        new_caches = []
        for layer, cache in zip(self.decoder_layers(), caches, strict=True):
            x_BxTxD, cache = layer.decode(x_BxTxD, cos, sin, cache, start_B)
            new_caches.append(constrain_cache(cache))
            x_BxTxD = constrain(x_BxTxD, RESIDUAL)
        return constrain(self.norm(x_BxTxD), RESIDUAL), tuple(new_caches)


def constrain_cache(cache: LayerCache) -> LayerCache:
    """Caches shard like activations: rows over the batch axes (heads stay whole; the latent has none)."""
    return jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)), cache)
