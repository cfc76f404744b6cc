"""`openr1-jax evaluate`: sample n completions per benchmark problem, score them, report pass@1 and pass@k.

    summary = run_evaluate(load_evaluate_config("embedded", ["model.name_or_path=runs/demo/model"]))

Everything that can be checked before the model loads is (config, benchmark columns, output folder), so bad
input fails in a second. The JSON report appears whole or not at all (written beside, then renamed).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from openr1_jax.data.chat import read_template
from openr1_jax.errors import UserError
from openr1_jax.evaluate.benchmarks import Problem, load_problems, problem_seed, render_prompt
from openr1_jax.evaluate.config import EvaluateConfig, load_evaluate_config
from openr1_jax.evaluate.passk import mean_pass_at_k
from openr1_jax.evaluate.pool import BoundedPool
from openr1_jax.evaluate.scoring import Score, math_pool, score_choice, score_math_all
from openr1_jax.fileio import atomic_file

__all__ = ["load_evaluate_config", "run_evaluate"]


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Generate, score and write the report; returns its summary (pass@1, pass@k, counts, settings)."""
    start = time.perf_counter()
    problems, source = load_problems(cfg.benchmark)
    report_path = Path(cfg.report_path).expanduser()
    _check_writable(report_path)
    pool = None
    if cfg.benchmark.task == "math":  # math-verify workers, started once and reused for every answer
        pool = math_pool(cfg.scoring.num_workers, cfg.scoring.timeout_s).start()
    try:
        engine = _load_engine(cfg)
        loaded = time.perf_counter()
        prompts = [_prompt_text(engine, cfg, p) for p in problems]
        params = _sampling_params(engine, cfg, problems, prompts)
        outputs = engine.generate(prompts, params, progress=cfg.progress)
        generated = time.perf_counter()
        scores = _score(cfg, problems, outputs, pool)
    finally:
        if pool is not None:
            pool.close()
    scored = time.perf_counter()
    details = [
        _problem_detail(p, prompt, out, s, params[i].max_new_tokens)
        for i, (p, prompt, out, s) in enumerate(zip(problems, prompts, outputs, scores, strict=True))
    ]
    correct = [d["correct"] for d in details]
    completions = [c for out in outputs for c in out.outputs]
    flat_scores = [s for row in scores for s in row]
    summary = {
        "benchmark": cfg.benchmark.path,
        "source": source,
        "task": cfg.benchmark.task,
        "model": cfg.model.name_or_path,
        "num_problems": len(problems),
        "num_samples": cfg.sampling.num_samples,
        "num_completions": len(completions),
        "pass@1": mean_pass_at_k(correct, 1),
        "pass@k": {f"pass@{k}": mean_pass_at_k(correct, k) for k in sorted(set(cfg.sampling.pass_k))},
        "num_correct": sum(sum(c) for c in correct),
        "scoring_timeouts": sum(s.timed_out for s in flat_scores),
        "scoring_errors": sum(s.error is not None and not s.timed_out for s in flat_scores),
        "no_answer_found": sum(s.extracted is None and s.error is None and not s.timed_out for s in flat_scores),
        "finish_reasons": dict(Counter(c.finish_reason for c in completions)),
        "mean_completion_tokens": sum(len(c.token_ids) for c in completions) / max(len(completions), 1),
        "sampling": {
            "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p,
            "top_k": cfg.sampling.top_k,
            "min_p": cfg.sampling.min_p,
            "max_new_tokens": cfg.sampling.max_new_tokens,
            "num_samples": cfg.sampling.num_samples,
            "seed": cfg.sampling.seed,
        },
        "prompt": {
            "template": cfg.template,
            "system_prompt": cfg.prompt.system_prompt,
            "use_chat_template": cfg.prompt.use_chat_template,
        },
        "seconds": {
            "load": round(loaded - start, 3),
            "generate": round(generated - loaded, 3),
            "score": round(scored - generated, 3),
        },
        "output_path": str(report_path),
    }
    _write_json_atomic(report_path, {"summary": summary, "problems": details})
    return summary


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"output_path {path} is a folder; give a .json file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write the report {path}: {parent} is not writable")


