"""The openr1-jax parameter checkpoint: a folder with our model config and an orbax PyTree of parameters.

  CKPT/model_config.json   ModelConfig (our field names) + format marker
  CKPT/params/             orbax checkpoint, tree = nested dotted paths of the NNX state
  CKPT/hf/                 optional files carried from a Hugging Face folder (tokenizer, generation config)

Written incrementally (`orbax` partial saves, a group of tensors at a time) so converting a checkpoint never
holds the whole model in host memory; read back whole, by group, or straight into shardings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from openr1_jax.convert.heap import release_free_memory
from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig
from openr1_jax.models.params import from_nested, to_nested

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_FILES_DIR = "hf"
FORMAT = "openr1-jax-params/1"


def _ocp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import orbax.checkpoint.experimental.v1 as ocp
    return ocp


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def write_config(ckpt_dir: Path, cfg: ModelConfig) -> None:
    data = {"format": FORMAT, "model": cfg.to_dict()}
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{ckpt_dir} is not an openr1-jax checkpoint (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    return ModelConfig.from_dict(data["model"], source=str(path))


def save_params(ckpt_dir: Path, groups: Iterable[dict[str, Any]]) -> None:
    """Save parameters given as an iterable of `{path: array}` groups, one partial save per group."""
    ocp = _ocp()
    target = ckpt_dir / PARAMS_DIR
    # The saves are synchronous, so orbax need not keep its own copy of each host array.
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False  # (option objects passed to Context() are deprecated)
    with context:
        for group in groups:
            ocp.partial.save(target, to_nested(group))
            del group  # else it stays alive while the generator builds the next one
            release_free_memory()
    ocp.partial.finalize(target)


def param_metadata(ckpt_dir: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{path: (shape, dtype)}` of every saved array, without reading any of them."""
    ocp = _ocp()
    target = Path(ckpt_dir).expanduser().absolute() / PARAMS_DIR  # orbax refuses relative paths
    if not target.is_dir():
        raise UserError(f"{ckpt_dir} has no {PARAMS_DIR}/ folder; the checkpoint is incomplete")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.pytree_metadata(target).metadata
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in from_nested(tree).items()}


def load_params(ckpt_dir: str | Path, targets: dict[str, Any], meta: dict | None = None) -> dict[str, Any]:
    """Load the named arrays only. A target is a `jax.ShapeDtypeStruct` (with a sharding: a jax.Array comes
    back, laid out as asked) or None (a numpy array in the stored dtype comes back). `meta`: the result of
    `param_metadata`, when the caller already has it (orbax keeps memory per metadata read)."""
    ocp = _ocp()
    meta = meta or param_metadata(ckpt_dir)
    abstract: dict[str, Any] = {}
    for name, (shape, dtype) in meta.items():
        if name not in targets:
            abstract[name] = ocp.PLACEHOLDER
        elif targets[name] is None:
            abstract[name] = np.empty(shape, dtype)
        else:
            abstract[name] = targets[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.load_pytree(Path(ckpt_dir).expanduser().absolute() / PARAMS_DIR, to_nested(abstract))
    flat = from_nested(tree)
    return {k: flat[k] for k in targets}


def iter_param_groups(ckpt_dir: str | Path, max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream the checkpoint as numpy groups of at most ~max_bytes (a single larger array is its own group)."""
    meta = param_metadata(ckpt_dir)
    for names in chunk_by_bytes(
        [(name, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize) for name, (shape, dtype) in meta.items()],
        max_bytes,
    ):
        yield load_params(ckpt_dir, dict.fromkeys(names), meta)


def chunk_by_bytes(sized: list[tuple[str, int]], max_bytes: int) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    for name, nbytes in sized:
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def device_put_group(group: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]) -> dict[str, Any]:
    return {k: jax.device_put(v, shardings[k]) for k, v in group.items()}


def save_model(
    model, out_dir: str | Path, *, overwrite: bool = False, group_bytes: int = 1 << 30, tokenizer=None
) -> None:
    """Write a model (config + parameters) as an openr1-jax checkpoint, atomically; a tokenizer given goes to
    hf/ (where `generate`, `evaluate` and `serve` look for it, and `jax-to-hf` carries it from). Parameters are
    stored one entry per layer whether or not the model scans its layers (`load_model` stacks them again)."""
    from openr1_jax.fileio import atomic_dir
    from openr1_jax.models.params import flat_variables
    from openr1_jax.models.scan import unstack_flat

    arrays = unstack_flat({name: var.value for name, var in flat_variables(model).items()}, model.config)
    with atomic_dir(out_dir, overwrite=overwrite, all_processes=True) as tmp:
        if jax.process_index() == 0:
            write_config(tmp, model.config)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / HF_FILES_DIR))
        sizes = [(name, a.size * a.dtype.itemsize) for name, a in arrays.items()]
        save_params(tmp, ({n: arrays[n] for n in names} for names in chunk_by_bytes(sizes, group_bytes)))
