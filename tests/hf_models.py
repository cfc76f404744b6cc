"""Tiny random transformers models saved as Hugging Face folders: the references the model tests trust."""

from __future__ import annotations

import torch
import transformers

TORCH_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1)


def hf_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    cfg_cls = getattr(transformers, TORCH_CLASSES[arch][0])
    kwargs = dict(BASE)
    if arch.startswith("deepseek"):
        kwargs.update(MLA, **MOE)
    kwargs.update(overrides)
    return cfg_cls(**kwargs)


def random_hf_model(cfg: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A float32 model with every tensor random (norm scales near 1, router bias included) so that a wrong
    name, transpose or missing term shows up in the logits."""
    torch.manual_seed(seed)
    model = getattr(transformers, TORCH_CLASSES[cfg.model_type][1])(cfg).float().eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if "norm" in name:
                tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.3 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return model


def save_random_model(path, arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    model = random_hf_model(hf_config(arch, **overrides), seed)
    model.save_pretrained(path)
    return model


def torch_logits(model: torch.nn.Module, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
