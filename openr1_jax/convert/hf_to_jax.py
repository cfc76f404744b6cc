"""Hugging Face folder -> openr1-jax checkpoint (or straight into a model), streaming tensor by tensor.

Handles sharded safetensors with an index, per-expert keys stacked into [E, ...] arrays, the MTP layer
(`model.layers.{num_hidden_layers}.*`) of official DeepSeek-V3 checkpoints, and fp8 weights with 128x128
`weight_scale_inv` blocks (dequantised on the fly). Everything is validated before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from openr1_jax.convert import checkpoint as ckpt
from openr1_jax.convert.fp8 import dequantize_fp8
from openr1_jax.convert.names import MTP_SHARED_COPIES, Layout, hf_names
from openr1_jax.convert.safetensors_io import SafetensorsReader
from openr1_jax.errors import UserError
from openr1_jax.fileio import atomic_dir
from openr1_jax.models.config import ModelConfig
from openr1_jax.models.params import abstract_model, flat_variables, logical_axes
from openr1_jax.sharding.rules import DEFAULT_RULES, Rules, named_sharding

log = logging.getLogger(__name__)

# Files of a Hugging Face folder that travel with the weights.
CARRIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Tensors some checkpoints carry that are not parameters.
_IGNORED = (r".*\.rotary_emb\.inv_freq",)
_FP8 = "F8_E4M3"


@dataclass(frozen=True)
class TensorPlan:
    path: str  # our parameter
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    sources: tuple[str, ...]  # HF tensor names
    layout: Layout


def read_hf_config(hf_dir: Path) -> tuple[ModelConfig, dict]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} does not exist or is not a folder")
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json, so it is not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return ModelConfig.from_hf_config(hf, source=str(path)), hf


def plan_conversion(hf_dir: str | Path, reader: SafetensorsReader) -> tuple[ModelConfig, list[TensorPlan]]:
    """Check that the folder holds exactly the model its config.json describes; return what goes where."""
    hf_dir = Path(hf_dir)
    cfg, _ = read_hf_config(hf_dir)
    names = set(reader.names())
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{L}.") for n in names):
        # transformers' save_pretrained drops the MTP layer; the config still announces it.
        log.warning(
            "config.json announces %d MTP layer(s) but the weights have none: converting without MTP",
            cfg.num_nextn_predict_layers,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)

    plans = []
    consumed: set[str] = set()
    for path, var in flat_variables(abstract_model(cfg)).items():
        shape = tuple(var.value.shape)
        sources, layout = hf_names(path, shape, L)
        for name, want in zip(sources, layout.hf_shapes(shape)):
            if name not in names:
                raise UserError(
                    f"tensor '{name}' (needed by {cfg.architecture} with the sizes in config.json) is missing "
                    f"from {hf_dir}"
                )
            got = tuple(reader.shape(name))
            if got != want:
                raise UserError(
                    f"tensor '{name}' in {hf_dir / reader.shard(name)} has shape {list(got)} but config.json "
                    f"implies {list(want)}"
                )
            if reader.dtype(name) == _FP8 and name + "_scale_inv" not in names:
                raise UserError(f"fp8 tensor '{name}' in {hf_dir} has no '{name}_scale_inv' block scales")
        consumed.update(sources)
        plans.append(TensorPlan(path, shape, logical_axes(var), tuple(sources), layout))

    leftover = names - consumed - {n + "_scale_inv" for n in consumed}
    leftover = {n for n in leftover if not any(re.fullmatch(p, n) for p in _IGNORED)}
    for k in range(cfg.num_nextn_predict_layers):
        leftover -= {f"model.layers.{L + k}.{copy}" for copy in MTP_SHARED_COPIES}
    if cfg.tie_word_embeddings:
        leftover.discard("lm_head.weight")
    if leftover:
        first = sorted(leftover)[:3]
        raise UserError(
            f"{hf_dir} has {len(leftover)} tensor(s) that a {cfg.architecture} model with this config.json does "
            f"not use, e.g. {first}; the config and the weights disagree"
        )
    return cfg, plans


def read_tensor(reader: SafetensorsReader, name: str, dtype: np.dtype | None) -> np.ndarray:
    """One HF tensor as numpy; fp8 is dequantised (to `dtype`, default bfloat16)."""
    if reader.dtype(name) == _FP8:
        return dequantize_fp8(reader.get(name), reader.get(name + "_scale_inv"), out_dtype=dtype or ml_dtypes.bfloat16)
    array = reader.get(name)
    if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(dtype)
    return array


def iter_params(
    reader: SafetensorsReader, plans: list[TensorPlan], dtype: np.dtype | None = None
) -> Iterator[tuple[TensorPlan, np.ndarray]]:
    for plan in plans:
        tensors = [read_tensor(reader, name, dtype) for name in plan.sources]
        yield plan, plan.layout.to_ours(tensors, plan.shape)


def convert_hf_to_jax(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    group_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelConfig:
    """Convert a Hugging Face folder into an openr1-jax checkpoint at `out_dir`.

    dtype: cast floating tensors (default: keep each tensor's dtype; fp8 becomes bfloat16).
    mesh: save each tensor already laid out on this mesh (logical axes -> `rules`), so a sharded restore
      on the same mesh reads only its shards.
    group_bytes: tensors are written a group of at most this many bytes at a time (the memory bound).
    """
    hf_dir = Path(hf_dir)
    np_dtype = np.dtype(dtype) if dtype else None
    read_hf_config(hf_dir)  # a folder without a usable config.json is reported as such, before its weights
    with SafetensorsReader(hf_dir) as reader:
        cfg, plans = plan_conversion(hf_dir, reader)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            ckpt.write_config(tmp, cfg)
            ckpt.save_params(tmp, _groups(reader, plans, np_dtype, mesh, rules, group_bytes, progress))
            _carry_files(hf_dir, tmp / ckpt.HF_FILES_DIR)
    return cfg


def _groups(reader, plans, dtype, mesh, rules, group_bytes, progress) -> Iterator[dict]:
    total = sum(int(np.prod(p.shape, dtype=np.int64)) for p in plans)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="hf-to-jax", disable=not progress)
    group, size = {}, 0
    for plan, array in iter_params(reader, plans, dtype):
        if mesh is not None:
            array = jax.device_put(array, named_sharding(plan.axes, mesh, rules, plan.shape))
        group[plan.path] = array
        size += array.nbytes
        bar.update(array.size)
        if size >= group_bytes:
            yield group
            group, size = {}, 0
    if group:
        yield group
    bar.close()


def _carry_files(src: Path, dst: Path) -> None:
    found = [name for name in CARRIED_FILES if (src / name).is_file()]
    if found:
        dst.mkdir()
        for name in found:
            shutil.copy2(src / name, dst / name)
