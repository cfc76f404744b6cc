"""The sharding context: which mesh and rules the model code should shard activations with.

    with sharding_context(mesh, rules):
        loss = jitted_step(state, batch)   # traced here: constraints and expert parallelism are active

Model code calls `constrain(x, ("batch", None, None))` at block boundaries; without a context (one device,
tests, conversion) it returns `x` unchanged, so the same model code runs everywhere.

The context is a `jax.make_user_context`, so (mesh, rules) are part of jit's cache key: a function traced
without a context is traced again inside one instead of silently reusing its unsharded trace. It deliberately
does not enter `jax.set_mesh`: under a global mesh flax treats the logical names in each Variable's
`out_sharding` metadata as mesh axes (`nnx.eval_shape` then fails on "vocab"), and the Auto-axis mesh needs
nothing from jax's context because every sharding here is an explicit NamedSharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from openr1_jax.sharding.rules import DEFAULT_RULES, Rules, named_sharding

_CONTEXT = jax.make_user_context(None)  # None or (mesh, rules), both hashable


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules)
    with _CONTEXT((mesh, rules)):
        yield mesh


def current() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the innermost `sharding_context`, or None."""
    return _CONTEXT.value


def current_mesh() -> Mesh | None:
    ctx = current()
    return None if ctx is None else ctx[0]


def activation_sharding(x: jax.Array, logical_axes: Sequence[str | None]) -> NamedSharding | None:
    ctx = current()
    if ctx is None:
        return None
    mesh, rules = ctx
    return named_sharding(logical_axes, mesh, rules, x.shape)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names (axes that do not divide a dimension stay replicated);
    a no-op without a sharding context."""
    sharding = activation_sharding(x, logical_axes)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
