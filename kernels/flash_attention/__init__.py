"""Flash attention for training: causal, packed rows (segment ids), GQA and MLA head shapes (H != O).

`flash_attention` validates its inputs, pads the time axis to the kernels' block multiple (padding is its own
segment, so no real token sees it), and runs the backend chosen by `implementation`:

- "auto": the platform's kernel at compile time (`jax.lax.platform_dependent`): TPU -> the Pallas TPU kernel,
  CUDA -> the Pallas GPU kernel where it imports (else XLA), anything else -> the XLA reference. With
  `interpret=True`, "auto" runs the TPU kernel in the Pallas interpreter (how CPU tests exercise it).
- "tpu" / "gpu": that kernel unconditionally (`interpret=True` runs it in the interpreter).
- "xla": the pure-jnp reference, which materialises the [T, T] scores.

Legend: B batch, T time, N query heads, M kv heads (N = M * G, query head n uses kv head n // G),
H query/key head dim, O value head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from openr1_jax_kernels.flash_attention.reference import (
    flash_attention_reference,
    flash_attention_with_lse_reference,
)
from openr1_jax_kernels.flash_attention.tpu import BlockSizes, flash_attention_tpu

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_tpu",
    "flash_attention_with_lse_reference",
]

IMPLEMENTATIONS = ("auto", "tpu", "gpu", "xla")
GPU_TIME_MULTIPLE = 128  # the GPU kernel's contract: T padded to a multiple of 128


def flash_attention(
    q_BxTxNxH: jax.Array,
    k_BxTxMxH: jax.Array,
    v_BxTxMxO: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    *,
    scale: float,
    causal: bool = True,
    block_sizes: BlockSizes | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T * scale, masked) v -> out [B, T, N, O] in q's dtype, differentiable in q, k and v.

    Query t attends key s iff segment_ids[b, t] == segment_ids[b, s] (when given) and, with `causal`, s <= t.
    Every query must see at least one key (true with causal, or when each segment sees itself). Softmax and
    accumulation are float32; inputs are bfloat16 or float32 (one dtype for q, k and v).
    """
    _check(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale, causal, block_sizes, implementation, interpret)
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    kw = dict(scale=float(scale), causal=causal)
    reference = functools.partial(flash_attention_reference, **kw)
    tpu = functools.partial(_tpu, block_sizes=block_sizes, interpret=interpret, **kw)
    args = (q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT)
    if implementation == "xla":
        return reference(*args)
    if implementation == "tpu" or (implementation == "auto" and interpret):
        return tpu(*args)
    gpu_kernel = _gpu_kernel(required=implementation == "gpu")
    if implementation == "auto" and (q_BxTxNxH.shape[3] % 16 or v_BxTxMxO.shape[3] % 16):
        gpu_kernel = None  # the GPU kernel tiles head dims in multiples of 16; XLA takes other (tiny) heads
    gpu = reference if gpu_kernel is None else functools.partial(_gpu, gpu_kernel, interpret=interpret, **kw)
    if implementation == "gpu":
        return gpu(*args)
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=gpu, default=reference)


def _tpu(q, k, v, segment_ids, *, scale, causal, block_sizes, interpret):
    B, T = q.shape[:2]
    blocks, T_padded = block_sizes.fit(T)
    # With causal attention the padded keys come after every real query, so they need no segment of their own.
    segment_ids = _pad_segments(segment_ids, B, T, T_padded, needed=not causal)
    q, k, v = (_pad_time(x, T_padded).transpose(0, 2, 1, 3) for x in (q, k, v))
    out = flash_attention_tpu(q, k, v, segment_ids, scale=scale, causal=causal, block_sizes=blocks, interpret=interpret)
    return out.transpose(0, 2, 1, 3)[:, :T]


def _gpu(kernel, q, k, v, segment_ids, *, scale, causal, interpret):
    B, T = q.shape[:2]
    T_padded = -(-T // GPU_TIME_MULTIPLE) * GPU_TIME_MULTIPLE
    segment_ids = _pad_segments(segment_ids, B, T, T_padded, needed=True)
    q, k, v = (_pad_time(x, T_padded) for x in (q, k, v))
    return kernel(q, k, v, segment_ids, scale=scale, causal=causal, interpret=interpret)[:, :T]


def _gpu_kernel(*, required: bool):
    """The Pallas GPU kernel, or None where it cannot be imported (then "auto" falls back to XLA on CUDA)."""
    try:
        from openr1_jax_kernels.flash_attention.gpu import flash_attention_gpu
    except ImportError as e:
        if required:
            raise ValueError(f"implementation='gpu' needs the Pallas GPU kernel, which failed to import: {e}") from e
        return None
    return flash_attention_gpu


def _pad_time(x, T_padded):
    return jnp.pad(x, [(0, 0), (0, T_padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _pad_segments(segment_ids, B, T, T_padded, *, needed):
    """int32 [B, T_padded] with the padding in a segment of its own (one id above every real one), or None where
    there are no segment ids and either no padding or no need to mask it."""
    if segment_ids is None:
        if T_padded == T or not needed:
            return None
        segment_ids = jnp.zeros((B, T), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if T_padded == T:
        return segment_ids
    pad_id = jnp.max(segment_ids) + 1
    return jnp.concatenate([segment_ids, jnp.broadcast_to(pad_id, (B, T_padded - T))], axis=1)


def _check(q, k, v, segment_ids, scale, causal, block_sizes, implementation, interpret):
    """One ValueError sentence naming the argument for the first thing wrong."""
    for name, x in (("q_BxTxNxH", q), ("k_BxTxMxH", k), ("v_BxTxMxO", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-D array [batch, time, heads, head_dim], got {_shape(x)}.")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(
            f"q, k and v must share one dtype, bfloat16 or float32, got {q.dtype}, {k.dtype} and {v.dtype}."
        )
    B, T, N, H = q.shape
    for name, x in (("k_BxTxMxH", k), ("v_BxTxMxO", v)):
        if x.shape[:2] != (B, T):
            raise ValueError(f"{name} has shape {x.shape}, but batch and time must match q's ({B}, {T}).")
    M = k.shape[2]
    if v.shape[2] != M:
        raise ValueError(f"v_BxTxMxO has {v.shape[2]} heads but k_BxTxMxH has {M}; they must match.")
    if N % M:
        raise ValueError(f"q's {N} heads must be a multiple of k's and v's {M} heads (grouped-query attention).")
    if k.shape[3] != H:
        raise ValueError(f"k_BxTxMxH has head dim {k.shape[3]} but q_BxTxNxH has {H}; they must match.")
    if segment_ids is not None and (
        getattr(segment_ids, "shape", None) != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(f"segment_ids_BxT must be an integer array of shape {(B, T)}, got {_shape(segment_ids)}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float (it is static), got {scale!r}.")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a Python bool, got {causal!r}.")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}.")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a Python bool, got {interpret!r}.")


def _shape(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__}" if shape is None else f"shape {tuple(shape)} ({x.dtype})"
