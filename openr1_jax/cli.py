"""`openr1-jax`: a thin command line over functions a user can also call from Python.

Bad input (`UserError`) is printed as one sentence with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from openr1_jax.errors import UserError


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 5GB or 500MB") from None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `argv` only decides which job's option list to build for --help (imports stay lazy)."""
    argv = sys.argv[1:] if argv is None else argv
    asks_help = "-h" in argv or "--help" in argv
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="openr1-jax", description=__doc__.splitlines()[0], formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert checkpoints to and from Hugging Face", formatter_class=fmt)
    direction = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_jax = direction.add_parser("hf-to-jax", help="Hugging Face folder -> openr1-jax checkpoint", formatter_class=fmt)
    to_jax.add_argument("hf_dir", help="Hugging Face model folder (config.json + safetensors)")
    to_jax.add_argument("out_dir", help="checkpoint folder to create")
    to_jax.add_argument("--dtype", default=None, help="cast floating tensors (default: keep; fp8 -> bfloat16)")
    to_jax.add_argument("--group-size", type=_size, default="1GB", help="bytes converted at a time (memory bound)")
    to_jax.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    to_hf = direction.add_parser("jax-to-hf", help="openr1-jax checkpoint -> Hugging Face folder", formatter_class=fmt)
    to_hf.add_argument("ckpt_dir", help="openr1-jax checkpoint folder")
    to_hf.add_argument("out_dir", help="Hugging Face folder to create")
    to_hf.add_argument("--dtype", default=None, help="cast floating tensors (default: keep the stored dtypes)")
    to_hf.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors shard")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")

    for name, (what, _, _, default) in JOBS.items():
        _add_run_command(commands, name, what, default, with_options=asks_help and argv[:1] == [name])

    plan = commands.add_parser(
        "plan",
        help="will an SFT or GRPO job fit on a TPU slice, and how fast: its programs compiled ahead of time here "
        "(needs libtpu)",
        formatter_class=fmt,
    )
    plan.add_argument(
        "config", nargs="?", default="default", help="plan preset (configs/plan), or the recipe's YAML file or name"
    )
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the recipe config")
    plan.add_argument("--recipe", choices=("sft", "grpo"), default="sft", help="the job CONFIG configures")
    plan.add_argument("--topology", default=None, help="TPU slice: v5p-512 (TensorCores), v5e-8, v6e-256 (chips)")
    plan.add_argument("--mesh", default=None, help="mesh axes, e.g. fsdp=64,tensor=4 (default: the config's mesh)")
    plan.add_argument("--search", action="store_true", help="try the mesh layouts that divide the slice, rank them")
    plan.add_argument(
        "--depth",
        choices=("auto", "full", "sampled"),
        default="auto",
        help="full: compile every layer; sampled: two shallow depths, extrapolated (quick, memory rough); "
        "auto: full up to 64 layers; a model with scanned layers is always compiled in full",
    )
    plan.add_argument("--presets", action="store_true", help="plan every preset and print a Markdown table")

    _add_ablate_command(commands, fmt)

    demo = commands.add_parser(
        "demo",
        help="the embedded default: base -> SFT -> GRPO (R1) and base -> GRPO (R1-Zero) on the bundled task",
        formatter_class=fmt,
    )
    demo.add_argument("--output-dir", default="runs/demo", help="where the run writes")
    demo.add_argument(
        "overrides",
        nargs="*",
        metavar="STAGE.KEY=VALUE",
        help="overrides of one stage's config: sft. (the sft default), grpo./r1zero. (the grpo default)",
    )
    return parser


