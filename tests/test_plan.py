"""`openr1-jax plan`: SFT and GRPO programs compiled for TPU slices on this CPU machine, the per-chip memory
breakdown, the roofline estimate, depth extrapolation against full-depth compiles, the does-not-fit sentence,
presets and bad input. The presets of big models take minutes each: `pytest -m presets` runs them all."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from openr1_jax.errors import UserError
from openr1_jax.plan import (
    check_fits,
    load_preset,
    parse_topology,
    plan_preset,
    plan_sft,
    preset_names,
    run_plan,
    search,
)
from openr1_jax.plan.estimate import Depth, choose_depth
from openr1_jax.plan.report import presets_table
from openr1_jax.rl.config import load_grpo_config
from openr1_jax.train.config import load_sft_config
from openr1_jax.train.sft import resolve_model
from tests.kernels.conftest import needs_libtpu

pytestmark = needs_libtpu
BF16 = ["model.dtype=bfloat16", "batch_size=16"]
TINY = ["model.name_or_path=tiny-moe", "model.dtype=bfloat16", "batch_size=8", "data.seq_len=64"]


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
    (step,) = plan.programs
    assert plan.mesh["fsdp"] == 8 and plan.fits and plan.error is None and plan.depth.sampled is None
    # fsdp splits parameters and Adam's two moments over the 8 chips (small 1-D leaves stay whole).
    s = step.state
    assert 0 < s.params < 8 * 2**20 and 1.5 < s.optimizer / s.params < 2.5
    assert s.gradients >= s.params  # float32 accumulators
    assert s.params + s.optimizer <= step.total <= plan.topology.chip.hbm_bytes
    assert step.compiled_flops >= step.model_flops > 0
    assert plan.step_seconds > 0 and 0 < plan.mfu <= 1 and plan.tokens_per_sec_per_chip > 0


def test_gradient_accumulation_counts_every_micro_batch(no_persistent_cache):
    """XLA's cost analysis counts the accumulation loop's body once; the plan counts it per micro-batch."""
    one = plan_sft(load_sft_config("default", TINY), "v5e-4").programs[0]
    two = plan_sft(load_sft_config("default", [*TINY, "training.gradient_accumulation_steps=2"]), "v5e-4").programs[0]
    assert two.compiled_flops == pytest.approx(one.compiled_flops, rel=0.05)


def test_moe_token_chunks_compile_for_tpu_and_the_report_says_what_the_costs_leave_out(no_persistent_cache):
    """The expert-parallel MoE in token chunks (a rematerialised loop) compiles for a TPU slice, and the report
    warns that XLA counted one chunk."""
    from openr1_jax.plan import format_plan
    from openr1_jax.sharding.mesh import MeshConfig

    cfg = load_sft_config("default", [*TINY, "model.overrides.moe_token_chunks=4"])
    plan = plan_sft(cfg, "v5e-8", mesh=MeshConfig(fsdp=4, expert=2))
    assert plan.fits and plan.step_seconds > 0
    assert "note: the MoE runs its 4 token chunks in a loop" in format_plan(plan)
    assert plan_sft(load_sft_config("default", TINY), "v5e-8", mesh=MeshConfig(fsdp=4, expert=2)).notes == ()


def test_grpo_plan_has_train_rollout_and_reference_programs(no_persistent_cache):
    """The one preset compiled in CI: the embedded GRPO default with a KL term on a v5e-8."""
    plan = plan_preset("embedded-grpo-v5e-8")
    cfg = load_grpo_config("default", load_preset("embedded-grpo-v5e-8").overrides)
    train, decode, reference = plan.programs
    assert [p.name for p in plan.programs] == ["train step", "rollout decode step", "reference log-probs"]
    assert plan.fits and plan.step_seconds > 0 and 0 < plan.mfu <= 1
    T = cfg.max_prompt_length + cfg.max_completion_length
    assert train.tokens == cfg.batch_size * T and plan.calls_per_step[0] == 1
    # the generation's completions decoded in one wave of slots, one generation per optimizer step
    assert cfg.rollout.max_batch_size == cfg.generation_batch_size
    assert decode.tokens == cfg.generation_batch_size and plan.calls_per_step[1] == cfg.max_completion_length
    assert decode.state.kv_cache > 0 and decode.state.gradients == 0
    # co-located sampling: the optimizer state and the frozen reference stay in HBM while the engine decodes
    assert decode.state.optimizer == train.state.optimizer and decode.state.reference == train.state.params
    assert decode.total >= decode.state.optimizer + decode.state.reference + decode.state.params
    # a decode step is one token per slot: far fewer FLOPs than a train step over whole rows
    assert decode.compiled_flops < train.compiled_flops / 10
    assert reference.tokens == cfg.generation_batch_size * T
    assert plan.generated_tokens_per_step == cfg.generation_batch_size * cfg.max_completion_length


def test_a_decode_step_spreads_the_chunks_one_off_work_and_a_failed_probe_leaves_its_costs_unknown(monkeypatch):
    """XLA counts the decode loop's body once and the work around it (cache layouts, hoisted weight casts) in
    full: `compile_decode` compiles the chunk again with two steps per loop iteration (three steps counted) and
    reports one step plus the one-off work / chunk_size. Should that probe run out of HBM, the costs are
    unknown (None), not taken for the whole program's."""
    from openr1_jax.models.presets import load_model_config
    from openr1_jax.sharding.mesh import MeshConfig, make_mesh
    from openr1_jax.train import aot

    def counted(flops: float, nbytes: float) -> aot.CompiledStep:
        return aot.CompiledStep(None, {}, flops, nbytes, aot.StateBytes(0, 0, 0))

    one_off, step = 320.0, 10.0  # the chunk counts one_off + step, the probe one_off + 3 * step
    got = aot._per_decode_step(
        counted(one_off + step, 2 * (one_off + step)), counted(one_off + 3 * step, 2 * (one_off + 3 * step)), 32
    )
    assert (got.flops, got.bytes_accessed) == (step + one_off / 32, 2 * (step + one_off / 32))

    compile_once = aot._compile
    calls = []

    def probe_out_of_hbm(lowered, state):
        calls.append(1)
        if len(calls) == 2:
            raise aot.StepTooLarge("RESOURCE_EXHAUSTED: Ran out of memory on HBM", state)
        return compile_once(lowered, state)

    monkeypatch.setattr(aot, "_compile", probe_out_of_hbm)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    chunk = aot.compile_decode(load_model_config("tiny-moe"), mesh, slots=4, cache_len=16, max_new=8, chunk_size=8)
    assert len(calls) == 2 and chunk.flops is None and chunk.bytes_accessed is None and chunk.peak_bytes > 0


