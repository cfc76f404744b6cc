"""Tiny random models and the embedded tokenizer, shared by the generation tests (built once per session)."""

import pytest

from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_preset


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from openr1_jax.data.embedded import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def mla_model():
    """DeepSeek-V3-shaped: MLA with q-LoRA, MoE layers after a dense first layer, MTP."""
    return build_model(load_preset("tiny-moe").replace(vocab_size=512), seed=0)


@pytest.fixture(scope="session")
def dense_model():
    """Qwen2-shaped: GQA with biases."""
    return build_model(load_preset("tiny-dense").replace(vocab_size=512), seed=0)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, mla_model, tokenizer):
    """The MLA model saved as an openr1-jax checkpoint with its tokenizer (what `Engine.from_pretrained` reads)."""
    from openr1_jax.convert.checkpoint import save_model

    path = tmp_path_factory.mktemp("generate") / "model"
    save_model(mla_model, path, tokenizer=tokenizer)
    return path
