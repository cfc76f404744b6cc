"""Shared by the Pallas GPU (Triton) kernel tests: a relative error, and lowering for CUDA on a CPU machine."""

from __future__ import annotations

from unittest import mock

import jax
import numpy as np


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def lower_for_cuda(fn, *specs) -> str:
    """fn lowered for CUDA (no GPU needed), each Triton module run through the MLIR verifier as XLA will on a GPU
    (the lowering alone accepts modules that XLA then refuses to parse)."""
    from jax._src.pallas.triton import lowering  # internal: the only hook between lowering and serialisation

    lower = lowering.lower_jaxpr_to_triton_module

    def verified(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises with the failing op
        return result

    with mock.patch.object(lowering, "lower_jaxpr_to_triton_module", verified):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
