"""`config.json` of Hugging Face <-> `ModelConfig`, per architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openr1_jax.errors import UserError

if TYPE_CHECKING:
    from openr1_jax.models.config import ModelConfig

_COMMON = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_DEEPSEEK = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "n_shared_experts",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "topk_method",
    "scoring_func",
    "attention_bias",
)
_PER_ARCH = {
    "deepseek_v3": (*_DEEPSEEK, "rope_interleave", "num_nextn_predict_layers"),
    "deepseek_v2": _DEEPSEEK,
    "qwen2": (),
    "llama": ("head_dim", "attention_bias", "mlp_bias"),
}
# Keys that describe how a file was written, not the model; never carried over.
_DROPPED = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "auto_map",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "use_cache",
    "head_dim",
    "qk_head_dim",
    "num_mtp_layers",
    "output_router_logits",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
}


def from_hf(cls: type[ModelConfig], hf: dict[str, Any], source: str) -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in _PER_ARCH:
        raise UserError(f"{source}: model_type '{arch}' is not supported (supported: {', '.join(sorted(_PER_ARCH))})")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise UserError(f"{source}: Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    if arch.startswith("deepseek") and hf.get("moe_layer_freq", 1) != 1:
        raise UserError(f"{source}: moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1)")

    fields: dict[str, Any] = {"architecture": arch}
    for key in (*_COMMON, *_PER_ARCH[arch]):
        if hf.get(key) is not None:
            fields[key] = hf[key]
    if arch.startswith("deepseek"):
        fields.pop("num_key_value_heads", None)  # meaningless for MLA (transformers defaults it to 128)
    if "num_nextn_predict_layers" not in fields and arch == "deepseek_v3" and "num_mtp_layers" in hf:
        fields["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    if arch == "qwen2":
        fields["qkv_bias"] = True  # Qwen2 always has q/k/v biases and no o bias
    if arch == "deepseek_v2":
        fields.setdefault("scoring_func", "softmax")
        fields.setdefault("topk_method", "greedy")
        fields.setdefault("norm_topk_prob", False)
        fields["rope_interleave"] = True  # V2 rotates complex pairs, i.e. the interleaved layout
    if arch.startswith("deepseek") and fields.get("n_routed_experts"):
        fields.setdefault("n_group", 1)
        fields.setdefault("topk_group", 1)
    if arch == "deepseek_v3" and hf.get("num_experts_per_tok") is None:
        fields.pop("num_experts_per_tok", None)

    theta, scaling = _read_rope(hf)
    fields["rope_theta"] = theta
    fields["rope_scaling"] = scaling
    fields["extra_hf"] = {k: v for k, v in hf.items() if k not in fields and k not in _DROPPED}
    try:
        return cls(**fields)
    except TypeError as err:
        raise UserError(f"{source} is incomplete: {err}") from None


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Both layouts: transformers 5 `rope_parameters`, and the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if not params:
        params = dict(hf.get("rope_scaling") or {})
    params.pop("partial_rotary_factor", None)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    from openr1_jax.models.config import ARCHITECTURES

    arch = cfg.architecture
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch}
    for key in (*_COMMON, *_PER_ARCH[arch]):
        value = getattr(cfg, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out["num_key_value_heads"] = cfg.kv_heads
    if arch == "llama":
        out["head_dim"] = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    if arch == "qwen2":
        out["use_sliding_window"] = False
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
    out["rope_parameters"] = rope
    for key, value in cfg.extra_hf.items():
        out.setdefault(key, value)
    return out
