"""The SFT loop (Open-R1 step 1): a packed chat dataset -> a sharded, checkpointed, exactly resumable run.

    run_sft(cfg) = validate everything -> sharded init (or load) -> restore the latest checkpoint if any
                   -> loop { next batch; step (jitted once, state donated); log step n-1; maybe save }
                   -> final checkpoint, model export, loss plot, held-out evaluation

Nothing is written before the config, model, tokenizer, data and mesh have all been checked, so bad input
costs one clear sentence and leaves no half-made output folder. SIGTERM (TPU preemption) saves and exits
between two steps; rerunning the same command resumes bit-exactly (params, optimizer, step, RNG, data).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from openr1_jax.data.chat import load_tokenizer
from openr1_jax.data.pipeline import sft_iterator
from openr1_jax.data.sources import read_jsonl
from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.distributed import host_local_batch_to_global, initialize_distributed
from openr1_jax.sharding.mesh import make_mesh
from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
from openr1_jax.sharding.watchdog import peer_watch
from openr1_jax.structured import to_dict
from openr1_jax.train import flops
from openr1_jax.train.checkpointing import Checkpointer, PreemptionGuard
from openr1_jax.train.config import ModelSection, SFTConfig
from openr1_jax.train.metrics_log import MetricsLogger
from openr1_jax.train.optimizer import learning_rate_schedule, make_optimizer
from openr1_jax.train.state import TrainState, create_train_state, merge_model, split_model, train_state_shardings
from openr1_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger("openr1_jax.sft")


@dataclass
class SFTResult:
    output_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    preempted: bool
    final_loss: float | None
    evaluation: dict[str, Any] | None


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def resolve_model(section: ModelSection) -> tuple[ModelConfig, Path | None]:
    """(model config, folder to load weights from or None for a random init)."""
    from openr1_jax.convert import checkpoint as ckpt
    from openr1_jax.convert.hf_to_jax import read_hf_config
    from openr1_jax.data.embedded.base_model import resolve_model_path
    from openr1_jax.models.presets import load_model_config

    path = resolve_model_path(section.name_or_path)
    if path.is_dir():
        if ckpt.is_checkpoint(path):
            cfg = ckpt.read_config(path)
        else:
            cfg = read_hf_config(path)[0]
        return ModelConfig.from_dict({**cfg.to_dict(), **section.overrides}, "model.overrides"), path
    return load_model_config(section.name_or_path, dict(section.overrides)), None


def sharded_train_state(
    section: ModelSection, model_cfg: ModelConfig, weights: Path | None, optimizer, mesh, seed: int
) -> tuple[Any, TrainState, TrainState]:
    """(graphdef, fresh TrainState, its shardings): parameters laid out by the rules from birth (or load), the
    optimizer state sharded like them. Call inside `sharding_context(mesh, DEFAULT_RULES)`."""
    m = section
    if weights is None:
        from openr1_jax.sharding.init import create_sharded_model

        graphdef, params, buffers = create_sharded_model(
            model_cfg, mesh, DEFAULT_RULES, dtype=m.dtype, param_dtype=m.param_dtype, seed=seed
        )
    else:
        from openr1_jax.models.load import load_model

        model = load_model(weights, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, **m.overrides)
        graphdef, params, buffers = split_model(model)
    abstract = jax.eval_shape(lambda p, b: create_train_state(p, b, optimizer, seed), params, buffers)
    shardings = train_state_shardings(
        optimizer,
        abstract,
        jax.tree.map(lambda a: a.sharding, params),  # already laid out by the rules
        jax.tree.map(lambda a: a.sharding, buffers),
        mesh,
    )
    state = jax.jit(lambda p, b: create_train_state(p, b, optimizer, seed), out_shardings=shardings)(params, buffers)
    return graphdef, state, shardings


# ----------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------
def count_steps(cfg: SFTConfig, tokenizer, rows_per_process: int) -> int:
    """Optimizer steps for `num_train_epochs` passes: one tokenizing pass over this process's data (processes
    agree on the smallest count, so every host runs the same number of steps)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    it = sft_iterator(
        cfg.data,
        tokenizer,
        rows_per_process,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_epochs=cfg.num_train_epochs,
    )
    steps = sum(1 for _ in it)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        steps = int(np.min(multihost_utils.process_allgather(np.asarray(steps))))
    if steps == 0:
        raise UserError("the training data yields no batch: add data or lower batch_size")
    return steps


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def run_sft(cfg: SFTConfig, data: grain.DatasetIterator | None = None) -> SFTResult:
    """Run (or resume) the SFT job `cfg`. `data` replaces the configured pipeline with any grain iterator of
    this process's batches (the contract's batch format, exact get_state/set_state); it needs max_steps."""
    initialize_distributed()
    out = Path(cfg.output_dir).expanduser().absolute()  # orbax refuses relative paths
    processes, me = jax.process_count(), jax.process_index()
    main = me == 0

    # 1. Check everything a user controls before writing a byte.
    mesh = make_mesh(cfg.mesh)
    if cfg.batch_size % processes:
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the {processes} processes")
    tokenizer = load_tokenizer(cfg.data)
    model_cfg, weights = resolve_model(cfg.model)
    if len(tokenizer) > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_cfg.vocab_size}"
        )
    rows = cfg.batch_size // processes
    own_pipeline = data is None
    if own_pipeline:
        data = sft_iterator(
            cfg.data, tokenizer, rows, seed=cfg.seed, process_index=me, process_count=processes, num_epochs=None
        )
    elif cfg.max_steps < 0:
        raise UserError("max_steps must be set when run_sft is given its own data iterator")
    total_steps = count_steps(cfg, tokenizer, rows)
    if own_pipeline and cfg.max_steps > 0:  # count_steps read no data: read a batch, so bad data fails here
        next(sft_iterator(cfg.data, tokenizer, rows, seed=cfg.seed, process_index=me, process_count=processes))
    eval_rows = _evaluation_rows(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")

    # 2. Train state, sharded from birth. With several processes, a lost one ends the job on every host with one
    # sentence (peer_watch) instead of a hang or a page of runtime log.
    optimizer = make_optimizer(cfg.optimizer, total_steps)
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    with peer_watch(out / "checkpoints"), sharding_context(mesh, DEFAULT_RULES):
        graphdef, state, shardings = sharded_train_state(cfg.model, model_cfg, weights, optimizer, mesh, cfg.seed)
        batch_sharding = named_sharding(("batch", None), mesh, DEFAULT_RULES, (cfg.batch_size, cfg.data.seq_len))
        train_step = jit_train_step(
            make_train_step(graphdef, optimizer, cfg.training, schedule),
            shardings,
            {k: batch_sharding for k in ("input_ids", "segment_ids", "positions", "loss_mask")},
        )

        # 3. Resume.
        checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
        state, start = checkpointer.start_or_resume(cfg.resume, state, data)
        if start:
            log.info("resumed from step %d of %d", start, total_steps)

        # 4. The loop.
        peak = flops.peak_flops_per_device(override=cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
        flops_per_token = flops.flops_per_token(model_cfg, cfg.data.seq_len)
        tokens_per_step = cfg.batch_size * cfg.data.seq_len
        meta = {"config": to_dict(cfg), "total_steps": total_steps}
        logger = MetricsLogger(out, cfg.logging, total_steps, to_dict(cfg), is_main_process=main, start_step=start)
        pending: tuple[int, dict] | None = None
        last_time = time.perf_counter()
        preempted, final_loss, step = False, None, start

        def report(step_done: int, device_metrics: dict) -> float:
            nonlocal last_time
            metrics = {k: float(v) for k, v in device_metrics.items()}  # blocks on step_done only
            now = time.perf_counter()
            seconds, last_time = now - last_time, now
            metrics["tokens_per_sec"] = tokens_per_step / seconds
            metrics["step_seconds"] = seconds
            utilisation = flops.mfu(metrics["tokens_per_sec"], flops_per_token, jax.device_count(), peak)
            if utilisation is not None:
                metrics["mfu"] = utilisation
            for name in ("truncated", "dropped"):
                metrics[f"data_{name}_examples"] = float(data.stats.get(name, 0))
            metrics["data_epoch"] = float(data.stats.get("epoch", 0))
            if logger.is_due(step_done):
                logger.log(step_done, metrics)
            logger.update(step_done, metrics)
            return metrics["loss"]

        with PreemptionGuard() as guard:
            for step in range(start + 1, total_steps + 1):
                batch = host_local_batch_to_global(next(data), mesh, batch_sharding)
                state, metrics = train_step(state, batch)
                if pending is not None:  # step n is queued on the devices; now read step n-1's numbers
                    final_loss = report(*pending)
                pending = (step, metrics)
                preempted = step < total_steps and guard.should_stop(step)
                if checkpointer.is_due(step) or preempted:
                    # A checkpoint waits for the step anyway: log it first, so a crash after the save loses
                    # no metrics line that the resumed run would not rewrite.
                    final_loss, pending = report(*pending), None
                    checkpointer.maybe_save(step, state, data, meta, force=preempted)
                if preempted:
                    break
            if pending is not None:
                final_loss = report(*pending)
        checkpointer.maybe_save(step, state, data, meta, force=True)
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        if preempted:
            log.info("preempted: saved step %d; rerun the same command to resume", step)
            return SFTResult(out, step, True, final_loss, None)

        # 5. The finished model, plots and the held-out score.
        log.info(
            "data: %d examples read, %d truncated, %d dropped (data.overlong=%s)",
            data.stats.get("examples", 0),
            data.stats.get("truncated", 0),
            data.stats.get("dropped", 0),
            cfg.data.overlong,
        )
        model = merge_model(graphdef, state.params, state.buffers)
        export_model(model, tokenizer, out, export_hf=cfg.export_hf, main=main)
        if main:
            from openr1_jax.train.plot import plot_metrics

            plot_metrics(out / "metrics.jsonl", out / "loss.png")
        evaluation = None
        if eval_rows:
            from openr1_jax.evaluate.greedy import heldout_accuracy

            ec = cfg.evaluation
            evaluation = heldout_accuracy(model, tokenizer, eval_rows, ec.max_new_tokens, ec.batch_size)
            evaluation["dataset"] = ec.dataset
            if main:
                (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
            log.info("held-out accuracy on %s: %.1f%% of %d", ec.dataset, 100 * evaluation["accuracy"], len(eval_rows))
    return SFTResult(out, step, False, final_loss, evaluation)


def export_model(model, tokenizer, out: Path, *, export_hf: bool, main: bool) -> None:
    """The finished model as `out/model` (an openr1-jax checkpoint with its tokenizer) and, with `export_hf`,
    `out/hf` (a Hugging Face folder); every process writes its shards, only the main one converts."""
    from openr1_jax.convert.checkpoint import save_model

    save_model(model, out / "model", overwrite=True, tokenizer=tokenizer)
    if export_hf and main:
        from openr1_jax.convert.jax_to_hf import convert_jax_to_hf

        convert_jax_to_hf(out / "model", out / "hf", overwrite=True)


def _evaluation_rows(cfg: SFTConfig) -> list[dict] | None:
    ec = cfg.evaluation
    if ec.dataset is None:
        return None
    if ec.dataset.startswith("embedded:"):
        from openr1_jax.data.embedded import load_rows

        return load_rows(ec.dataset.partition(":")[2], ec.num_examples)
    path = Path(ec.dataset).expanduser()
    if not path.is_file():
        raise UserError(f"evaluation.dataset '{ec.dataset}' is not a JSONL file or embedded:<split>")
    rows = read_jsonl(str(path))
    missing = [i for i, r in enumerate(rows) if "answer" not in r or not ("messages" in r or "problem" in r)]
    if missing:
        raise UserError(f"evaluation.dataset {path} row {missing[0] + 1} needs 'answer' and 'problem' or 'messages'")
    return rows[: ec.num_examples]


__all__ = ["SFTResult", "TrainState", "run_sft"]