def _load_engine(cfg: EvaluateConfig):
    from openr1_jax.data.embedded.base_model import resolve_model_path
    from openr1_jax.generate import Engine

    path = resolve_model_path(cfg.model.name_or_path)
    if not path.exists():
        raise UserError(f"model '{cfg.model.name_or_path}' does not exist (model.name_or_path)")
    engine = Engine.from_pretrained(
        str(path),
        tokenizer=cfg.model.tokenizer,
        dtype=cfg.model.dtype,
        model_overrides=cfg.model.model_overrides,
        max_batch_size=cfg.batch_size,
        max_seq_len=cfg.model.max_seq_len,
    )
    if cfg.prompt.chat_template is not None:
        engine.tokenizer.chat_template = read_template(cfg.prompt.chat_template)
    if cfg.prompt.use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of '{cfg.model.name_or_path}' has no chat template: set prompt.chat_template, or "
            "prompt.use_chat_template=false for raw text"
        )
    return engine


def _prompt_text(engine, cfg: EvaluateConfig, problem: Problem) -> str:
    user = render_prompt(problem, cfg.template)
    if not cfg.prompt.use_chat_template:
        return user if cfg.prompt.system_prompt is None else f"{cfg.prompt.system_prompt}\n\n{user}"
    return engine.chat_prompt([{"role": "user", "content": user}], system_prompt=cfg.prompt.system_prompt)


def _sampling_params(engine, cfg: EvaluateConfig, problems: list[Problem], prompts: list[str]) -> list:
    """One SamplingParams per problem: its own seed, and max_new_tokens cut to the room left after its prompt
    (as vLLM does with max_model_len), so one long prompt does not fail the run."""
    from openr1_jax.generate import SamplingParams

    s = cfg.sampling
    params = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts, strict=True)):
        room = engine.max_seq_len - len(engine.encode(prompt))
        if room < 1:
            raise UserError(
                f"problem {i} ('{problem.id}') does not fit: its prompt fills max_seq_len ({engine.max_seq_len}) "
                "tokens; raise model.max_seq_len or shorten prompt.template"
            )
        params.append(
            SamplingParams(
                max_new_tokens=min(s.max_new_tokens, room),
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p,
                n=s.num_samples,
                seed=problem_seed(s.seed, problem.id),
                logprobs=False,
            )
        )
    return params


def _score(cfg: EvaluateConfig, problems: list[Problem], outputs, pool: BoundedPool | None) -> list[list[Score]]:
    if cfg.benchmark.task == "multiple_choice":
        return [
            [score_choice(c.text, p.answer, len(p.choices)) for c in out.outputs]
            for p, out in zip(problems, outputs, strict=True)
        ]
    pairs = [(c.text, p.answer) for p, out in zip(problems, outputs, strict=True) for c in out.outputs]
    flat = score_math_all(pairs, pool=pool)
    n = cfg.sampling.num_samples
    return [flat[i * n : (i + 1) * n] for i in range(len(problems))]


def _problem_detail(problem: Problem, prompt: str, output, scores: list[Score], max_new_tokens: int) -> dict:
    detail: dict[str, Any] = {"id": problem.id, "problem": problem.problem, "answer": problem.answer}
    if problem.choices:
        detail["choices"] = list(problem.choices)
    correct = [s.correct for s in scores]
    detail |= {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "completions": [c.text for c in output.outputs],
        "extracted": [s.extracted for s in scores],
        "correct": correct,
        "pass@1": sum(correct) / len(correct),
        "completion_tokens": [len(c.token_ids) for c in output.outputs],
        "finish_reasons": [c.finish_reason for c in output.outputs],
    }
    errors = [s.error for s in scores]
    if any(e is not None for e in errors):
        detail["scoring_errors"] = errors
    if any(s.timed_out for s in scores):
        detail["timed_out"] = [s.timed_out for s in scores]
    return detail


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
