"""Test session set-up: CPU only, 8 simulated devices, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TPU ahead-of-time compiles load libtpu; let a second process (a subprocess test, a parallel run) load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache: three fresh-clone runs crashed inside it (an abort writing an entry, a segfault
# reading one) late in the session, after hundreds of compiles; each process keeps jax's in-memory cache.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture
def no_persistent_cache():
    """Marks a test that compiles for TPU ahead of time (it runs last, see below) and keeps its executables out of
    jax's persistent cache, which cannot read back TPU executables compiled without a TPU client."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def pytest_collection_modifyitems(config, items):
    """Tests that compile for TPU ahead of time (they use `no_persistent_cache`) load libtpu into this process;
    they run last, so no CPU compile follows libtpu in the same process (two CI runs crashed inside XLA:CPU's
    compile and cache-read code after TPU compiles had run earlier in the session)."""
    tpu = [item for item in items if "no_persistent_cache" in getattr(item, "fixturenames", ())]
    items[:] = [item for item in items if item not in tpu] + tpu
