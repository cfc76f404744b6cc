"""The embedded default job: build a small DeepSeek-V3-style model, export it to a Hugging Face folder,
convert that back, and check the round trip computes the same logits. No download, a CPU is enough."""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from openr1_jax.convert.checkpoint import save_model
from openr1_jax.convert.hf_to_jax import convert_hf_to_jax
from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
from openr1_jax.errors import UserError
from openr1_jax.models.load import load_model
from openr1_jax.models.params import build_model, count_params
from openr1_jax.models.presets import load_model_config


def run_convert_demo(preset: str = "tiny-moe", workdir: str | None = None, seed: int = 0) -> dict:
    cfg = load_model_config(preset)
    root = Path(workdir or tempfile.mkdtemp(prefix="openr1-jax-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, seed=seed)
    ids = jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 16)))
    before = model(ids)

    print(
        f"model: {preset} ({cfg.architecture}, {count_params(model) / 1e6:.2f}M parameters, "
        f"{cfg.num_nextn_predict_layers} MTP module(s))"
    )
    save_model(model, root / "ckpt", overwrite=True)
    convert_jax_to_hf(root / "ckpt", root / "hf", overwrite=True)
    convert_hf_to_jax(root / "hf", root / "ckpt-from-hf", overwrite=True)
    after = load_model(root / "ckpt-from-hf")(ids)

    result = {
        "workdir": str(root),
        "max_abs_logit_diff": float(jnp.abs(after.logits - before.logits).max()),
        "max_abs_mtp_logit_diff": max(
            [float(jnp.abs(a - b).max()) for a, b in zip(after.mtp_logits, before.mtp_logits)], default=0.0
        ),
        "next_tokens": np.asarray(after.logits[:, -1].argmax(-1)).tolist(),
    }
    print(
        f"ours -> Hugging Face ({root / 'hf'}) -> ours: max |logit diff| = {result['max_abs_logit_diff']:.3g}, "
        f"MTP: {result['max_abs_mtp_logit_diff']:.3g}; greedy next tokens {result['next_tokens']}"
    )
    if result["max_abs_logit_diff"] > 0 or result["max_abs_mtp_logit_diff"] > 0:
        raise UserError("the converted model does not reproduce the original logits exactly")
    return result
