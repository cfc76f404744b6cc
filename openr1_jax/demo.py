"""The embedded default job (`openr1-jax demo`, `make demo`): the R1 recipe in miniature on a 2-core CPU.

    base     a DeepSeek-V3-shaped tiny MoE (MLA + MoE + MTP) pretrained on plain-text worked sums (no chat
             template): it has seen reasoning, the way DeepSeek-V3 had, but was never taught to converse
    R1       base -> SFT "cold start" on chat-formatted traces -> GRPO (accuracy + format rewards)
    R1-Zero  base -> GRPO directly, prompted with plain text, on the easier carry-free problems

Every stage is scored on the same held-out problems (greedy; accuracy, format rate, mean length); the job
prints the table and writes `stages.png` (reward and held-out accuracy curves) beside each stage's outputs.
No download: the task and the tokenizer ship with the package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openr1_jax.errors import UserError

STAGES = ("pretrain", "sft", "grpo", "r1zero")
PLAIN_TEMPLATE = "{prompt}\n"  # how the base model saw problems in pretraining


@dataclass
class StageScore:
    stage: str
    accuracy: float
    format_rate: float
    mean_length: float


def _split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """`sft.max_steps=10` -> {"sft": ["max_steps=10"]}; every override names its stage."""
    routed: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in routed or not rest:
            raise UserError(f"demo override '{item}' must start with a stage: {', '.join(s + '.' for s in STAGES)}")
        routed[stage].append(rest)
    return routed


def _write_plain_corpus(path: Path, num_rows: int) -> None:
    """The base model's pretraining text: each problem followed by its worked solution, no chat template."""
    from openr1_jax.data.embedded import load_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in load_rows("train", num_rows, seed=1):
            solution = row["messages"][1]["content"]
            f.write(json.dumps({"prompt": PLAIN_TEMPLATE.format(prompt=row["problem"]), "completion": solution}) + "\n")


def _write_carry_free_split(path: Path) -> int:
    """The easier split of the R1-Zero run: training problems whose columns never carry."""
    from openr1_jax.data.embedded import load_rows

    rows = [r for r in load_rows("train") if _no_carry(r)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: r[k] for k in ("problem", "solution")}) + "\n" for r in rows))
    return len(rows)


def _trace(row: dict) -> list[str]:
    content = row["messages"][1]["content"]
    return content.split("</think>")[0].removeprefix("<think>\n").strip().splitlines()


def _no_carry(row: dict) -> bool:
    return all(int(line.split("=")[1]) < 10 for line in _trace(row))


def _score(model_dir: Path, plain: bool, num_examples: int) -> dict:
    """Greedy held-out scores of a saved model (the format reward in the embedded task's boxed form)."""
    from openr1_jax.data.embedded import load_rows
    from openr1_jax.generate.engine import Engine
    from openr1_jax.rl.config import PromptDataSection
    from openr1_jax.rl.evaluation import heldout_scores
    from openr1_jax.rl.rewards import get_reward
    from openr1_jax.rl.rollout import PromptBuilder

    engine = Engine.from_pretrained(model_dir, tokenizer="embedded", max_seq_len=64)
    section = PromptDataSection(prompt_template=PLAIN_TEMPLATE if plain else None)
    return heldout_scores(
        engine,
        load_rows("test", num_examples),
        PromptBuilder(engine.tokenizer, section),
        36,
        24,
        get_reward("accuracy"),
        get_reward("format", answer="boxed"),
    )