def _add_ablate_command(commands, fmt) -> None:
    """`openr1-jax ablate SWEEP [KEY=VALUE ...]` (openr1_jax/ablate/)."""
    from openr1_jax.models.presets import config_dir

    sweeps = ", ".join(sorted(p.stem for p in config_dir("ablate").glob("*.yaml")))
    ablate = commands.add_parser(
        "ablate",
        help="a sweep of SFT or GRPO arms over seeds, resumable; a results table (Markdown, CSV) and plots",
        description=f"CONFIG is a sweep YAML file or a name in configs/ablate ({sweeps}); KEY=VALUE pairs override "
        "the sweep file (e.g. seeds=[0]). Rerunning the same command resumes: finished runs are skipped.",
        formatter_class=fmt,
    )
    ablate.add_argument("config", help="sweep YAML file or name")
    ablate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the sweep file")
    ablate.add_argument("--jobs", type=int, default=1, help="runs at once on this machine (each pinned to its cores)")
    ablate.add_argument("--host-index", type=int, default=0, help="this host's index: it runs every N-th run")
    ablate.add_argument("--host-count", type=int, default=1, help="hosts sharing the sweep (and its output folder)")
    ablate.add_argument("--table-only", action="store_true", help="only rebuild the table and plots from finished runs")


# name -> (help, config module, config class, default recipe); loaders are `load_<name>_config(config, overrides)`.
JOBS = {
    "sft": ("supervised fine-tuning (Open-R1 step 1) on chat data", "openr1_jax.train.config", "SFTConfig", "default"),
    "grpo": (
        "GRPO reinforcement learning with rule-based rewards (Open-R1 steps 2 and 3), rollouts on the same mesh",
        "openr1_jax.rl.config",
        "GRPOConfig",
        "default",
    ),
    "generate": (
        "sample completions of a dataset's prompts (distillation) with our engine or an OpenAI-compatible server",
        "openr1_jax.generate.config",
        "GenerateConfig",
        "default",
    ),
    "evaluate": (
        "pass@1 / pass@k of a model on a benchmark (math-verify or multiple choice)",
        "openr1_jax.evaluate.config",
        "EvaluateConfig",
        "embedded",
    ),
    "serve": (
        "an OpenAI-compatible server (/v1/completions, /v1/chat/completions) for a checkpoint on 127.0.0.1",
        "openr1_jax.generate.server_config",
        "ServeConfig",
        "default",
    ),
    "decontaminate": (
        "flag or remove training rows that share an 8-gram with benchmark problems",
        "openr1_jax.evaluate.decontaminate",
        "DecontaminateConfig",
        None,
    ),
}


def _job(name: str):
    """(config class, loader) of a job, imported only when that job runs or shows its help."""
    import importlib

    module = importlib.import_module(JOBS[name][1])
    return getattr(module, JOBS[name][2]), getattr(module, f"load_{name}_config")


