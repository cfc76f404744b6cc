"""The embedded default job (`make demo`): SFT of a DeepSeek-V3-shaped tiny MoE (MLA + MoE + MTP) on the
bundled synthetic reasoning task, then greedy accuracy on held-out problems and a Hugging Face export.
No download; a 2-core CPU is enough."""

from __future__ import annotations

from collections.abc import Sequence

from openr1_jax.train.config import load_sft_config
from openr1_jax.train.sft import SFTResult, run_sft


def run_demo(output_dir: str = "runs/demo", overrides: Sequence[str] = ()) -> SFTResult:
    cfg = load_sft_config("default", [f"output_dir={output_dir}", "export_hf=true", *overrides])
    result = run_sft(cfg)
    print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}")
    if result.evaluation is not None:
        ev = result.evaluation
        print(f"held-out accuracy ({ev['dataset']}, greedy): {100 * ev['accuracy']:.1f}% of {ev['n']} problems")
        for sample in ev["samples"][:2]:
            print(
                f"  {sample['problem']!r} -> {sample['completion'][-40:]!r} ({'ok' if sample['correct'] else 'wrong'})"
            )
    print(
        f"outputs in {result.output_dir}: model/ (openr1-jax checkpoint), hf/ (transformers), metrics.jsonl, "
        "loss.png, eval.json"
    )
    return result