def test_sampled_depth_matches_the_full_compile(no_persistent_cache):
    """Compiling at 3 and 4 layers and extrapolating linearly gives what compiling all 6 layers gives."""
    cfg = load_sft_config("default", [*TINY, "model.overrides.num_hidden_layers=6"])
    full = plan_sft(cfg, "v5e-4", depth="full")
    sampled = plan_sft(cfg, "v5e-4", depth="sampled")
    assert full.depth.sampled is None and sampled.depth.sampled == (3, 4)
    f, s = full.programs[0], sampled.programs[0]
    assert s.state == f.state  # resident state is exact either way
    assert s.compiled_flops == pytest.approx(f.compiled_flops, rel=0.02)
    assert s.compiled_bytes == pytest.approx(f.compiled_bytes, rel=0.05)
    assert s.total == pytest.approx(f.total, rel=0.10)


def test_scanned_layers_count_every_layer_and_hold_less(no_persistent_cache):
    """Scanned layers compile one layer per stack; the plan compiles each stack again with two layers per loop
    step, so its FLOPs and bytes count all six layers as the unrolled compile does, and the activations of a
    scan are no more than the unrolled program's."""
    cfg = load_sft_config("default", [*TINY, "model.overrides.num_hidden_layers=6", "model.overrides.remat=full"])
    unrolled = plan_sft(cfg, "v5e-4").programs[0]
    scanned_cfg = load_sft_config(
        "default",
        [
            *TINY,
            "model.overrides.num_hidden_layers=6",
            "model.overrides.remat=full",
            "model.overrides.scan_layers=true",
        ],
    )
    scanned = plan_sft(scanned_cfg, "v5e-4").programs[0]
    assert scanned.state == unrolled.state
    assert scanned.compiled_flops == pytest.approx(unrolled.compiled_flops, rel=0.03)
    assert scanned.compiled_bytes == pytest.approx(unrolled.compiled_bytes, rel=0.03)
    assert scanned.activations <= unrolled.activations
    # A scan's costs cannot be extrapolated from shallow depths: a scanned model is always compiled in full.
    assert choose_depth(resolve_model(scanned_cfg.model)[0], "sampled") == Depth(6)


def test_search_ranks_layouts_that_divide_the_slice(no_persistent_cache):
    plans = search("sft", load_sft_config("default", TINY), "v5e-8", limit=2)
    assert len(plans) == 2 and all(p.fits for p in plans)
    assert {tuple(p.mesh.values()) for p in plans} == {(1, 8, 1, 1), (1, 4, 2, 1)}  # fsdp 8; fsdp 4 x expert 2
    assert plans[0].step_seconds <= plans[1].step_seconds


def test_too_big_names_what_does_not_fit(no_persistent_cache):
    # 2M x 1024 embedding and head on a v5e-4: the resident state fits in 16 GiB, the temporaries do not.
    cfg = load_sft_config("default", [*BF16, "model.overrides.vocab_size=2000000", "model.overrides.hidden_size=1024"])
    plan = plan_sft(cfg, "v5e-4", mesh=None)
    assert not plan.fits
    # libtpu's out-of-memory error says how many temporaries it needed: the plan still has a total and a breakdown
    (step,) = plan.programs
    assert step.error.startswith("RESOURCE_EXHAUSTED") and step.compiled_flops is None
    assert step.total > plan.topology.chip.hbm_bytes and step.activations > step.state.params
    with pytest.raises(
        UserError,
        match=r"SFT train step does not fit on v5e-4 .*: it needs \S+ GiB per chip against 16.00 GiB \(XLA's figure "
        r"when it ran out of HBM compiling it\), the largest part being activations and temporaries",
    ):
        check_fits(plan)


