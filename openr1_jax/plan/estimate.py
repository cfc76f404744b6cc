"""What one compiled program needs per chip, and the roofline estimate of how fast it runs.

  resident state    parameters, optimizer state, float32 gradients, KV caches, a frozen reference: exact, from
                    the shardings of the abstract state (no compile needed)
  activations       everything else the compiled program holds at its peak (temporaries beyond the gradients)
  total             arguments + outputs + temporaries - donated, plus state resident outside this program
                    (GRPO keeps the optimizer state in HBM while it samples), against the chip's HBM; when the
                    compiler runs out of HBM it still says how much it needed: the state plus its temporaries
  step time         max(FLOPs / peak FLOP/s, compiled bytes / HBM bandwidth), FLOPs the larger of the compiled
                    and the model count (Pallas kernels show the compiler only their declared estimates)
  MFU               model FLOPs (train/flops.py's 6N + attention count) over that time at peak

The roofline ignores collectives and assumes every op runs at the chip's peak or at its bandwidth: an
optimistic bound, useful to compare layouts and to catch what cannot work, not a promise.

A model with scanned layers (`scan_layers`, all the big presets) compiles one layer per stack at any depth, so
it is always compiled whole; XLA's cost analysis counts a loop body once, so each stack is compiled a second
time with two (or more) layers per loop step and the difference, one layer's FLOPs and bytes, is multiplied out
(`count_scanned_layers`). Unrolled models up to `FULL_DEPTH_LAYERS` deep are compiled at full depth too:
DeepSeek-V3's 61 unrolled layers take libtpu about 6 minutes and 12 GB of host memory on a 2-core machine.
`--depth sampled` compiles two shallow depths of an unrolled model instead and extrapolates every compiled
quantity (FLOPs, bytes, peak memory) linearly in the number of layers: quick, right for FLOPs and bytes, but rough
for memory, since XLA's scheduler keeps more alive across many unrolled layers than across two (V3 at 4
micro-batches: 129 GiB of activations extrapolated from 5 and 6 layers, 197 GiB compiled at 61).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.scan import unroll_stack
from openr1_jax.plan.topology import Topology
from openr1_jax.train.aot import CompiledStep, StateBytes, StepTooLarge

FULL_DEPTH_LAYERS = 64


@dataclass(frozen=True)
class ProgramPlan:
    """One compiled program (a train step, a rollout decode step, ...) on the slice, per chip."""

    name: str
    tokens: int  # tokens one call processes, all chips together
    state: StateBytes  # per chip, full depth
    activations: int | None  # None: the compiler ran out of memory without a figure (or at a sampled depth)
    total: int | None
    compiled_flops: float | None  # per chip per call
    compiled_bytes: float | None
    model_flops: float  # per chip per call
    error: str | None = None

    def step_seconds(self, topology: Topology) -> float | None:
        if self.compiled_flops is None:
            return None
        chip = topology.chip
        return max(self.work_flops / chip.peak_flops, self.compiled_bytes / chip.hbm_bandwidth)

    @property
    def work_flops(self) -> float | None:
        """The compiler sees into Pallas kernels only through their declared cost estimates, so it can count
        fewer FLOPs than the model does: the larger of the two is the work the roofline times."""
        return None if self.compiled_flops is None else max(self.compiled_flops, self.model_flops)

    def memory_parts(self) -> dict[str, int]:
        s = self.state
        parts = {
            "parameters": s.params,
            "optimizer state": s.optimizer,
            "gradients (fp32)": s.gradients,
            "KV cache": s.kv_cache,
            "frozen reference": s.reference,
            "activations and temporaries": self.activations or 0,
        }
        return {k: v for k, v in parts.items() if v}


@dataclass(frozen=True)
class Depth:
    """How the programs were compiled: all `layers`, or at `sampled` depths and extrapolated."""

    layers: int
    sampled: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.sampled is None:
            return f"all {self.layers} layers compiled"
        a, b = self.sampled
        return f"compiled at {a} and {b} layers, extrapolated to {self.layers}"


def choose_depth(model_cfg: ModelConfig, mode: str) -> Depth:
    """mode: "full", "sampled", or "auto" (sampled when deeper than FULL_DEPTH_LAYERS); scanned layers: full."""
    layers = model_cfg.num_hidden_layers
    # Scanned layers compile as one layer per stack at any depth, and a scan's costs cannot be extrapolated.
    if model_cfg.scan_layers or mode == "full" or (mode == "auto" and layers <= FULL_DEPTH_LAYERS):
        return Depth(layers)
    # Past the leading dense layers every layer is alike (MoE models: dense first_k, then MoE), so the two
    # samples differ by one repeating layer. They start at the second repeating layer: the compiler's buffer
    # reuse makes the very first repeat cheaper than the rest (measured on tiny-moe: +6.5 MB, then +15.5 MB
    # per layer for every further one).
    first = (model_cfg.first_k_dense_replace if model_cfg.is_moe else 0) + 2
    if first + 1 >= layers:
        return Depth(layers)
    return Depth(layers, (first, first + 1))


def with_layers(model_cfg: ModelConfig, layers: int) -> ModelConfig:
    return replace(model_cfg, num_hidden_layers=layers)


def compile_program(
    name: str,
    model_cfg: ModelConfig,
    depth: Depth,
    compile_at: Callable[[ModelConfig], CompiledStep],
    state_at: Callable[[ModelConfig], StateBytes],
    *,
    tokens: int,
    model_flops: float,
    resident_elsewhere: int = 0,
    scans_layers: bool = False,
) -> ProgramPlan:
    """Compile `compile_at(cfg)` at `depth` (extrapolating when sampled). `state_at` gives the exact resident
    state of the full model; `resident_elsewhere` is HBM held outside this program (counted in the total).
    `scans_layers`: the program runs the model's forward pass, which scans its layers if the config says so;
    its FLOPs and bytes are then completed by `count_scanned_layers`."""
    state = state_at(model_cfg)
    common = dict(name=name, tokens=tokens, state=state, model_flops=model_flops)
    error = None
    try:
        if depth.sampled is None:
            step = compile_at(model_cfg)
            if scans_layers and model_cfg.scan_layers:
                step = count_scanned_layers(step, model_cfg, compile_at)
            peak, temp, flops, nbytes = step.peak_bytes, step.memory["temp"], step.flops, step.bytes_accessed
        else:
            a, b = (compile_at(with_layers(model_cfg, n)) for n in depth.sampled)
            extra = depth.layers - depth.sampled[0]

            def extrapolate(f):  # None: a cost probe ran out of HBM (`count_scanned_layers`, `compile_decode`)
                x, y = f(a), f(b)
                return None if x is None or y is None else x + extra * (y - x)

            peak = extrapolate(lambda s: s.peak_bytes)
            temp = extrapolate(lambda s: s.memory["temp"])
            flops = extrapolate(lambda s: s.flops)
            nbytes = extrapolate(lambda s: s.bytes_accessed)
    except StepTooLarge as e:
        error = str(e)
        if depth.sampled is not None or e.temporaries is None:
            return ProgramPlan(
                **common, activations=None, total=None, compiled_flops=None, compiled_bytes=None, error=error
            )
        # The compiler's figure for the whole program: its temporaries (the fp32 gradients among them) on top of
        # the state the program takes as arguments. No cost analysis comes with it.
        temp = e.temporaries
        peak = state.params + state.optimizer + state.kv_cache + state.reference + temp
        flops = nbytes = None
    return ProgramPlan(
        **common,
        activations=max(int(temp) - state.gradients, 0),
        total=int(peak) + resident_elsewhere,
        compiled_flops=None if flops is None else float(flops),
        compiled_bytes=None if nbytes is None else float(nbytes),
        error=error,
    )


def count_scanned_layers(
    step: CompiledStep, model_cfg: ModelConfig, compile_at: Callable[[ModelConfig], CompiledStep]
) -> CompiledStep:
    """XLA's cost analysis counts a loop body once, so a scanned stack of n layers shows the FLOPs and bytes of
    one. Compiling the stack again with u layers per loop step (u the smallest divisor of n above 1, so the loop
    has no remainder) counts u: one layer costs the difference / (u - 1), and the n - 1 missing layers are
    added. A probe that runs out of HBM leaves the costs unknown (None), not wrong."""
    flops, nbytes = step.flops, step.bytes_accessed
    for k, group in enumerate(model_cfg.layer_groups()):
        n = len(group)
        if n < 2:
            continue
        u = next(d for d in range(2, n + 1) if n % d == 0)
        try:
            with unroll_stack(k, u):
                probe = compile_at(model_cfg)
        except StepTooLarge:
            return replace(step, flops=None, bytes_accessed=None)
        flops += (n - 1) * (probe.flops - step.flops) / (u - 1)
        nbytes += (n - 1) * (probe.bytes_accessed - step.bytes_accessed) / (u - 1)
    return replace(step, flops=flops, bytes_accessed=nbytes)


@dataclass(frozen=True)
class Plan:
    """A job on a slice: its programs, and how often each runs per optimizer step."""

    recipe: str  # "sft" | "grpo"
    topology: Topology
    mesh: dict[str, int]
    depth: Depth
    programs: tuple[ProgramPlan, ...]
    calls_per_step: tuple[float, ...]  # per optimizer step, aligned with programs
    train_tokens_per_step: int  # tokens trained on per optimizer step, all chips
    generated_tokens_per_step: int = 0  # GRPO: tokens sampled per optimizer step
    notes: tuple[str, ...] = ()  # what the reader should know about these numbers

    @property
    def fits(self) -> bool:
        hbm = self.topology.chip.hbm_bytes
        return all(p.total is not None and p.total <= hbm for p in self.programs)

    @property
    def error(self) -> str | None:
        return next((p.error for p in self.programs if p.error), None)

    @property
    def step_seconds(self) -> float | None:
        """Seconds per optimizer step: every program's roofline time times its calls per step."""
        times = [p.step_seconds(self.topology) for p in self.programs]
        if any(t is None for t in times):
            return None
        return sum(t * n for t, n in zip(times, self.calls_per_step, strict=True))

    @property
    def model_flops(self) -> float:
        return sum(p.model_flops * n for p, n in zip(self.programs, self.calls_per_step, strict=True))

    @property
    def mfu(self) -> float | None:
        t = self.step_seconds
        return None if not t else self.model_flops / (t * self.topology.chip.peak_flops)

    @property
    def tokens_per_sec_per_chip(self) -> float | None:
        """Trained tokens per second per chip (the number MaxText and TRL quote)."""
        t = self.step_seconds
        return None if not t else self.train_tokens_per_step / t / self.topology.chips

    @property
    def peak(self) -> ProgramPlan:
        """The program with the largest footprint (the one that decides whether the job fits)."""
        return max(self.programs, key=lambda p: float("inf") if p.total is None else p.total)

    def largest_consumer(self) -> tuple[str, int]:
        return max(self.peak.memory_parts().items(), key=lambda kv: kv[1])