def _add_run_command(commands, name: str, what: str, default: str | None, with_options: bool) -> None:
    """`openr1-jax NAME [CONFIG] [key=value ...]`; --help lists every option with its default."""
    from openr1_jax.models.presets import config_dir
    from openr1_jax.structured import help_text

    recipes = sorted(p.stem for p in config_dir(name).glob("*.yaml"))
    if recipes:
        config_help = f"CONFIG is a YAML file or a recipe name ({', '.join(recipes)}; default: {default})"
    else:
        config_help = "CONFIG is a YAML file (optional)"
    cls = _job(name)[0] if with_options else None
    command = commands.add_parser(
        name,
        help=what,
        description=f"{what}. {config_help}; KEY=VALUE pairs override its options (dotted, e.g. a.b=1).",
        epilog=("options (KEY [default]):\n" + help_text(cls)) if cls is not None else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("config", nargs="?", default=default, help="YAML file or recipe name")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def run(args: argparse.Namespace) -> None:
    if args.command == "convert":
        if args.direction == "hf-to-jax":
            from openr1_jax.convert.hf_to_jax import convert_hf_to_jax

            cfg = convert_hf_to_jax(
                args.hf_dir, args.out_dir, dtype=args.dtype, group_bytes=args.group_size, overwrite=args.overwrite
            )
            print(f"wrote {args.out_dir} ({cfg.architecture}, {cfg.num_hidden_layers} layers)")
        else:
            from openr1_jax.convert.jax_to_hf import convert_jax_to_hf

            convert_jax_to_hf(
                args.ckpt_dir,
                args.out_dir,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
            )
            print(f"wrote {args.out_dir}")
    elif args.command in JOBS:
        config, overrides = _config_and_overrides(args)
        cfg = _job(args.command)[1](config, overrides)
        _run_job(args.command, cfg)
    elif args.command == "plan":
        from openr1_jax.plan import run_plan

        if args.presets:
            from openr1_jax.plan import run_presets

            print(run_presets(depth=args.depth))
            return
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config:  # `plan a=1`: overrides only
            config, overrides = "default", [config, *overrides]
        run_plan(config, overrides, args.topology, args.mesh, args.search, args.recipe, args.depth)
    elif args.command == "ablate":
        from openr1_jax.ablate import load_sweep_config, run_ablation

        cfg = load_sweep_config(args.config, args.overrides)
        r = run_ablation(cfg, args.jobs, args.host_index, args.host_count, args.table_only)
        print(f"{len(r.finished)} of {len(r.runs)} runs finished", end="")
        print(f"; results in {r.results_dir}" if r.results_dir else "")
        if r.stopped:
            print("stopped by a signal: rerun the same command to resume")
        if r.failed:
            logs = ", ".join(str(run.out / "ablate.log") for run in r.failed[:3])
            raise UserError(f"{len(r.failed)} run(s) failed (logs: {logs}{', ...' if len(r.failed) > 3 else ''})")
    elif args.command == "demo":
        from openr1_jax.demo import run_demo

        run_demo(args.output_dir, args.overrides)


def _run_job(name: str, cfg) -> None:
    if name == "sft":
        from openr1_jax.train.sft import run_sft

        _print_result(run_sft(cfg))
    elif name == "grpo":
        from openr1_jax.rl.grpo import run_grpo

        r = run_grpo(cfg)
        state = "preempted at" if r.preempted else "finished"
        print(f"{state} step {r.steps}; outputs in {r.output_dir}")
        if r.evaluations:
            first, last = r.evaluations[0], r.evaluations[-1]
            print(
                f"held-out accuracy {100 * first['accuracy']:.1f}% (step {first['step']}) -> "
                f"{100 * last['accuracy']:.1f}% (step {last['step']}), format {100 * last['format_rate']:.1f}%"
            )
    elif name == "generate":
        from openr1_jax.generate.run import run_generate, summary_line

        print(summary_line(run_generate(cfg)))
    elif name == "evaluate":
        from openr1_jax.evaluate.run import run_evaluate

        r = run_evaluate(cfg)
        passk = "".join(f", {k} {100 * v:.1f}%" for k, v in r["pass@k"].items() if k != "pass@1")
        print(
            f"{r['benchmark']}: pass@1 {100 * r['pass@1']:.1f}%{passk} over {r['num_problems']} problems x "
            f"{r['num_samples']} samples; report in {r['output_path']}"
        )
    elif name == "serve":
        from openr1_jax.generate.server import serve

        serve(cfg)
    elif name == "decontaminate":
        from openr1_jax.evaluate.decontaminate import run_decontaminate

        r = run_decontaminate(cfg)
        flagged = ", ".join(f"{name}: {n}" for name, n in r["contaminated"].items())
        print(f"{r['rows']} rows, contaminated ({flagged}), {r['kept']} written to {r['output_path']}")


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell `sft a=1` (overrides only) from `sft recipe`: a first word with '=' is an override."""
    if args.config is not None and "=" in args.config:
        return JOBS[args.command][3], [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _print_result(result) -> None:
    state = "preempted at" if result.preempted else "finished"
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print(f"{state} step {result.steps}{loss}; outputs in {result.output_dir}")
    if result.evaluation is not None:
        ev = result.evaluation
        print(f"held-out accuracy on {ev['dataset']}: {100 * ev['accuracy']:.1f}% of {ev['n']} problems")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every read and write at INFO
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Unable to initialize backend 'tpu'" on a CPU
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # `plan CONFIG --topology T key=value`: argparse leaves overrides after an option unparsed
        if args.command not in ("plan", "ablate") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        run(args)
    except UserError as err:
        print(f"openr1-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openr1-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
