"""`load_model(path)`: a Hugging Face folder or an openr1-jax checkpoint -> a ready `CausalLM`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig
from openr1_jax.models.params import abstract_model, assign, flat_variables, logical_axes
from openr1_jax.models.scan import stack_flat
from openr1_jax.models.transformer import CausalLM


def load_model(
    path: str | Path,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> CausalLM:
    """Load a model for inference or training.

    path: a Hugging Face folder (config.json + safetensors), an openr1-jax checkpoint folder, or `embedded:base`.
    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: same as dtype).
    mesh: place every parameter on this mesh according to its logical axes.
    overrides: ModelConfig fields that do not change the parameters (e.g. attention_impl="xla", moe_impl="dense",
      scan_layers=True: the per-layer entries are stacked).
    """
    from openr1_jax.convert import checkpoint as ckpt
    from openr1_jax.convert.hf_to_jax import iter_params, plan_conversion, read_hf_config
    from openr1_jax.convert.safetensors_io import SafetensorsReader
    from openr1_jax.data.embedded.base_model import resolve_model_path
    from openr1_jax.sharding.rules import named_sharding

    path = resolve_model_path(path)
    param_dtype = param_dtype or dtype
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise UserError(f"model override(s) {unknown} are not model config fields")

    def shardings(model) -> dict[str, jax.sharding.Sharding | None]:
        return {
            name: named_sharding(logical_axes(var), mesh, shape=var.value.shape) if mesh is not None else None
            for name, var in flat_variables(model).items()
        }

    def per_layer_model(model):
        """The model as checkpoints and HF folders hold it, one entry per layer (itself unless it scans)."""
        if not model.config.scan_layers:
            return model
        return abstract_model(model.config.replace(scan_layers=False), dtype=dtype, param_dtype=param_dtype)

    def stacked_into(model, flat: dict) -> None:
        """Fill the model from per-layer arrays, stacking them on the mesh where the model scans its layers."""
        if model.config.scan_layers:
            place = shardings(model)

            def stack(name, arrays):
                return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=place[name])(*arrays)

            flat = stack_flat(flat, model.config, stack)
        assign(model, flat)

    if ckpt.is_checkpoint(path):
        cfg = ckpt.read_config(path).replace(**overrides)
        model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
        per_layer = per_layer_model(model)
        targets = {
            name: jax.ShapeDtypeStruct(
                var.value.shape,
                var.value.dtype,
                sharding=sh or jax.sharding.SingleDeviceSharding(jax.devices()[0]),
            )
            for (name, var), sh in zip(flat_variables(per_layer).items(), shardings(per_layer).values())
        }
        stacked_into(model, ckpt.load_params(path, targets))
        return model

    read_hf_config(path)
    with SafetensorsReader(path) as reader:
        cfg, plans = plan_conversion(path, reader)
        model = abstract_model(cfg.replace(**overrides), dtype=dtype, param_dtype=param_dtype)
        per_layer = per_layer_model(model)
        variables = flat_variables(per_layer)
        place = shardings(per_layer)
        flat = {}
        # float32 first, so fp8 weights are dequantised exactly before the one cast to the parameter dtype.
        for plan, array in iter_params(reader, plans, np.dtype(np.float32)):
            value = jnp.asarray(array, dtype=variables[plan.path].value.dtype)
            flat[plan.path] = jax.device_put(value, place[plan.path]) if mesh is not None else value
    stacked_into(model, flat)
    return model


__all__ = ["CausalLM", "load_model"]
