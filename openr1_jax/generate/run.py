"""`openr1-jax generate`: sample completions for every row of a dataset into a resumable JSONL file.

    summary = run_generate(load_generate_config("openr1-math-r1", ["openai.base_url=http://host:8000/v1"]))

Each output line is one dataset row:
    {"id", <the row's columns>, "prompt", "generations": [n], "finish_reasons": [n], "prompt_tokens",
     "completion_tokens": [n], ("verdicts": [n], "pass_rate", "kept" with filters.math_verify), "error"}
`prompt` is the formatted user prompt (before any chat template); dataset columns named like one of these keys
are kept as `input_<name>`. `error` is null, or why the row has no generations (prompt too long, the endpoint
unreachable after its retries, ...); such rows are generated again by the next run on the same output.
Completion token counts include the EOS token where the model produced one. The engine backend writes rows in
dataset order; the endpoint backend writes each row as soon as its samples are in, so there the file order
follows completion (match rows by `id`).

Order of work: the config, dataset, columns, template, ids and the output file are all checked before a model
is loaded or a server is asked anything, so bad input fails at once with nothing written.

Exit status: rows that fail are recorded and the run goes on. If every row this run tried failed (e.g. the
server is down) `run_generate` raises UserError (exit code 2) after writing their error records; if only some
failed it returns normally and the summary's `failed` says how many (rerun to retry them).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from openr1_jax.errors import UserError
from openr1_jax.generate.backends import Generated, make_backend
from openr1_jax.generate.config import GenerateConfig, load_generate_config
from openr1_jax.generate.output import JsonlOutput
from openr1_jax.generate.prompts import (
    DatasetRows,
    PromptRow,
    check_columns,
    id_key,
    make_prompt_row,
    renamed_columns,
    row_ids,
)

log = logging.getLogger(__name__)


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every row of `cfg.dataset` not yet in `cfg.output_path`; returns a summary (see module doc)."""
    rows = DatasetRows(cfg.dataset)
    check_columns(cfg, rows)
    ids = row_ids(cfg, rows)
    names = renamed_columns(cfg, rows.columns)
    start = time.perf_counter()
    with JsonlOutput(cfg.output_path, fingerprint(cfg), cfg.resume) as output:
        todo = [i for i, row_id in enumerate(ids) if id_key(row_id) not in output.done]
        stats = {"generated": 0, "failed": 0, "kept": 0, "completion_tokens": 0, "first_error": None, "busy_s": 0.0}
        if output.dropped_errors:
            log.info("retrying %d rows whose earlier attempt failed", output.dropped_errors)
        if todo:
            _generate(cfg, rows, ids, names, todo, output, stats)
    elapsed = time.perf_counter() - start
    summary = {
        "output_path": str(output.path),
        "rows": len(rows),
        "already_done": len(rows) - len(todo),
        "generated": stats["generated"],
        "failed": stats["failed"],
        "completion_tokens": stats["completion_tokens"],
        "tokens_per_s": stats["completion_tokens"] / stats["busy_s"] if stats["busy_s"] > 0 else 0.0,
        "elapsed_s": elapsed,
    }
    if cfg.filters.math_verify:
        summary["kept"] = stats["kept"]
    if stats["failed"]:
        summary["first_error"] = stats["first_error"]
    if stats["failed"] and not stats["generated"]:
        raise UserError(
            f"all {stats['failed']} rows failed, the first because: {stats['first_error']}; their error records are "
            f"in {output.path} and the next run retries them"
        )
    return summary


def _generate(cfg, rows, ids, names, todo, output, stats) -> None:
    backend = make_backend(cfg)  # the slow part (model load / server contact) only once the input is known good
    filt = None
    if cfg.filters.math_verify:
        from openr1_jax.generate.filters import MathFilter

        filt = MathFilter(cfg.filters)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="row", disable=not cfg.progress, smoothing=0.1)
    start = time.perf_counter()  # tokens/s counts generation time, not the model load
    try:
        prompts = _prompt_rows(cfg, rows, ids, names, todo)
        for finished in backend.run(prompts):
            records = [_record(cfg, row, gen) for row, gen in finished]
            if filt is not None:
                filt.annotate(records, [row.reference for row, _ in finished])
            output.append(records)
            for record in records:
                if record["error"] is None:
                    stats["generated"] += 1
                    stats["kept"] += bool(record.get("kept"))
                    stats["completion_tokens"] += sum(t for t in record["completion_tokens"] if t is not None)
                else:
                    stats["failed"] += 1
                    stats["first_error"] = stats["first_error"] or record["error"]
            stats["busy_s"] = time.perf_counter() - start
            bar.update(len(records))
            bar.set_postfix(
                tok_s=f"{stats['completion_tokens'] / max(stats['busy_s'], 1e-9):.1f}", failed=stats["failed"]
            )
    finally:
        bar.close()
        backend.close()
        if filt is not None:
            filt.close()


def _prompt_rows(cfg, rows: DatasetRows, ids, names, todo: list[int]) -> Iterator[PromptRow]:
    for index, row in rows.rows(todo):
        yield make_prompt_row(cfg, index, ids[index], row, names)


def _record(cfg: GenerateConfig, row: PromptRow, gen: Generated) -> dict[str, Any]:
    record = {
        "id": row.id,
        **row.columns,
        "prompt": row.prompt,
        "generations": gen.generations,
        "finish_reasons": gen.finish_reasons,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
    }
    if cfg.filters.math_verify:  # placeholders keep the key order; MathFilter.annotate fills them
        record |= {"verdicts": [], "pass_rate": None, "kept": False}
    record["error"] = gen.error
    return record


def fingerprint(cfg: GenerateConfig) -> dict[str, Any]:
    """The settings that shape a record: resuming an output made with other ones is refused (output.py)."""
    ds = cfg.dataset
    if cfg.backend == "engine":
        backend = {"backend": "engine", "model": cfg.engine.model, "tokenizer": cfg.engine.tokenizer}
    else:
        oc = cfg.openai
        backend = {"backend": "openai", "model": oc.model, "endpoint": oc.endpoint}  # the server may move
    fc = cfg.filters
    return {
        "dataset": {
            "path": ds.path,
            "split": ds.split,
            "name": ds.name,
            "prompt_column": ds.prompt_column,
            "id_column": ds.id_column,
        },
        "prompt_template": cfg.prompt_template,
        "use_chat_template": cfg.use_chat_template,
        "system_prompt": cfg.system_prompt,
        "chat_template": cfg.chat_template,
        "num_generations": cfg.num_generations,
        "sampling": dataclasses.asdict(cfg.sampling),
        "backend": backend,
        "filters": None
        if not fc.math_verify
        else {
            "reference_column": fc.reference_column,
            "pass_rate_min": fc.pass_rate_min,
            "pass_rate_max": fc.pass_rate_max,
        },
    }


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the CLI."""
    parts = [f"{summary['generated']} rows generated", f"{summary['already_done']} already done"]
    if summary["failed"]:
        parts.append(f"{summary['failed']} failed (rerun to retry; first error: {summary['first_error']})")
    if "kept" in summary:
        parts.append(f"{summary['kept']} kept by the filters")
    parts.append(f"{summary['tokens_per_s']:.1f} tokens/s")
    return f"{'; '.join(parts)}; output in {summary['output_path']}"


__all__ = ["load_generate_config", "run_generate", "summary_line"]
