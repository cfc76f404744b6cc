"""Model configuration: one frozen dataclass for the whole family, small per-layer configs derived from it.

Field names follow Hugging Face's `config.json` so a user can read a DeepSeek/Qwen/Llama config and ours side
by side; `from_hf_config` / `to_hf_config` convert between the two. Layers never see `ModelConfig`: they get
the small configs built by `attention_config()`, `mlp_config()`, `moe_config()` and `rope_config()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from openr1_jax.errors import UserError

Architecture = Literal["deepseek_v3", "deepseek_v2", "qwen2", "llama"]
ARCHITECTURES: dict[str, str] = {  # our name -> transformers class
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Implementation switches: same maths, different code (see models/kernels.py for the Pallas ones).
ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret")
MOE_IMPLS = ("ragged", "dense", "pallas", "pallas_interpret")


# ----------------------------------------------------------------------------------------------------------
# Per-layer configs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: frequencies (default, YaRN, Llama 3) and the pair layout.

    `interleaved=True` is DeepSeek's layout (rotation pairs are (x0, x1), (x2, x3), ...); False is the
    half-split layout of Llama/Qwen (pairs (x_i, x_{i + d/2})).
    """

    head_dim: int
    theta: float = 10000.0
    type: Literal["default", "linear", "yarn", "llama3"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # Llama 3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    interleaved: bool = False


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3). Symbols: N heads, K = kv_lora_rank, Q = q_lora_rank."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    softmax_scale: float
    attention_bias: bool = False
    impl: str = "xla"


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention of the dense students (Qwen2/Qwen2.5, Llama 3)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    rope: RopeConfig
    impl: str = "xla"

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5