def test_cli_reports_and_takes_overrides_after_options(no_persistent_cache):
    proc = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "plan", "default", "--topology", "v5e-8", *TINY],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("SFT on v5e-8: 8 chips of v5e") and "tokens/s/chip (roofline)" in proc.stdout
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr  # libtpu's no-metadata warnings are kept off the terminal


def test_plan_runs_beside_another_jax_process(no_persistent_cache):
    # A jax job on this machine (a CPU training run too) loads libtpu, which takes a machine-wide lockfile; the
    # planner only compiles, so it must not need that lock. The test session's own permission is taken away.
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_MULTIPLE_LIBTPU_LOAD", "JAX_PLATFORMS")}
    hold = "import time, jax; jax.devices(); print('up', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        proc = subprocess.run(
            [sys.executable, "-m", "openr1_jax.cli", "plan", "default", "--topology", "v5e-8", *TINY],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s/chip (roofline)" in proc.stdout


def test_cli_bad_topology_is_one_sentence():
    proc = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "plan", "--topology", "v9-8"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("openr1-jax: error: --topology 'v9-8'")


def test_presets_are_valid():
    names = preset_names()
    assert {"deepseek-v3-671b-sft-v5p-512", "deepseek-v3-671b-sft-v6e-256", "embedded-grpo-v5e-8"} <= set(names)
    for model in ("deepseek-v2-lite-16b", "qwen2.5-7b"):
        for recipe in ("sft", "grpo"):
            assert {f"{model}-{recipe}-v5e-8", f"{model}-{recipe}-v6e-8"} <= set(names)
    for name in names:
        preset = load_preset(name)
        cfg = (load_grpo_config if preset.recipe == "grpo" else load_sft_config)(preset.config, preset.overrides)
        assert cfg.model.dtype == "bfloat16", name
    with pytest.raises(UserError, match="--topology is needed"):
        run_plan("default", [], None)


@pytest.mark.presets
@pytest.mark.parametrize("name", preset_names())
def test_every_preset(name, no_persistent_cache):
    plan = plan_preset(name)
    assert plan.step_seconds is None or plan.step_seconds > 0
    assert all(p.state.params > 0 for p in plan.programs)
    if name.startswith("qwen2.5-7b-sft"):
        (step,) = plan.programs
        assert plan.depth.sampled is None and plan.depth.layers == 28  # every layer compiled
        # 7.6B parameters in bf16 over 8 chips; Adam's two bf16 moments
        assert step.state.params == pytest.approx(7.62e9 * 2 / 8, rel=0.02)
        assert step.state.optimizer == pytest.approx(2 * step.state.params, rel=0.01)
    if name == "deepseek-v3-671b-sft-v5p-512":  # scanned layers: 82 GiB of 95 per chip (unrolled: 226)
        assert plan.fits and plan.tokens_per_sec_per_chip > 0


def test_the_compilers_out_of_memory_figure_is_read_in_bytes():
    from openr1_jax.train.aot import compiler_temporaries

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (41.56G) "
        "exceeds available HBM (31.25G)."
    )
    assert compiler_temporaries(message) == int(41.56 * 2**30)
    assert compiler_temporaries("RESOURCE_EXHAUSTED: something else") is None


def test_a_plan_that_does_not_fit_names_the_compiler_or_the_largest_resident_part():
    from openr1_jax.plan.estimate import Depth, Plan, ProgramPlan
    from openr1_jax.plan.topology import parse_topology
    from openr1_jax.train.aot import StateBytes

    def plan(params: int) -> Plan:
        program = ProgramPlan(
            name="train step",
            tokens=1,
            state=StateBytes(params=params, optimizer=2 * params, gradients=2 * params),
            model_flops=1.0,
            activations=None,
            total=None,
            compiled_flops=None,
            compiled_bytes=None,
            error="RESOURCE_EXHAUSTED: Ran out of memory on HBM (105.54G of 95.74G).",
        )
        return Plan("sft", parse_topology("v5p-512"), {"fsdp": 32}, Depth(61, (5, 6)), (program,), (1.0,), 1)

    # The state fits: the compiler's temporaries are what does not, and the sentence says so.
    with pytest.raises(UserError, match=r"XLA ran out of HBM compiling it at 5 of 61 layers \(RESOURCE_EXHAUSTED"):
        check_fits(plan(2**30))
    # The presets table says the same in its memory column.
    assert "| v3 | v5p-512 | fsdp=32 | compiler out of HBM at 5 of 61 layers | no | - | - | - |" in presets_table(
        [("v3", plan(2**30))]
    )
    # The state alone is more than the chip's 95 GiB: name its largest part.
    with pytest.raises(UserError, match=r"needs more than 100.00 GiB .* the largest part being optimizer state"):
        check_fits(plan(20 * 2**30))
