"""`openr1-jax plan`: the embedded default's SFT step compiled for a TPU v5e-8 slice on this CPU machine, the
per-chip memory breakdown, the roofline estimate, the does-not-fit sentence and bad topologies."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from openr1_jax.errors import UserError
from openr1_jax.plan import check_fits, parse_topology, plan_sft, search_sft
from openr1_jax.train.config import load_sft_config
from tests.kernels.conftest import needs_libtpu

pytestmark = needs_libtpu
BF16 = ["model.dtype=bfloat16", "batch_size=16"]


@pytest.fixture(autouse=True)
def tpu_default_precision():
    """The test session asks for "highest" matmul precision (float32 CPU checks); XLA:TPU's grouped matmul
    (a Mosaic kernel inside the compiler) rejects that on bfloat16, and real TPU runs use the default."""
    with jax.default_matmul_precision("default"):
        yield


def test_topology_names():
    v5p = parse_topology("v5p-512")
    assert (v5p.chips, v5p.grid, v5p.chip.hbm_bytes) == (256, "v5p:4x8x8", 95 * 2**30)
    assert parse_topology("v5litepod-8").grid == parse_topology("v5e-8").grid == "v5e:2x4"
    assert parse_topology("v6e-256").chips == 256
    for bad in ("v4-8", "v5p-3", "v6e-12", "tpu"):
        with pytest.raises(UserError, match="--topology"):
            parse_topology(bad)


def test_plan_of_the_embedded_default_on_v5e_8(no_persistent_cache):
    cfg = load_sft_config("default", BF16)
    plan = plan_sft(cfg, "v5e-8")
    assert plan.mesh["fsdp"] == 8 and plan.fits and plan.error is None
    # fsdp splits parameters and Adam's two moments over the 8 chips (small 1-D leaves stay whole).
    assert 0 < plan.params < 8 * 2**20 and 1.5 < plan.optimizer / plan.params < 2.5
    assert plan.gradients >= plan.params  # float32 accumulators
    assert plan.params + plan.optimizer <= plan.total <= plan.topology.chip.hbm_bytes
    assert plan.compiled_flops >= plan.model_flops > 0
    assert plan.step_seconds > 0 and 0 < plan.mfu <= 1 and plan.tokens_per_sec_per_chip > 0


def test_search_ranks_layouts_that_divide_the_slice(no_persistent_cache):
    plans = search_sft(load_sft_config("default", BF16), "v5e-8", limit=2)
    assert len(plans) == 2 and all(p.fits for p in plans)
    assert {tuple(p.mesh.values()) for p in plans} == {(1, 8, 1, 1), (1, 4, 2, 1)}  # fsdp 8; fsdp 4 x expert 2
    assert plans[0].step_seconds <= plans[1].step_seconds


def test_too_big_names_the_largest_consumer(no_persistent_cache):
    # 2M x 1024 embedding and head: ~16 GiB of float32 parameters on one v5e chip, Adam twice that.
    cfg = load_sft_config("default", [*BF16, "model.overrides.vocab_size=2000000", "model.overrides.hidden_size=1024"])
    plan = plan_sft(cfg, "v5e-4", mesh=None)
    assert not plan.fits
    with pytest.raises(UserError, match=r"does not fit on v5e-4 .* the largest part being optimizer state"):
        check_fits(plan)


def test_cli_reports_and_takes_overrides_after_options(no_persistent_cache):
    proc = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "plan", "default", "--topology", "v5e-8", *BF16],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("v5e-8: 8 chips of v5e") and "tokens/s/chip (roofline)" in proc.stdout


def test_cli_bad_topology_is_one_sentence():
    proc = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "plan", "--topology", "v9-8"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("openr1-jax: error: --topology 'v9-8'")
