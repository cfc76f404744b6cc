"""Training FLOPs per token and model FLOPs utilisation (MFU).

  flops/token = 6 * (matmul params a token passes through)  +  attention scores and values

The first term is the usual 2 flops per multiply-add, times 3 for forward + backward (input and weight
gradients). "Active" params: attention projections, the dense MLPs, per MoE layer the router, the shared
experts and only the top-k routed experts a token is sent to, the MTP modules (eh_proj + their block) and
one output head per prediction head (main + each MTP depth). The embedding lookup is a gather, not a matmul,
and norms are negligible, so neither counts.

The second term is QK^T (2 T N H_qk flops per token) and the probabilities times V (2 T N H_v), times 3,
per attention layer: 6 T N (H_qk + H_v) for full attention, half of that for causal attention, as MaxText
counts it (a causal token sees T/2 keys on average). For MLA H_qk = qk_nope + qk_rope and H_v = v_head_dim.
"""

from __future__ import annotations

import jax

from openr1_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (no sparsity), from the vendors' spec sheets.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (  # matched in order against device_kind, lower case
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)


def _attention_params(cfg: ModelConfig) -> int:
    D, N = cfg.hidden_size, cfg.num_attention_heads
    if cfg.is_mla:
        Hqk, O, K, R = (
            cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
        )
        q = D * N * Hqk if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * N * Hqk
        return q + D * (K + R) + K * N * (cfg.qk_nope_head_dim + O) + N * O * D
    H, M = cfg.head_dim or D // N, cfg.kv_heads
    return D * N * H + 2 * D * M * H + N * H * D


def _attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.is_mla:
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    H = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return H, H


def _ffn_active_params(cfg: ModelConfig, layer: int) -> int:
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return 3 * D * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts  # top-k routed + always-on shared
    return D * cfg.n_routed_experts + experts * 3 * D * cfg.moe_intermediate_size


def active_matmul_params(cfg: ModelConfig, *, with_mtp: bool = True) -> int:
    """Weights of the matmuls one token goes through (routed experts: only its top-k)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    num_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
    blocks = range(cfg.num_hidden_layers + num_mtp)  # MTP blocks count on from num_hidden_layers
    total = sum(_attention_params(cfg) + _ffn_active_params(cfg, i) for i in blocks)
    return total + num_mtp * 2 * D * D + (1 + num_mtp) * D * V


def flops_per_token(cfg: ModelConfig, seq_len: int, *, with_mtp: bool = True, causal: bool = True) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`; see the module docstring."""
    num_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    Hqk, Hv = _attention_head_dims(cfg)
    attention = 6.0 * seq_len * cfg.num_attention_heads * (Hqk + Hv) * num_layers
    if causal:
        attention /= 2
    return 6.0 * active_matmul_params(cfg, with_mtp=with_mtp) + attention


def peak_flops_per_device(device: jax.Device | None = None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first device); None where unknown (e.g. CPU)."""
    if override is not None:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s over the devices' bf16 peak."""
    if not peak or num_devices <= 0:
        return None
    return tokens_per_sec * flops_per_token / (num_devices * peak)
