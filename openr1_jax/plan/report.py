"""The plan as text: the per-chip report, the search ranking, the presets table, the does-not-fit sentence."""

from __future__ import annotations

from openr1_jax.errors import UserError
from openr1_jax.plan.estimate import Plan, ProgramPlan
from openr1_jax.plan.topology import GIB


def gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def mesh_text(mesh: dict[str, int]) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "1 chip"


def _program_lines(p: ProgramPlan, plan: Plan, calls: float) -> list[str]:
    chip = plan.topology.chip
    lines = [f"{p.name} ({p.tokens} tokens per call, {calls:g} calls per optimizer step), per chip:"]
    lines += [f"  {what:29s}{gib(size)}" for what, size in p.memory_parts().items()]
    fits = p.total is not None and p.total <= chip.hbm_bytes
    lines.append(f"  {'total':29s}{gib(p.total)} of {gib(chip.hbm_bytes)}" + ("" if fits else "  DOES NOT FIT"))
    seconds = p.step_seconds(plan.topology)
    if seconds is not None:
        bound = "FLOPs" if p.work_flops / chip.peak_flops >= p.compiled_bytes / chip.hbm_bandwidth else "HBM"
        lines += [
            f"  {'FLOPs per call':29s}{p.compiled_flops:.3e} compiled, {p.model_flops:.3e} model",
            f"  {'time per call (roofline)':29s}{_seconds(seconds)} ({bound}-bound)",
        ]
    if p.error:
        lines.append(f"  compiler: {p.error}")
    return lines


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def format_plan(plan: Plan) -> str:
    topo, chip = plan.topology, plan.topology.chip
    lines = [
        f"{plan.recipe.upper()} on {topo.name}: {topo.chips} chips of {chip.name} ({chip.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16), mesh {mesh_text(plan.mesh)}, {plan.train_tokens_per_step} "
        f"tokens per optimizer step ({plan.depth})",
    ]
    for p, calls in zip(plan.programs, plan.calls_per_step, strict=True):
        lines += _program_lines(p, plan, calls)
    if plan.step_seconds is not None:
        lines += [
            "per optimizer step:",
            f"  {'time (roofline)':29s}{_seconds(plan.step_seconds)}",
            f"  {'MFU (roofline)':29s}{100 * plan.mfu:.1f}%",
            f"  {'tokens/s/chip (roofline)':29s}{plan.tokens_per_sec_per_chip:.0f} trained",
        ]
        if plan.generated_tokens_per_step:
            sampled = plan.generated_tokens_per_step / plan.step_seconds / topo.chips
            lines[-1] += f", {sampled:.0f} sampled"
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _at_depth(plan: Plan) -> str:
    """Where a sampled-depth compile stopped, e.g. ' at 5 of 61 layers' (the shallower sample); '' at full depth."""
    depth = plan.depth
    return "" if depth.sampled is None else f" at {depth.sampled[0]} of {depth.layers} layers"


def check_fits(plan: Plan) -> None:
    """One sentence when the plan does not fit: the total against the HBM and the largest part (the total being
    XLA's figure when it ran out of HBM compiling the step); that XLA ran out of HBM compiling it, where it gave no
    figure and the resident state alone would fit; else the resident state and its largest part."""
    if plan.fits:
        return
    program, hbm = plan.peak, plan.topology.chip.hbm_bytes
    head = (
        f"the {plan.recipe.upper()} {program.name} does not fit on {plan.topology.name} with mesh "
        f"{mesh_text(plan.mesh)}"
    )
    resident = sum(program.memory_parts().values())
    compiler_hint = "try --search, training.gradient_accumulation_steps, remat, a larger slice, or a smaller batch"
    if program.total is None and resident <= hbm:
        # XLA gave up while compiling, and the resident state alone would fit: its temporaries are what does not
        raise UserError(
            f"{head}: XLA ran out of HBM compiling it{_at_depth(plan)} ({program.error.rstrip('.')}); {compiler_hint}"
        )
    what, size = plan.largest_consumer()
    total = f"more than {gib(resident)}" if program.total is None else gib(program.total)
    if program.total is not None and program.error:  # XLA gave up compiling, and said how much it needed
        against, hint = f"{gib(hbm)} (XLA's figure when it ran out of HBM compiling it)", compiler_hint
    else:
        against, hint = gib(hbm), "try --search, a larger slice, remat, or a smaller batch"
    raise UserError(
        f"{head}: it needs {total} per chip against {against}, the largest part being {what} ({gib(size)} per "
        f"chip); {hint}"
    )


def search_row(p: Plan) -> str:
    row = f"{mesh_text(p.mesh):40s} {gib(p.peak.total):>12s} {'fits' if p.fits else 'too big':8s}"
    if p.step_seconds is not None:
        row += f" {_seconds(p.step_seconds):>10s} {p.tokens_per_sec_per_chip:8.0f} tokens/s/chip"
    return row


def presets_table(rows: list[tuple[str, Plan]]) -> str:
    """Markdown: one row per preset."""
    out = [
        "| preset | slice | mesh | peak HBM / chip | fits | step (roofline) | MFU | tokens/s/chip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in rows:
        t = p.step_seconds
        speed = ["-"] * 3 if t is None else [_seconds(t), f"{100 * p.mfu:.0f}%", f"{p.tokens_per_sec_per_chip:.0f}"]
        if p.peak.total is None:
            total = f"compiler out of HBM{_at_depth(p)}"
        else:
            total = f"{gib(p.peak.total)} of {gib(p.topology.chip.hbm_bytes)}"
            if p.peak.error:  # the compiler ran out of HBM and said how much it needed
                total += " (XLA's figure)"
        out.append(
            f"| {name} | {p.topology.name} | {mesh_text(p.mesh)} | {total} | {'yes' if p.fits else 'no'} | "
            + " | ".join(speed)
            + " |"
        )
    return "\n".join(out)
