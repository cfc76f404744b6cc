"""Scanned layers: L alike decoder blocks stored as one block whose variables are stacked [L, ...] (logical axis
"layers"), run by `jax.lax.scan` so that XLA compiles the block once (as MaxText's `scan_layers`).

Why: an unrolled 61-layer DeepSeek-V3 step takes libtpu minutes and gigabytes to compile, and its scheduler
keeps more alive across unrolled layers than one layer needs; a scan keeps only the carried residual stream
(and, under remat, each layer's input) plus one layer's working set.

The stacked block is a plain `DecoderBlock` module (built from L blocks made one by one, so a scanned model
holds exactly the values the unrolled model with the same seed would). Its path in the model state is
`layer_stacks.K.<the block's own paths>`; `unstack_flat`/`stack_flat` translate to and from the per-layer
`layers.N.<...>` names that checkpoints and converters use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.config import ModelConfig

LAYERS_AXIS = "layers"
STACKS = "layer_stacks"

_UNROLL: ContextVar[tuple[tuple[int, int], ...]] = ContextVar("scan_unroll", default=())


@contextmanager
def unroll_stack(stack: int, copies: int) -> Iterator[None]:
    """While tracing inside this context, stack `stack` runs `copies` layers per loop step (`lax.scan`'s
    unroll). XLA's cost analysis counts a loop body once; `openr1-jax plan` compiles each stack this way a
    second time and multiplies the difference out, so that its FLOPs and bytes count every layer."""
    token = _UNROLL.set(((stack, copies), *_UNROLL.get()))
    try:
        yield
    finally:
        _UNROLL.reset(token)


def stack_unroll(stack: int) -> int:
    return dict(reversed(_UNROLL.get())).get(stack, 1)


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """One module with the blocks' variables stacked along a new leading "layers" axis."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))
    module = nnx.merge(graphdef, stacked)
    for _, var in nnx.to_flat_state(nnx.state(module)):
        axes = var.get_metadata().get("out_sharding") or (None,) * (var.get_value().ndim - 1)
        var.set_metadata(out_sharding=(LAYERS_AXIS, *axes))
    return module


def unstack_blocks(stack: nnx.Module, layers: int) -> list[nnx.Module]:
    """The stack's `layers` layers as ordinary blocks (their variables are slices of the stacked ones)."""
    graphdef, state = nnx.split(stack)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(layers)]


def scan_blocks(
    stack: nnx.Module,
    x: jax.Array,
    apply: Callable[..., jax.Array],
    policy: Callable | None,
    remat: bool,
    unroll: int = 1,
) -> jax.Array:
    """x -> apply(block_L-1, ... apply(block_0, x)), one `lax.scan` step per layer.

    `apply(block, x)` may sow `nnx.Intermediate` values (the MoE statistics); they come out of the scan stacked
    [L, ...] and are sown once, stacked, on the stack's own submodules, so that `nnx.capture` finds them under
    the stack's path (e.g. `layer_stacks.1.mlp`). `remat` checkpoints each layer (`policy` as `jax.checkpoint`)."""
    graphdef, state = nnx.split(stack)

    def body(x, layer_state):
        block = nnx.merge(graphdef, layer_state)
        y, sown = nnx.capture(apply, nnx.Intermediate)(block, x)
        return y, sown

    if remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # a scan body is not CSEd across steps
    x, sown_per_layer = jax.lax.scan(body, x, state, unroll=unroll)
    _sow_stacked(stack, sown_per_layer)
    return x


def _sow_stacked(stack: nnx.Module, sown: nnx.State) -> None:
    modules = dict(nnx.iter_modules(stack))
    for path, var in nnx.to_flat_state(sown):
        *module_path, name = path
        values = var.get_value()
        for value in values if isinstance(values, tuple) else (values,):
            modules[tuple(module_path)].sow(nnx.Intermediate, name, value)


# ----------------------------------------------------------------------------------------------------------
# Flat names: the stacked `layer_stacks.K.<rest>` [L, ...] <-> per-layer `layers.N.<rest>` (checkpoints).
# ----------------------------------------------------------------------------------------------------------
def unstack_flat(flat: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Per-layer names and values from a scanned model's flat state (other entries pass through)."""
    if not cfg.scan_layers:
        return flat
    groups = cfg.layer_groups()
    out = {}
    for name, value in flat.items():
        stack, rest = _split_stack_name(name)
        if stack is None:
            out[name] = value
            continue
        for i, layer in enumerate(groups[stack]):
            out[f"layers.{layer}.{rest}"] = value[i]
    return out


def stack_flat(
    flat: dict[str, Any], cfg: ModelConfig, stack: Callable[[str, list], Any] | None = None
) -> dict[str, Any]:
    """The inverse of `unstack_flat`: per-layer entries become one stacked entry per (stack, variable).

    `stack(name, arrays)` builds the stacked entry `name` (default `jnp.stack`; a loader passes one that places
    it on its mesh). The per-layer entries are popped from `flat` as they are stacked, so a caller that holds
    no other reference to them needs memory for one variable's stack beyond the model, not a second model."""
    if not cfg.scan_layers:
        return flat
    stack = stack or (lambda _, arrays: jnp.stack(arrays))
    out = {name: value for name, value in flat.items() if not name.startswith("layers.")}
    for k, group in enumerate(cfg.layer_groups()):
        prefix = f"layers.{group[0]}."
        for name in [n for n in flat if n.startswith(prefix)]:
            rest = name[len(prefix) :]
            stacked_name = f"{STACKS}.{k}.{rest}"
            out[stacked_name] = stack(stacked_name, [flat.pop(f"layers.{layer}.{rest}") for layer in group])
    return out


def _split_stack_name(name: str) -> tuple[int | None, str]:
    head, _, tail = name.partition(".")
    if head != STACKS:
        return None, name
    index, _, rest = tail.partition(".")
    return int(index), rest
