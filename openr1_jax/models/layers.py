"""Building blocks shared by every model of the family: parameters with logical axes, RMSNorm, dense
projections written as einsums, the token embedding and the SwiGLU MLP.

Shape legend (used in einsum strings and `_BxTxD`-style names throughout `models/`):
  B batch, T time (sequence), S key time, D model width, N query heads, M key/value heads, H head dim,
  K kv latent (kv_lora_rank), Q q latent (q_lora_rank), R rope head dim, E experts, F ffn width, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from openr1_jax.models.config import MLPConfig

Dtype = jnp.dtype | str


class RouterBias(nnx.Variable):
    """A buffer that is learned outside the optimizer (DeepSeek-V3's aux-loss-free expert bias)."""


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Dtype,
    init: str = "normal",
    std: float = 0.02,
    kind: type[nnx.Variable] = nnx.Param,
) -> nnx.Variable:
    """A parameter carrying its logical axis names (mapped to mesh axes by `openr1_jax.sharding`)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return kind(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * g, computed in float32 and cast back (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(None, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.value.astype(x.dtype) * normed.astype(x.dtype)


class Linear(nnx.Module):
    """y = einsum(spec, x, W) (+ b). The kernel keeps the shape the math wants, e.g. [D, N, H] for a query
    projection, so einsum strings read like the equations and heads can be sharded by name."""

    def __init__(
        self,
        spec: str,
        shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        bias_shape: Sequence[int] | None = None,
        bias_axes: Sequence[str | None] | None = None,
        param_dtype: Dtype,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.dtype = dtype
        self.kernel = param(rngs, shape, axes, param_dtype)
        self.bias = param(None, bias_shape, bias_axes, param_dtype, init="zeros") if bias_shape else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel.value.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.value, ids_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD: jax.Array) -> jax.Array:
        """Tied output head: logits against the embedding matrix."""
        return jnp.einsum("BTD,VD->BTV", x_BxTxD, self.embedding.value.astype(self.dtype))


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, cfg: MLPConfig, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        bias = cfg.bias
        self.gate_proj = Linear(
            "BTD,DF->BTF",
            (D, F),
            ("embed", "mlp"),
            bias_shape=(F,) if bias else None,
            bias_axes=("mlp",),
            **kw,
        )
        self.up_proj = Linear(
            "BTD,DF->BTF",
            (D, F),
            ("embed", "mlp"),
            bias_shape=(F,) if bias else None,
            bias_axes=("mlp",),
            **kw,
        )
        self.down_proj = Linear(
            "BTF,FD->BTD",
            (F, D),
            ("mlp", "embed"),
            bias_shape=(D,) if bias else None,
            bias_axes=("embed",),
            **kw,
        )

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))
