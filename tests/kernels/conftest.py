"""Kernel tests: Pallas kernels run in interpret mode on CPU; TPU compiles go ahead of time through libtpu.

`tpu_device("v5e")` gives a one-device NamedSharding on a real TPU topology (no TPU needed): jit a function with
it and `.lower(...).compile()` runs libtpu's compiler, Mosaic kernels included, on this CPU machine.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TPU_GENERATIONS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@functools.cache
def tpu_topology(generation: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TPU_GENERATIONS[generation])


# Only a missing libtpu skips: any other failure to describe a topology (e.g. a lock held by another process)
# must fail loudly rather than skip the TPU compiles in silence.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the jax[tpu] extra) is not installed"
)


@pytest.fixture
def tpu_device(no_persistent_cache):
    """name -> a one-device NamedSharding on that TPU generation (replicated spec)."""

    def make(generation: str) -> NamedSharding:
        device = tpu_topology(generation).devices[0]
        return NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())

    return make


def tpu_compile(fn, *args, sharding: NamedSharding):
    """Ahead-of-time compile `fn` for the sharding's TPU device; args are (shape, dtype) pairs or arrays."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    return jax.jit(fn).lower(*specs).compile()
