"""Logits of our models equal transformers' PyTorch models on tiny random configs (float32)."""

import numpy as np
import pytest

from openr1_jax import load_model
from tests.hf_models import save_random_model, torch_logits

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
}

CASES = {
    # DeepSeek-V3: q-LoRA, group-limited routing, one dense layer.
    "v3-qlora-groups": ("deepseek_v3", dict(n_group=4, topk_group=2, first_k_dense_replace=1)),
    # V2-Lite-style attention (no q compression), all-MoE, tied embeddings, unnormalised gates.
    "v3-noqlora-tied": (
        "deepseek_v3",
        dict(
            q_lora_rank=None,
            first_k_dense_replace=0,
            tie_word_embeddings=True,
            norm_topk_prob=False,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
        ),
    ),
    # YaRN with mscale != mscale_all_dim (attention factor on cos/sin and a softmax temperature), 2 dense layers.
    "v3-yarn-dense2": (
        "deepseek_v3",
        dict(
            n_group=2,
            topk_group=1,
            first_k_dense_replace=2,
            num_hidden_layers=4,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 1.0},
        ),
    ),
    "v3-half-split-rope-bias": (
        "deepseek_v3",
        dict(rope_interleave=False, attention_bias=True, first_k_dense_replace=1, n_group=2, topk_group=2),
    ),
    "v2-lite-greedy": ("deepseek_v2", dict(q_lora_rank=None, first_k_dense_replace=1, topk_method="greedy")),
    "v2-group-limited-yarn": (
        "deepseek_v2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        ),
    ),
    "qwen2-gqa-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied-theta": (
        "qwen2",
        dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "llama3-scaling": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-mha-biases": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    arch, overrides = CASES[case]
    torch_model = save_random_model(tmp_path, arch, seed=len(case), **overrides)
    ids = np.random.RandomState(0).randint(0, 96, (2, 13))

    ours = np.asarray(load_model(tmp_path)(ids).logits)

    err = np.abs(ours - torch_logits(torch_model, ids)).max()
    assert err <= 1e-4, f"{case}: max |logit diff| = {err:.2e}"
