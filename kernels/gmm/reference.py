"""Pure-XLA grouped matmul: the ground truth for the Pallas kernels and the "xla" backend.

Both functions are jax.lax.ragged_dot(_general), which XLA lowers natively on TPU and GPU and as a loop on CPU,
and which jax differentiates on its own. Group g owns rows [start_g, start_g + group_sizes[g]) of the row-sorted
operand; rows past sum(group_sizes) belong to no group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gmm_reference", "tgmm_reference"]

# tgmm contracts over the ragged row dimension, which gives one [K, N] output per group.
_TGMM_DIMENSIONS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=()
)


def gmm_reference(lhs_MxK, rhs_GxKxN, group_sizes_G, *, preferred_element_type=None):
    """out_MxN[rows of g] = lhs[rows of g] @ rhs[g]; rows past sum(group_sizes) are zeros."""
    dtype = jnp.result_type(lhs_MxK.dtype, rhs_GxKxN.dtype)
    return jax.lax.ragged_dot(
        lhs_MxK.astype(dtype),
        rhs_GxKxN.astype(dtype),
        group_sizes_G.astype(jnp.int32),
        preferred_element_type=preferred_element_type or dtype,
    )


def tgmm_reference(lhs_MxK, grad_MxN, group_sizes_G, *, num_groups=None, preferred_element_type=None):
    """out_GxKxN[g] = lhs[rows of g].T @ grad[rows of g]; empty groups give zeros."""
    if num_groups is not None and num_groups != group_sizes_G.shape[0]:
        raise ValueError(f"num_groups is {num_groups} but group_sizes has {group_sizes_G.shape[0]} entries.")
    dtype = jnp.result_type(lhs_MxK.dtype, grad_MxN.dtype)
    return jax.lax.ragged_dot_general(
        lhs_MxK.astype(dtype),
        grad_MxN.astype(dtype),
        group_sizes_G.astype(jnp.int32),
        _TGMM_DIMENSIONS,
        preferred_element_type=preferred_element_type or dtype,
    )
