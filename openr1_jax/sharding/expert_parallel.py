"""Expert parallelism for the routed experts of DeepSeekMoE: dropless, exact, and runnable on XLA:CPU.

The mesh axis that the rules give to `experts` (default `expert`, size ep) splits the E experts into ep
groups of E/ep; `expert_mlp` (F) may be split further over `tensor`. Routing happens outside, on the global
token set, so every device sees the same (gate, expert) choices as a single device would. Inside
`jax.shard_map` each device:

  1. all-gathers the tokens, gates and expert ids of its expert group over `expert` (tokens are sharded over
     the batch axes, which include `expert`): [T/ep, D] -> [T, D] per group;
  2. runs its E/ep local experts on the (token, expert) pairs routed to them with `jax.lax.ragged_dot`; pairs
     of other devices' experts sort last, outside every group, and contribute zero;
  3. weights each pair by its gate and sums over k, then `psum_scatter`s over `expert` (each token gets the
     sum of all its experts' outputs and returns to its owner) and `psum`s over `tensor` (partial sums of the
     down projection over F shards).

Trade-off against the usual all-to-all dispatch: no capacity factor and no dropped tokens, and it needs only
`all_gather`/`psum_scatter` (XLA:CPU has no `ragged-all-to-all`, and a padded `all_to_all` must size its
buffers for the worst case, ep times the average, to stay dropless). The price: the gathered activations are
ep times larger ([T_group, D] per device instead of ~[T_group * k / ep, D]) and the grouped matmul walks all
T_group * k rows although only the local experts' rows do work. That is cheap for ep <= 8 on ICI; for wider
expert parallelism a ragged all-to-all (TPU) is the better transport and plugs in here.

At DeepSeek-V3's scale the [T_group * k, D] buffers of step 2 are what runs out of HBM (4096 tokens per chip,
ep = 8, k = 8: 3.5 GiB each in bf16, and TPU scatters and gathers them as 32-bit words). `token_chunks` > 1 runs
step 2 on that many slices of the gathered tokens in turn, each rematerialised in the backward pass, so the
buffers shrink by that factor; the result is the same, and each chunk reads the local experts' weights again.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from openr1_jax.models.kernels import grouped_matmul
from openr1_jax.sharding.rules import Rules, partition_spec


def expert_axis(mesh: Mesh, rules: Rules, num_experts: int) -> str | None:
    """The single mesh axis (size > 1) the experts are split over, or None when expert parallelism is off."""
    spec = partition_spec(("experts",), mesh, rules, (num_experts,))[0]
    return spec if isinstance(spec, str) else None


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def expert_parallel_ffn(
    x_TxD: jax.Array,
    gates_TxK: jax.Array,
    experts_TxK: jax.Array,
    weights: tuple[jax.Array, jax.Array, jax.Array],
    *,
    mesh: Mesh,
    rules: Rules,
    dtype,
    impl: str = "ragged",
    token_chunks: int = 1,
) -> jax.Array:
    """sum_k gate_k * SwiGLU_{expert_k}(x) for every token, experts split over the mesh (see module doc).

    weights: gate/up [E, D, F] and down [E, F, D]. Equals `RoutedExperts.ragged` on one device. Without an
    expert axis (ep = 1) every device runs all experts on its own tokens: the per-device form that the Pallas
    grouped matmul (`impl`, see `models/kernels.py`) needs, since XLA cannot partition a Mosaic kernel.
    """
    w_gate, w_up, w_down = weights
    E, D, F = w_gate.shape
    T = experts_TxK.shape[0]
    ep = expert_axis(mesh, rules, E)
    token_axes = _axes(partition_spec(("batch", None), mesh, rules, (T, D))[0])
    f_axes = tuple(a for a in _axes(partition_spec(("expert_mlp",), mesh, rules, (F,))[0]) if a != ep)
    if set(f_axes) & set(token_axes):  # an axis cannot carry both tokens and F: keep F whole
        f_axes = ()
    gathered = ep is not None and ep in token_axes  # else the tokens are replicated over `ep` already
    f_entry = f_axes or None
    tok = PartitionSpec(token_axes or None, None)
    in_specs = (
        tok,
        tok,
        tok,
        PartitionSpec(ep, None, f_entry),
        PartitionSpec(ep, None, f_entry),
        PartitionSpec(ep, f_entry, None),
    )
    body = partial(
        _local_experts, ep=ep, f_axes=f_axes, gathered=gathered, dtype=dtype, impl=impl, token_chunks=token_chunks
    )
    # pallas_call outputs carry no varying-axes annotation (and its spelling differs across jax versions), so
    # the kernels run without the vma type check; the XLA path keeps it.
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok, check_vma=not impl.startswith("pallas"))
    return run(x_TxD, gates_TxK, experts_TxK, w_gate, w_up, w_down)


def _local_experts(
    x_TxD, gates_TxK, experts_TxK, w_gate, w_up, w_down, *, ep, f_axes, gathered, dtype, impl, token_chunks
):
    """One device: its E/ep experts (and F/tp slice of each) on the pairs routed to them."""
    if gathered:
        x_TxD, gates_TxK, experts_TxK = (
            jax.lax.all_gather(a, ep, axis=0, tiled=True) for a in (x_TxD, gates_TxK, experts_TxK)
        )
    elif ep is not None and not impl.startswith("pallas"):
        # Replicated tokens: mark them device-varying explicitly (transpose: psum of the per-device partial
        # gradients). Left implicit, the gather-by-local-order below got wrong input gradients (jax 0.10.2).
        # (The kernels' shard_map runs without the vma check, whose transpose psums replicated inputs itself.)
        x_TxD, gates_TxK = (jax.lax.pcast(a, ep, to="varying") for a in (x_TxD, gates_TxK))
    first_expert = 0 if ep is None else jax.lax.axis_index(ep) * w_gate.shape[0]
    ep_size = 1 if ep is None else jax.lax.axis_size(ep)
    pairs = partial(
        _routed_pairs,
        first_expert=first_expert,
        local_share=1 / ep_size,
        weights=(w_gate, w_up, w_down),
        dtype=dtype,
        impl=impl,
    )
    T, D = x_TxD.shape
    chunks = math.gcd(token_chunks, T)  # a chunk count that does not divide the tokens falls back to a divisor
    if chunks == 1:
        y_TxD = pairs(x_TxD, gates_TxK, experts_TxK)
    else:
        # One chunk at a time, each recomputed in the backward pass: only one chunk's buffers are ever live. (A
        # loop: unrolled, even with optimization barriers between the chunks, XLA:TPU overlaps them and keeps
        # half the memory saved - DeepSeek-V3, 5 layers: 40.6 GiB unchunked, 27.8 unrolled, 19.0 as a loop.)
        remat_pairs = jax.checkpoint(pairs, prevent_cse=False)
        split = tuple(a.reshape(chunks, T // chunks, *a.shape[1:]) for a in (x_TxD, gates_TxK, experts_TxK))
        y_TxD = jax.lax.map(lambda chunk: remat_pairs(*chunk), split).reshape(T, D)
    if gathered:
        y_TxD = jax.lax.psum_scatter(y_TxD, ep, scatter_dimension=0, tiled=True)
    elif ep is not None:
        y_TxD = jax.lax.psum(y_TxD, ep)
    if f_axes:
        y_TxD = jax.lax.psum(y_TxD, f_axes)
    return y_TxD.astype(dtype)


def _routed_pairs(x_TxD, gates_TxK, experts_TxK, *, first_expert, local_share, weights, dtype, impl):
    """sum_k gate_k * SwiGLU_{expert_k}(x) over the pairs whose expert is local ([T, D], float32).

    local_share: the fraction of the pairs expected on this device's experts when routing is balanced (1/ep);
    the grouped matmuls walk all T*K rows but skip the tail, so their declared cost counts only that share."""
    w_gate, w_up, w_down = weights
    T, K = experts_TxK.shape
    cost_rows = math.ceil(T * K * local_share)
    E_local = w_gate.shape[0]
    local_TxK = experts_TxK - first_expert
    mine_TxK = (local_TxK >= 0) & (local_TxK < E_local)
    # Other devices' pairs get group id E_local: sorted after every local group, they fall outside them all.
    group_of_pair = jnp.where(mine_TxK, local_TxK, E_local).reshape(-1)
    order = jnp.argsort(group_of_pair, stable=True)
    group_sizes = jnp.bincount(group_of_pair, length=E_local + 1)[:E_local].astype(jnp.int32)
    x_sorted = x_TxD.astype(dtype)[order // K]
    h = jax.nn.silu(grouped_matmul(x_sorted, w_gate, group_sizes, impl, cost_rows))
    h = h * grouped_matmul(x_sorted, w_up, group_sizes, impl, cost_rows)
    y_sorted = grouped_matmul(h, w_down, group_sizes, impl, cost_rows)
    y_sorted = jnp.where((group_of_pair[order] < E_local)[:, None], y_sorted, 0)
    y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, K, -1)
    return jnp.einsum("TKD,TK->TD", y_TxKxD.astype(jnp.float32), jnp.where(mine_TxK, gates_TxK, 0.0))
