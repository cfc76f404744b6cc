"""Logical axis names -> mesh axes: the one table that decides how parameters and activations are sharded.

Parameters carry logical names from creation (`models/layers.py: param`); this table maps each name to mesh
axes (`data`, `fsdp`, `expert`, `tensor`). A name mapped to None is replicated. Activations use the same
names at block boundaries (`sharding/context.py: constrain`): the residual stream is ("batch", None, None),
logits ("batch", None, "vocab").

`batch` spans `expert` too (as in MaxText): outside the MoE layers the expert axis is just more data
parallelism, and inside them `sharding/expert_parallel.py` regroups the tokens of an expert group.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_concat", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # MLA's latent dims: the input of the up-projections W_UQ [Q, N, H] and W_UKV [K, N, H], whose other dims are
    # heads (tensor) and head_dim. Without tensor parallelism nothing else would split them: DeepSeek-V3's carry
    # 3.3B parameters, 6.2 GiB per chip replicated on every chip of a v5p-512. In the down-projections the same
    # name comes after "embed", which has taken fsdp already, so it stays whole there.
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers: every chip holds its shard of every layer
)


def partition_spec(
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical names to mesh axes, skipping mesh axes that are absent, of size 1, already used, or (when
    `shape` is given) that do not divide the dimension."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept: tuple[str, ...] = ()
        for t in targets:
            if t not in mesh.shape or mesh.shape[t] == 1 or t in used:
                continue
            size = mesh.shape[t] * _prod(mesh.shape[k] for k in kept)
            if shape is not None and shape[i] % size:
                continue
            kept += (t,)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*spec)


def named_sharding(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, mesh, rules, shape))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
