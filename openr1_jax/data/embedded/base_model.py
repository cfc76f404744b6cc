"""The embedded base model: what R1's recipe starts from (DeepSeek-V3-Base), in miniature, shipped in `base/`.

A `demo-moe` (MLA + DeepSeekMoE + MTP, ~1M parameters) pretrained to convergence on plain-text worked sums
("User: What is 57 + 68?\\nAssistant:<think>...", no chat template) from a flawed teacher: 70% of the traces forget
to carry (`task.load_rows(..., forget_carry=0.7)`), like the half-right arithmetic of web text. The model has seen
the right procedure but prefers the wrong one: greedy decoding gets the problems without a carry right and almost
none of the others (about half of the held-out set), while a sample at temperature 0.5-1 carries now and then.
That is the situation RL with a verifiable reward is for: R1-Zero (GRPO straight from this base) and R1 (a chat
cold start, then GRPO) both lift it to ~100%, and because the base has converged, those lifts do not depend on
where a learning curve happened to be stopped.

Regenerate it (about 7 minutes on a 2-core CPU; the result is what `openr1-jax sft default` computes on this
machine, float32):

    python -m openr1_jax.data.embedded.base_model

Models refer to it as `embedded:base` (`model.name_or_path`), like the data's `embedded:train`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"
BASE_NAME = "embedded:base"
# How the base saw problems in pretraining (R1-Zero's "User: ... Assistant:" style). Its last five tokens stand
# where the chat template's `<|im_end|>\n<|im_start|>assistant\n` stands, so a trace sits at the same distance
# from the problem's digits in both formats and what the base learned carries over to the chat format.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"
FORGET_CARRY = 0.7  # share of the pretraining traces that forget their carries
PRETRAIN_STEPS = 1000  # converged: the main-head loss sits at the flawed teacher's entropy from ~900 steps on


def resolve_model_path(name_or_path: str | Path) -> Path:
    """`embedded:base` -> the shipped folder; anything else -> itself as a path."""
    return BASE_DIR if str(name_or_path) == BASE_NAME else Path(name_or_path).expanduser()


def write_plain_corpus(path: Path, *, seed: int = 1, forget_carry: float = FORGET_CARRY) -> int:
    """The pretraining text: every training problem in the plain template, then its (possibly flawed) worked
    solution, as prompt/completion rows (the loss falls on the completion)."""
    from openr1_jax.data.embedded.task import load_rows

    rows = load_rows("train", None, seed=seed, forget_carry=forget_carry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            text = {"prompt": PLAIN_TEMPLATE.format(prompt=row["problem"]), "completion": row["messages"][1]["content"]}
            f.write(json.dumps(text) + "\n")
    return len(rows)


def pretrain_base(out_dir: Path = BASE_DIR, *, steps: int = PRETRAIN_STEPS, overrides: tuple[str, ...] = ()) -> Path:
    """Pretrain the base with the SFT default recipe on the plain corpus and write it to `out_dir` as a Hugging
    Face folder (config.json, model.safetensors with the MTP layer, the embedded tokenizer)."""
    from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
    from openr1_jax.train.config import load_sft_config
    from openr1_jax.train.sft import run_sft

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_plain_corpus(work / "pretrain.jsonl")
        cfg = load_sft_config(
            "default",
            [
                f"output_dir={work / 'run'}",
                f"data.datasets=[{{path: {work / 'pretrain.jsonl'}}}]",
                f"max_steps={steps}",
                "evaluation.dataset=null",
                "checkpoint.save_steps=100000",
                *overrides,
            ],
        )
        run_sft(cfg)
        staged = work / "hf"
        convert_jax_to_hf(work / "run" / "model", staged, progress=False)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staged, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BASE_DIR, help="where to write it (default: the shipped folder)")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    args = parser.parse_args(argv)
    print(f"wrote {pretrain_base(args.out, steps=args.steps)}")


if __name__ == "__main__":
    main()
