"""The embedded default job (`openr1-jax demo`, `make demo`): the R1 recipe in miniature on a 2-core CPU.

    base     the shipped embedded base model (`data/embedded/base_model.py`): a DeepSeek-V3-shaped tiny MoE (MLA +
             MoE + MTP) pretrained to convergence on plain-text worked sums from a teacher that forgets most carries;
             it has seen the right procedure but prefers the wrong one, and was never taught the chat format
    R1       base -> a short SFT "cold start" on chat-formatted traces -> GRPO (accuracy + format rewards)
    R1-Zero  base -> GRPO directly, prompted with the plain template

Every stage is scored greedily on the same held-out problems (accuracy, format rate, mean length); the job
prints the table and writes `stages.png` (reward and held-out accuracy curves) beside each stage's outputs. No
download: the task, the tokenizer and the base ship with the package.

Why these choices: the cold start's traces come from the same flawed teacher as the pretraining text, so SFT
teaches the chat format and not the skill - whatever accuracy the policy gains afterwards, RL found. A 1M-parameter
policy trained with a noisy reward needs a small step: GRPO's lr is 1/200 of pretraining's (5e-5 vs 1e-2), and a
cool sampler (temperature 0.5) is enough to stumble on the carry now and then.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openr1_jax.data.embedded.base_model import BASE_NAME, FORGET_CARRY
from openr1_jax.errors import UserError

STAGES = ("sft", "grpo", "r1zero")


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


def _write_cold_start(path: Path) -> int:
    """The cold start's chat conversations: the training problems with traces from the pretraining's flawed
    teacher (another draw of which traces forget their carries)."""
    from openr1_jax.data.embedded import load_rows

    rows = load_rows("train", None, seed=2, forget_carry=FORGET_CARRY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return len(rows)


def run_demo(output_dir: str = "runs/demo", overrides: Sequence[str] = (), num_eval: int = 200) -> list[StageScore]:
    """Run the three training stages into `output_dir/<stage>` and return the table's rows."""
    from openr1_jax.rl.config import load_grpo_config
    from openr1_jax.rl.grpo import run_grpo
    from openr1_jax.train.config import load_sft_config
    from openr1_jax.train.sft import run_sft

    out = Path(output_dir).expanduser().absolute()
    routed = _split_overrides(overrides)
    rl_args = [f"evaluation.num_examples={num_eval}"]

    cold_start = out / "data" / "cold_start.jsonl"
    _write_cold_start(cold_start)
    sft = load_sft_config(
        "default",
        [
            f"output_dir={out / 'sft'}",
            f"model.name_or_path={BASE_NAME}",
            f"data.datasets=[{{path: {cold_start}}}]",
            "max_steps=40",  # a cold start: the chat format, ~1,600 traces
            "optimizer.learning_rate=1e-3",
            "optimizer.lr_scheduler_type=constant",
            "optimizer.warmup_ratio=0.0",
            "evaluation.dataset=null",
            "logging.logging_steps=10",
            *routed["sft"],
        ],
    )
    grpo = load_grpo_config(
        "default",
        [
            f"output_dir={out / 'grpo'}",
            f"model.name_or_path={out / 'sft' / 'model'}",
            "data.prompt_template=null",  # the chat template the cold start taught
            *rl_args,
            *routed["grpo"],
        ],
    )
    r1zero = load_grpo_config("default", [f"output_dir={out / 'r1zero'}", *rl_args, *routed["r1zero"]])

    print("stage 1/3: SFT cold start on chat-formatted traces", flush=True)
    run_sft(sft)
    print("stage 2/3: GRPO from the SFT model (R1; accuracy + format rewards)", flush=True)
    r1 = run_grpo(grpo)
    print("stage 3/3: GRPO straight from the base model (R1-Zero; plain prompt)", flush=True)
    zero = run_grpo(r1zero)

    def row(stage: str, scores: dict) -> StageScore:
        return StageScore(stage, scores["accuracy"], scores["format_rate"], scores["mean_length"])

    rows = [
        row("base (plain prompt)", zero.evaluations[0]),
        row("base -> SFT cold start", r1.evaluations[0]),
        row("base -> SFT -> GRPO (R1)", r1.evaluations[-1]),
        row("base -> GRPO (R1-Zero)", zero.evaluations[-1]),
    ]
    _print_table(rows)
    _plot(out, rows)
    (out / "stages.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return rows


def _print_table(rows: list[StageScore]) -> None:
    print("\nheld-out problems, greedy decoding")
    print(f"{'stage':<28} {'accuracy':>9} {'format':>8} {'length':>8}")
    for r in rows:
        print(f"{r.stage:<28} {100 * r.accuracy:>8.1f}% {100 * r.format_rate:>7.1f}% {r.mean_length:>8.1f}")


def _plot(out: Path, rows: list[StageScore]) -> Path:
    from matplotlib.figure import Figure

    from openr1_jax.train.plot import read_metrics

    fig = Figure(figsize=(13, 3.8))
    ax_reward, ax_acc, ax_bar = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for stage, label in (("grpo", "R1: base -> SFT -> GRPO"), ("r1zero", "R1-Zero: base -> GRPO")):
        records = read_metrics(out / stage / "metrics.jsonl")
        train = [r for r in records if "rewards/accuracy/mean" in r]
        ax_reward.plot([r["step"] for r in train], [r["rewards/accuracy/mean"] for r in train], label=label)
        evals = json.loads((out / stage / "eval.json").read_text())
        ax_acc.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], marker="o", label=label)
    ax_reward.set(title="accuracy reward (sampled)", xlabel="GRPO step")
    ax_acc.set(title="held-out accuracy, greedy (%)", xlabel="GRPO step")
    labels = [r.stage for r in rows][::-1]
    ax_bar.barh(labels, [100 * r.accuracy for r in rows][::-1], color="tab:blue")
    ax_bar.set(title="held-out accuracy by stage (%)", xlim=(0, 100))
    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "stages.png"
    fig.savefig(path, dpi=110)
    return path