@dataclass(frozen=True)
class MLPConfig:
    hidden_size: int
    intermediate_size: int
    bias: bool = False


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared experts plus top-k routed experts.

    V3 routing: sigmoid scores; `e_score_correction_bias` shifts scores for expert *selection* only;
    group-limited (score of a group = sum of its top-2 scores); gates renormalised when `norm_topk_prob`.
    V2 routing: softmax scores, `greedy` or `group_limited_greedy` (group score = its max score).
    """

    hidden_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    impl: Literal["ragged", "dense", "pallas", "pallas_interpret"] = "ragged"
    token_chunks: int = 1

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"


# ----------------------------------------------------------------------------------------------------------
# The model config
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a model of the family. Defaults describe a plain dense Llama-like model."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # Rotary embedding (`rope_scaling` holds the non-theta fields of HF's `rope_parameters`).
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    rope_interleave: bool = True
    # Dense attention
    qkv_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # MLA (kv_lora_rank > 0 selects MLA)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE (n_routed_experts > 0 selects DeepSeekMoE after `first_k_dense_replace` dense layers)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-Token Prediction modules (DeepSeek-V3)
    num_nextn_predict_layers: int = 0
    # Tokens
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Implementation switches (not part of the math)
    # "pallas": the platform's Pallas kernels (TPU Mosaic, GPU Triton where worth it; XLA on CPU);
    # "pallas_interpret": the TPU kernels in the Pallas interpreter on any backend (tests, debugging; slow).
    attention_impl: Literal["xla", "pallas", "pallas_interpret"] = "xla"
    moe_impl: Literal["ragged", "dense", "pallas", "pallas_interpret"] = "ragged"
    # Expert parallelism: run each device's experts on the gathered tokens in this many chunks, one after the
    # other (same result; buffers ~chunks times smaller, each chunk streams the local experts' weights again).
    moe_token_chunks: int = 1
    # Rematerialisation of each decoder block in the backward pass: "full" saves nothing (least memory),
    # "save_dots" keeps matmul outputs without batch dims (recomputes only the cheap element-wise ops).
    remat: Literal["none", "full", "save_dots"] = "none"
    # Scanned layers (MaxText's scan_layers): consecutive alike decoder layers (DeepSeek: the dense ones, then
    # the MoE ones) store their parameters stacked [L, ...] and training runs them in one `jax.lax.scan`. XLA
    # compiles one layer instead of L (compile time and memory no longer grow with depth past one layer's
    # working set). Checkpoints converted from Hugging Face keep one entry per layer; loading stacks them.
    scan_layers: bool = False
    initializer_range: float = 0.02
    extra_hf: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"architecture '{self.architecture}' is not one of {sorted(ARCHITECTURES)}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        checks = [
            (self.hidden_act == "silu", f"hidden_act '{self.hidden_act}' is not supported (only 'silu')"),
            (self.vocab_size > 0 and self.hidden_size > 0, "vocab_size and hidden_size must be positive"),
            (self.num_hidden_layers > 0, "num_hidden_layers must be positive"),
            (
                self.num_attention_heads % self.kv_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.kv_heads})",
            ),
            (
                self.attention_impl in ATTENTION_IMPLS,
                f"attention_impl '{self.attention_impl}' is not one of {list(ATTENTION_IMPLS)}",
            ),
            (self.moe_impl in MOE_IMPLS, f"moe_impl '{self.moe_impl}' is not one of {list(MOE_IMPLS)}"),
            (self.moe_token_chunks >= 1, f"moe_token_chunks must be at least 1, got {self.moe_token_chunks}"),
            (
                self.remat in ("none", "full", "save_dots"),
                f"remat '{self.remat}' is not one of ['none', 'full', 'save_dots']",
            ),
        ]
        if self.is_mla:
            checks.append((self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"))
        if self.is_moe:
            checks += [
                (
                    self.n_routed_experts % self.n_group == 0,
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
                ),
                (
                    0 < self.topk_group <= self.n_group,
                    f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]",
                ),
                (
                    0 < self.num_experts_per_tok <= self.n_routed_experts,
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, n_routed_experts]",
                ),
                (
                    self.scoring_func in ("sigmoid", "softmax"),
                    f"scoring_func '{self.scoring_func}' is not 'sigmoid' or 'softmax'",
                ),
                (
                    self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                    f"topk_method '{self.topk_method}' is not one of noaux_tc, greedy, group_limited_greedy",
                ),
                (
                    self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // max(self.n_group, 1)),
                    "num_experts_per_tok exceeds the experts in the topk_group selected groups",
                ),
            ]
        if self.num_nextn_predict_layers and not self.is_mla:
            checks.append((False, "Multi-Token Prediction is only supported for DeepSeek (MLA) models"))
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid model config: {message}")

    # --- derived facts ------------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek: layers [0, first_k_dense_replace) are dense; the MTP layers count on from num_hidden_layers."""
        return self.is_moe and layer >= self.first_k_dense_replace

    def layer_groups(self) -> list[range]:
        """The decoder layers as runs of alike layers (same FFN kind), in order: what `scan_layers` stacks."""
        groups: list[range] = []
        first = 0
        for i in range(1, self.num_hidden_layers + 1):
            if i == self.num_hidden_layers or self.is_moe_layer(i) != self.is_moe_layer(first):
                groups.append(range(first, i))
                first = i
        return groups

    # --- per-layer configs ----------------------------------------------------------------------------
    def rope_config(self) -> RopeConfig:
        scaling = dict(self.rope_scaling or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        head_dim = (
            self.qk_rope_head_dim if self.is_mla else (self.head_dim or self.hidden_size // self.num_attention_heads)
        )
        known = {f.name for f in dataclasses.fields(RopeConfig)}
        unknown = sorted(set(scaling) - known)
        if unknown:
            raise UserError(f"invalid model config: unknown rope_scaling key(s) {unknown}")
        if rope_type not in ("default", "linear", "yarn", "llama3"):
            raise UserError(f"invalid model config: rope type '{rope_type}' is not supported")
        scaling = {k: v for k, v in scaling.items() if v is not None}
        if rope_type in ("yarn", "llama3"):
            scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return RopeConfig(
            head_dim=head_dim,
            theta=self.rope_theta,
            type=rope_type,
            interleaved=self.is_mla and self.rope_interleave,
            **scaling,
        )

    def attention_config(self) -> MLAConfig | GQAConfig:
        rope = self.rope_config()
        if self.is_mla:
            scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
            if rope.type != "default" and rope.mscale_all_dim:
                # DeepSeek's YaRN: the softmax temperature grows with the context extension factor.
                m = yarn_mscale(rope.factor, rope.mscale_all_dim)
                scale = scale * m * m
            return MLAConfig(
                hidden_size=self.hidden_size,
                num_heads=self.num_attention_heads,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                rms_norm_eps=self.rms_norm_eps,
                rope=rope,
                softmax_scale=scale,
                attention_bias=self.attention_bias,
                impl=self.attention_impl,
            )
        return GQAConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
            qkv_bias=self.qkv_bias or self.attention_bias,
            o_bias=self.attention_bias,
            rope=rope,
            impl=self.attention_impl,
        )

    def mlp_config(self) -> MLPConfig:
        return MLPConfig(self.hidden_size, self.intermediate_size, self.mlp_bias)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            n_shared_experts=self.n_shared_experts,
            scoring_func=self.scoring_func,  # type: ignore[arg-type]
            topk_method=self.topk_method,  # type: ignore[arg-type]
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            impl=self.moe_impl,
            token_chunks=self.moe_token_chunks,
        )

    # --- overrides, dict and HF conversion -------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra_hf")
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_hf"}
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"unknown key '{key}' in {source}{suggestion}")
        if "architecture" not in data:
            raise UserError(f"{source} has no 'architecture' key (one of {sorted(ARCHITECTURES)})")
        try:
            return cls(**data)
        except TypeError as err:  # missing required fields
            raise UserError(f"{source} is incomplete: {err}") from None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        from openr1_jax.models import hf_config

        return hf_config.from_hf(cls, hf, source)

    def to_hf_config(self) -> dict[str, Any]:
        from openr1_jax.models import hf_config

        return hf_config.to_hf(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature 0.1 * mscale * ln(s) + 1 (1 when there is no extension)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
