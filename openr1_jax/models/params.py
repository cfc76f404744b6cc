"""Parameters as flat `{dotted.path: array}` dicts: the common currency of checkpoints and converters.

Models are built abstractly first (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory), then
filled from a checkpoint, so no code path needs a full model materialised on one host before loading.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.transformer import CausalLM


def path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def build_model(cfg: ModelConfig, *, dtype="float32", param_dtype="float32", seed: int = 0) -> CausalLM:
    return CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype="float32", param_dtype="float32") -> CausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: costs no memory, even for DeepSeek-V3 671B."""
    return nnx.eval_shape(lambda: build_model(cfg, dtype=dtype, param_dtype=param_dtype))


def flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every state variable (parameters and buffers such as the router bias), keyed by dotted path; values sown
    by a forward pass (`nnx.Intermediate`, e.g. MoE statistics) are not state and are left out."""
    state = nnx.state(model, nnx.Not(nnx.Intermediate))
    return {path_str(path): var for path, var in nnx.to_flat_state(state)}


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(var.get_metadata().get("out_sharding") or (None,) * var.value.ndim)


def to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": x}` -> `{"a": {"b": x}}` (string keys only, as orbax stores them)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def from_nested(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(from_nested(value, name + "."))
        else:
            flat[name] = value
    return flat


def assign(model: nnx.Module, flat: dict[str, Any], dtype_of_model: bool = True) -> None:
    """Fill a (possibly abstract) model with arrays, cast to each variable's dtype."""
    variables = flat_variables(model)
    missing = sorted(set(variables) - set(flat))
    if missing:
        raise KeyError(f"missing parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, var in variables.items():
        value = flat[name]
        if dtype_of_model and value.dtype != var.value.dtype:
            value = jnp.asarray(value).astype(var.value.dtype)
        var.value = value if isinstance(value, jax.Array) else jnp.asarray(value)


def count_params(model: nnx.Module) -> int:
    return sum(int(v.value.size) for v in flat_variables(model).values())