def run_demo(output_dir: str = "runs/demo", overrides: Sequence[str] = (), num_eval: int = 200) -> list[StageScore]:
    """Run the four stages into `output_dir/<stage>` and return the table's rows."""
    from openr1_jax.rl.config import load_grpo_config
    from openr1_jax.rl.grpo import run_grpo
    from openr1_jax.train.config import load_sft_config
    from openr1_jax.train.sft import run_sft

    out = Path(output_dir).expanduser().absolute()
    routed = _split_overrides(overrides)
    common_sft = ["evaluation.dataset=null", "logging.logging_steps=25"]
    # RL moves a 1M-parameter policy with noisy gradients: a small step and a cooler sampler keep it stable.
    rl_args = [f"evaluation.num_examples={num_eval}", "optimizer.learning_rate=2e-4", "temperature=0.7"]

    corpus = out / "data" / "pretrain.jsonl"
    _write_plain_corpus(corpus, 3645)  # every training problem of the split
    easy = out / "data" / "carry_free.jsonl"
    _write_carry_free_split(easy)
    pretrain = load_sft_config(
        "default",
        [
            f"output_dir={out / 'pretrain'}",
            f"data.datasets=[{{path: {corpus}}}]",
            "max_steps=250",
            *common_sft,
            *routed["pretrain"],
        ],
    )
    sft = load_sft_config(
        "default",
        [
            f"output_dir={out / 'sft'}",
            f"model.name_or_path={out / 'pretrain' / 'model'}",
            "max_steps=100",
            "optimizer.learning_rate=3e-3",
            "optimizer.warmup_ratio=0.0",
            *common_sft,
            *routed["sft"],
        ],
    )
    grpo = load_grpo_config(
        "default",
        [f"output_dir={out / 'grpo'}", f"model.name_or_path={out / 'sft' / 'model'}", *rl_args, *routed["grpo"]],
    )
    r1zero = load_grpo_config(
        "default",
        [
            f"output_dir={out / 'r1zero'}",
            f"model.name_or_path={out / 'pretrain' / 'model'}",
            f"data.path={easy}",
            f"data.prompt_template={json.dumps(PLAIN_TEMPLATE)}",
            *rl_args,
            *routed["r1zero"],
        ],
    )

    print("stage 1/4: pretraining the base model on plain-text worked sums", flush=True)
    run_sft(pretrain)
    base = _score(out / "pretrain" / "model", plain=True, num_examples=num_eval)
    print("stage 2/4: SFT cold start on chat-formatted traces", flush=True)
    run_sft(sft)
    print("stage 3/4: GRPO from the SFT model (accuracy + format rewards)", flush=True)
    r1 = run_grpo(grpo)
    print("stage 4/4: R1-Zero: GRPO straight from the base model on carry-free problems", flush=True)
    zero = run_grpo(r1zero)

    first, last = r1.evaluations[0], r1.evaluations[-1]
    rows = [
        StageScore("base (plain-text prompt)", base["accuracy"], base["format_rate"], base["mean_length"]),
        StageScore("base -> SFT", first["accuracy"], first["format_rate"], first["mean_length"]),
        StageScore("base -> SFT -> GRPO (R1)", last["accuracy"], last["format_rate"], last["mean_length"]),
        StageScore(
            "base -> GRPO (R1-Zero)",
            zero.evaluations[-1]["accuracy"],
            zero.evaluations[-1]["format_rate"],
            zero.evaluations[-1]["mean_length"],
        ),
    ]
    _print_table(rows, num_eval)
    _plot(out, rows)
    (out / "stages.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return rows


def _print_table(rows: list[StageScore], n: int) -> None:
    print(f"\nheld-out problems: {n}, greedy decoding")
    print(f"{'stage':<28} {'accuracy':>9} {'format':>8} {'length':>8}")
    for r in rows:
        print(f"{r.stage:<28} {100 * r.accuracy:>8.1f}% {100 * r.format_rate:>7.1f}% {r.mean_length:>8.1f}")


def _plot(out: Path, rows: list[StageScore]) -> Path:
    from matplotlib.figure import Figure

    from openr1_jax.train.plot import read_metrics

    fig = Figure(figsize=(11, 3.6))
    ax_reward, ax_acc, ax_bar = fig.subplots(1, 3)
    for stage, label in (("grpo", "R1: SFT -> GRPO"), ("r1zero", "R1-Zero: base -> GRPO")):
        records = read_metrics(out / stage / "metrics.jsonl")
        train = [r for r in records if "rewards/accuracy/mean" in r]
        ax_reward.plot([r["step"] for r in train], [r["rewards/accuracy/mean"] for r in train], label=label)
        evals = json.loads((out / stage / "eval.json").read_text())
        ax_acc.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], marker="o", label=label)
    ax_reward.set(title="accuracy reward (sampled)", xlabel="GRPO step")
    ax_acc.set(title="held-out accuracy, greedy (%)", xlabel="GRPO step")
    ax_bar.barh([r.stage for r in rows][::-1], [100 * r.accuracy for r in rows][::-1], color="tab:blue")
    ax_bar.set(title="held-out accuracy by stage (%)", xlim=(0, 100))
    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "stages.png"
    fig.savefig(path, dpi=110)
    return path
