"""Model code -> the Pallas kernels of `openr1_jax_kernels`, one function per op.

Each kernel picks its platform's implementation when compiled (TPU Pallas, GPU Pallas, or the jnp reference on
CPU); `interpret=True` runs the TPU kernel in the Pallas interpreter, which is how the CPU tests exercise it.

Mosaic (TPU) kernels cannot be partitioned by XLA, so under a sharding context every call runs inside
`jax.shard_map` on per-device blocks: rows over the batch axes, heads over `tensor` where it divides the kv
heads (query head n of a device still meets its kv head n // G, since both head axes split into equal
contiguous runs). Nothing in these ops mixes rows or heads, so no collective is needed.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec

from openr1_jax.models.blocked_matmul import blocked_ragged_dot
from openr1_jax.sharding.context import current
from openr1_jax.sharding.rules import partition_spec


def _per_device(fn, args, logical_axes):
    """`fn(*args)` directly, or in shard_map with each arg split by its logical axes under a sharding context.
    The output [B, T, N, .] splits like the first argument (the queries)."""
    ctx = current()
    if ctx is None:
        return fn(*args)
    mesh, rules = ctx
    specs = tuple(partition_spec(axes, mesh, rules, a.shape) for a, axes in zip(args, logical_axes, strict=True))
    out_spec = PartitionSpec(*specs[0][:-1], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def flash_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale: float, *, interpret: bool):
    from openr1_jax_kernels.flash_attention import flash_attention as kernel

    fn = functools.partial(kernel, scale=scale, causal=True, interpret=interpret)
    M = k_BxTxMxH.shape[2]
    heads = "kv_heads" if _divides_heads(M) else None
    qkv_axes = ("batch", None, heads, None)
    return _per_device(
        fn,
        (q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT),
        (qkv_axes, qkv_axes, qkv_axes, ("batch", None)),
    )


def latent_decode_attention(q_latent_BxTxNxK, q_rope_BxTxNxR, latent_BxSxK, k_rope_BxSxR, start_B, scale, *, interpret):
    from openr1_jax_kernels.latent_decode import latent_decode_attention as kernel

    fn = functools.partial(kernel, scale=scale, interpret=interpret)
    heads = "q_heads" if _divides_heads(q_latent_BxTxNxK.shape[2]) else None
    q_axes = ("batch", None, heads, None)
    return _per_device(
        fn,
        (q_latent_BxTxNxK, q_rope_BxTxNxR, latent_BxSxK, k_rope_BxSxR, start_B),
        (q_axes, q_axes, ("batch", None, None), ("batch", None, None), ("batch",)),
    )


def _divides_heads(num_heads: int) -> bool:
    """Whether the mesh's head axis splits `num_heads` (else heads stay whole on every device)."""
    ctx = current()
    if ctx is None:
        return False
    mesh, rules = ctx
    return partition_spec(("kv_heads",), mesh, rules, (num_heads,))[0] is not None


def grouped_matmul(x_MxK, w_GxKxN, group_sizes_G, impl: str, cost_rows: int | None = None) -> jax.Array:
    """Rows of x sorted by group times their group's weight (the semantics of `jax.lax.ragged_dot`); called on
    per-device blocks already (inside the MoE's shard_map) or without a sharding context. The XLA path uses
    `ragged_dot` where XLA lowers it natively (TPU) and the blocked form elsewhere (`blocked_matmul.py`).
    cost_rows: the rows expected to fall in a group, for the Pallas kernel's declared cost (see `gmm`)."""
    if impl in ("ragged", "dense"):
        return jax.lax.platform_dependent(
            x_MxK, w_GxKxN, group_sizes_G, tpu=jax.lax.ragged_dot, default=blocked_ragged_dot
        )
    from openr1_jax_kernels.gmm import gmm

    return gmm(x_MxK, w_GxKxN, group_sizes_G, interpret=impl == "pallas_interpret", cost_rows=cost_rows)
