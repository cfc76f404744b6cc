"""openr1-jax checkpoint -> Hugging Face folder, streaming: size-limited safetensors shards with an index,
config.json, generation config and tokenizer files. The output loads with
`transformers.AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from openr1_jax.convert import checkpoint as ckpt
from openr1_jax.convert.heap import release_free_memory
from openr1_jax.convert.names import hf_names
from openr1_jax.convert.safetensors_io import ShardedSafetensorsWriter
from openr1_jax.errors import UserError
from openr1_jax.fileio import atomic_dir
from openr1_jax.models.params import abstract_model, flat_variables


def convert_jax_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    group_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Export a checkpoint. dtype: cast floating tensors (default: keep the stored dtypes)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = ckpt.read_config(ckpt_dir)
    meta = ckpt.param_metadata(ckpt_dir)
    per_layer = cfg.replace(scan_layers=False)  # checkpoints store one entry per layer
    expected = {p: tuple(v.value.shape) for p, v in flat_variables(abstract_model(per_layer)).items()}
    missing = sorted(set(expected) - set(meta))
    if missing:
        raise UserError(f"checkpoint {ckpt_dir} lacks parameter '{missing[0]}' that its model_config.json implies")
    for path, shape in expected.items():
        if meta[path][0] != shape:
            raise UserError(
                f"parameter '{path}' in {ckpt_dir} has shape {list(meta[path][0])} but model_config.json implies "
                f"{list(shape)}"
            )
    L = cfg.num_hidden_layers
    head_path = "embed.embedding" if cfg.tie_word_embeddings else "lm_head.kernel"
    total = sum(int(np.prod(s, dtype=np.int64)) for s in expected.values())
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="jax-to-hf", disable=not progress)
    stored_dtype = None
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes) as writer:
            for group in ckpt.iter_param_groups(ckpt_dir, group_bytes):
                for path, array in group.items():
                    if path not in expected:
                        continue
                    if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
                        array = array.astype(dtype)
                    if path == "embed.embedding":
                        stored_dtype = array.dtype
                    names, layout = hf_names(path, array.shape, L)
                    for name, tensor in zip(names, layout.to_hf(array)):
                        writer.add(name, tensor)
                    for k in range(cfg.num_nextn_predict_layers):
                        # Official DeepSeek-V3 checkpoints repeat the shared embedding and head in the MTP layer.
                        if path == "embed.embedding":
                            writer.add(f"model.layers.{L + k}.embed_tokens.weight", array)
                        if path == head_path:
                            writer.add(f"model.layers.{L + k}.shared_head.head.weight", layout.to_hf(array)[0])
                    bar.update(array.size)
                del group, array  # free this group before the next one is read
                release_free_memory()
        bar.close()
        hf_config = cfg.to_hf_config()
        hf_config["dtype"] = _torch_dtype_name(stored_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        carried = ckpt_dir / ckpt.HF_FILES_DIR
        if carried.is_dir():
            for f in carried.iterdir():
                shutil.copy2(f, tmp / f.name)
        if not (tmp / "generation_config.json").exists():
            gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            gen = {k: list(v) if isinstance(v, tuple) else v for k, v in gen.items() if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _torch_dtype_name(dtype) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")
