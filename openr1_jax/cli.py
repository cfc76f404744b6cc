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


def build_parser() -> argparse.ArgumentParser:
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

    _add_run_command(commands, "sft", "supervised fine-tuning (Open-R1 step 1) on chat data", "sft")

    demo = commands.add_parser(
        "demo",
        help="the embedded default: SFT of a tiny MoE on the bundled task, then its held-out accuracy",
        formatter_class=fmt,
    )
    demo.add_argument("--output-dir", default="runs/demo", help="where the run writes")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the sft default")
    return parser


def _add_run_command(commands, name: str, what: str, kind: str) -> None:
    """`openr1-jax NAME [CONFIG] [key=value ...]`; --help lists every option with its default."""
    from openr1_jax.models.presets import config_dir
    from openr1_jax.structured import help_text
    from openr1_jax.train.config import SFTConfig

    recipes = config_dir(kind)
    names = ", ".join(sorted(p.stem for p in recipes.glob("*.yaml")))
    command = commands.add_parser(
        name,
        help=what,
        description=f"{what}. CONFIG is a YAML file or a recipe name ({names}); KEY=VALUE pairs override "
        "its options (e.g. optimizer.learning_rate=4e-5 data.seq_len=4096).",
        epilog="options (KEY [default]):\n" + help_text(SFTConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("config", nargs="?", default="default", help="YAML file or recipe name (default: default)")
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
    elif args.command == "sft":
        from openr1_jax.train.config import load_sft_config
        from openr1_jax.train.sft import run_sft

        config, overrides = _config_and_overrides(args)
        result = run_sft(load_sft_config(config, overrides))
        _print_result(result)
    elif args.command == "demo":
        from openr1_jax.demo import run_demo

        run_demo(args.output_dir, args.overrides)


def _config_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """argparse cannot tell `sft a=1` (overrides only) from `sft recipe`: a first word with '=' is an override."""
    if "=" in args.config:
        return "default", [args.config, *args.overrides]
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
    args = build_parser().parse_args(argv)
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
