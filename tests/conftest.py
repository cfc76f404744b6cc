"""Test session set-up: CPU only, 8 simulated devices, float32 matmuls at full precision, a compile cache."""

import gc
import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TPU ahead-of-time compiles load libtpu; let a second process (a subprocess test, a parallel run) load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/openr1_jax_test_jit"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
    """Every compiled XLA:CPU program keeps its machine code mapped; hundreds of them in one test process pass
    Linux's vm.max_map_count (65530) and the next compile crashes (seen in CI at ~80% of the suite). Dropping jax's
    caches after each module unmaps them; the persistent cache above makes a recompile cheap."""
    yield
    jax.clear_caches()
    gc.collect()


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
    compile and cache-read code after TPU compiles had run earlier in the session). Under `pytest -n 2` they are
    the last units of work (tests/scheduling.py), so a worker that has started on them gets nothing else."""
    tpu = [item for item in items if "no_persistent_cache" in getattr(item, "fixturenames", ())]
    items[:] = [item for item in items if item not in tpu] + tpu


if importlib.util.find_spec("xdist") is not None:  # the test extra has it; a bare `pytest` still runs without

    def pytest_xdist_make_scheduler(config, log):
        from tests.scheduling import FileRunScheduling

        return FileRunScheduling(config, log)
