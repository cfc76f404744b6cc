"""The embedded default job (`openr1-jax demo`, `make demo`): the R1 recipe in miniature on a 2-core CPU.

    base     a DeepSeek-V3-shaped tiny MoE (MLA + MoE + MTP) pretrained briefly on plain-text worked sums
             ("User: ...\nAssistant:<think>...", no chat template): it has seen reasoning, the way DeepSeek-V3
             had, gets about half the problems right, and was never taught the chat format
    R1       base -> a short SFT "cold start" on chat-formatted traces -> GRPO (accuracy + format rewards)
    R1-Zero  base -> GRPO directly, prompted with the plain template, on the easier carry-free problems

The R1 stages are scored on the same held-out problems, R1-Zero and the base beside it on the carry-free ones
(greedy; accuracy, format rate, mean length). The job prints the table and writes `stages.png` (reward and
held-out accuracy curves) beside each stage's outputs. No download: the task and the tokenizer ship with the
package.

Why these budgets: the plain template puts as many tokens between a problem and its trace as the chat template
does, so what the base learned carries over to the chat format after a few SFT steps; RL then moves a policy
that SFT left half right. A 1M-parameter policy trained with a noisy reward needs a small step: GRPO's lr is
1/200 of pretraining's (5e-5 vs 1e-2; measured: 1e-4 already lowers held-out accuracy, 1e-3 ruins it), and a
cool sampler (temperature 0.5) finds a rewarded answer in more groups.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openr1_jax.errors import UserError

STAGES = ("pretrain", "sft", "grpo", "r1zero")
# How the base model saw problems in pretraining (R1-Zero's "User: ... Assistant:" style). Its last five tokens
# stand where the chat template's `<|im_end|>\n<|im_start|>assistant\n` stands, so the trace sits at the same
# distance from the problem's digits in both formats.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


@dataclass
class StageScore:
    stage: str
    heldout: str  # which held-out problems: "all" or "carry-free"
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


def _write_carry_free_split(path: Path, split: str) -> int:
    """The easier split of the R1-Zero run: problems of `split` whose columns never carry."""
    from openr1_jax.data.embedded import load_rows

    rows = [r for r in load_rows(split) if _no_carry(r)]
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
    rl_args = [f"evaluation.num_examples={num_eval}", "evaluation.eval_steps=50"]

    corpus = out / "data" / "pretrain.jsonl"
    _write_plain_corpus(corpus, 3645)  # every training problem of the split
    easy, easy_test = out / "data" / "carry_free.jsonl", out / "data" / "carry_free_test.jsonl"
    _write_carry_free_split(easy, "train")
    _write_carry_free_split(easy_test, "test")
    pretrain = load_sft_config(
        "default",
        [
            f"output_dir={out / 'pretrain'}",
            f"data.datasets=[{{path: {corpus}}}]",
            "max_steps=330",  # a base that is right on some problems: room for SFT and RL (600 steps: ~100%)
            *common_sft,
            *routed["pretrain"],
        ],
    )
    sft = load_sft_config(
        "default",
        [
            f"output_dir={out / 'sft'}",
            f"model.name_or_path={out / 'pretrain' / 'model'}",
            "max_steps=40",  # a cold start: the chat format, ~1,600 traces
            "optimizer.learning_rate=1e-3",
            "optimizer.lr_scheduler_type=constant",
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
            f"evaluation.dataset={easy_test}",
            "max_steps=150",  # the easier split needs less: 8 prompts x 8 completions per step
            "batch_size=64",
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

    def row(stage: str, heldout: str, scores: dict) -> StageScore:
        return StageScore(stage, heldout, scores["accuracy"], scores["format_rate"], scores["mean_length"])

    rows = [
        row("base (plain prompt)", "all", base),
        row("base -> SFT", "all", r1.evaluations[0]),
        row("base -> SFT -> GRPO (R1)", "all", r1.evaluations[-1]),
        row("base (plain prompt)", "carry-free", zero.evaluations[0]),
        row("base -> GRPO (R1-Zero)", "carry-free", zero.evaluations[-1]),
    ]
    _print_table(rows)
    _plot(out, rows)
    (out / "stages.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return rows


def _print_table(rows: list[StageScore]) -> None:
    print("\nheld-out problems, greedy decoding")
    print(f"{'stage':<28} {'held-out':<11} {'accuracy':>9} {'format':>8} {'length':>8}")
    for r in rows:
        print(
            f"{r.stage:<28} {r.heldout:<11} {100 * r.accuracy:>8.1f}% {100 * r.format_rate:>7.1f}% "
            f"{r.mean_length:>8.1f}"
        )


def _plot(out: Path, rows: list[StageScore]) -> Path:
    from matplotlib.figure import Figure

    from openr1_jax.train.plot import read_metrics

    fig = Figure(figsize=(13, 3.8))
    ax_reward, ax_acc, ax_bar = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for stage, label in (("grpo", "R1: SFT -> GRPO (all)"), ("r1zero", "R1-Zero: base -> GRPO (carry-free)")):
        records = read_metrics(out / stage / "metrics.jsonl")
        train = [r for r in records if "rewards/accuracy/mean" in r]
        ax_reward.plot([r["step"] for r in train], [r["rewards/accuracy/mean"] for r in train], label=label)
        evals = json.loads((out / stage / "eval.json").read_text())
        ax_acc.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], marker="o", label=label)
    ax_reward.set(title="accuracy reward (sampled)", xlabel="GRPO step")
    ax_acc.set(title="held-out accuracy, greedy (%)", xlabel="GRPO step")
    labels = [f"{r.stage}\n({r.heldout} held-out)" for r in rows][::-1]
    ax_bar.barh(labels, [100 * r.accuracy for r in rows][::-1], color="tab:blue")
    ax_bar.set(title="held-out accuracy by stage (%)", xlim=(0, 100))
    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "stages.png"
    fig.savefig(path, dpi=110)
    return path
