"""The GRPO loop (Open-R1 steps 2 and 3): one JAX program on one mesh samples, scores and trains.

    run_grpo(cfg) = validate everything (rewards, columns, batch geometry, lengths) -> sharded state (+ frozen
                    reference when beta > 0) -> restore the latest checkpoint if any
                    -> per generation { prompts; engine.generate(G each) on the live params; rewards;
                       advantages; reference log-probs; num_iterations x (generation / step) optimizer steps }
                    -> final checkpoint, model export, reward plot, held-out evaluation

Checkpoints fall on generation boundaries, and every random draw is a function of (seed, generation), so a
killed run resumes bit-exactly: the same prompts, the same samples, the same updates.

On several hosts every process runs this same loop and makes the same host-side decisions: the prompts, seeds
and chunk orders come from (seed, generation) alone, and what the host reads back from the devices (sampled
tokens, reference log-probs, metrics) is replicated, so every process reads the same values. The rollout is one
SPMD program whose rows are spread over all devices of all hosts; each host then builds only its own rows of
every train batch (`_to_global`). Orbax writes each host's shards of a checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from openr1_jax.data.chat import load_tokenizer
from openr1_jax.data.config import DataConfig
from openr1_jax.errors import UserError
from openr1_jax.generate.engine import Engine
from openr1_jax.rl import rewards as reward_registry
from openr1_jax.rl.config import GRPOConfig
from openr1_jax.rl.evaluation import heldout_scores
from openr1_jax.rl.loss import LossConfig
from openr1_jax.rl.rollout import PromptBuilder, generate_rollout, load_prompt_rows, rollout_metrics, sample_log
from openr1_jax.rl.step import BATCH_KEYS, make_grpo_step, make_logps_fn
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.distributed import initialize_distributed
from openr1_jax.sharding.mesh import make_mesh
from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
from openr1_jax.sharding.watchdog import peer_watch
from openr1_jax.structured import to_dict
from openr1_jax.train.checkpointing import Checkpointer, PreemptionGuard
from openr1_jax.train.metrics_log import MetricsLogger
from openr1_jax.train.optimizer import learning_rate_schedule, make_optimizer
from openr1_jax.train.sft import export_model, resolve_model, sharded_train_state
from openr1_jax.train.state import merge_model
from openr1_jax.train.step import jit_train_step

log = logging.getLogger("openr1_jax.grpo")


@dataclass
class GRPOResult:
    output_dir: Path
    steps: int
    preempted: bool
    evaluations: list[dict] = field(default_factory=list)  # {"step", "accuracy", "format_rate", "mean_length"}
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Setup:
    """Everything checked before the first compile."""

    mesh: Any
    tokenizer: Any
    model_cfg: Any
    weights: Path | None
    rows: list[dict]
    eval_rows: list[dict] | None
    builder: PromptBuilder
    reward_funcs: list[Callable]
    reward_weights: np.ndarray
    total_steps: int


def check_grpo(cfg: GRPOConfig, extra_rewards: dict[str, Callable] | None = None) -> _Setup:
    """Validate the config against the data, tokenizer, model and mesh; raise UserError on the first problem."""
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(DataConfig(tokenizer=cfg.data.tokenizer, chat_template=cfg.data.chat_template))
    name = cfg.model.name_or_path
    if "/" in name and not Path(name).expanduser().exists():
        raise UserError(
            f"model.name_or_path '{name}' does not exist: train it first (`openr1-jax sft` writes "
            "runs/sft-default/model) or point it at an openr1-jax checkpoint or a Hugging Face folder"
        )
    model_cfg, weights = resolve_model(cfg.model)
    if len(tokenizer) > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_cfg.vocab_size}"
        )
    T = cfg.max_prompt_length + cfg.max_completion_length
    if model_cfg.max_position_embeddings < T:
        raise UserError(
            f"max_prompt_length + max_completion_length ({T}) exceeds the model's max_position_embeddings "
            f"({model_cfg.max_position_embeddings})"
        )
    rows = load_prompt_rows(cfg.data)
    funcs = [
        (extra_rewards or {}).get(name) or reward_registry.get_reward(name, **cfg.reward_kwargs.get(name, {}))
        for name in cfg.reward_funcs
    ]
    known = [n for n in cfg.reward_funcs if not (extra_rewards and n in extra_rewards)]
    reward_registry.check_reward_columns(known, set(rows[0]), f"dataset {cfg.data.path!r}")
    eval_rows = None
    if cfg.evaluation.dataset is not None:
        eval_rows = load_prompt_rows(cfg.data, path=cfg.evaluation.dataset, limit=cfg.evaluation.num_examples)
        reward_registry.check_reward_columns(
            ["accuracy"], set(eval_rows[0]), f"evaluation.dataset {cfg.evaluation.dataset!r}"
        )
    batch_axes = int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))
    if cfg.micro_batch_size % batch_axes:
        raise UserError(
            f"the micro-batch (batch_size / gradient_accumulation_steps = {cfg.micro_batch_size}) must be divisible "
            f"by the {batch_axes} devices it is spread over"
        )
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        generations = cfg.num_train_epochs * len(rows) // cfg.prompts_per_generation
        total = generations * cfg.optimizer_steps_per_generation
        if total == 0:
            raise UserError(
                f"{len(rows)} prompts do not fill one generation of {cfg.prompts_per_generation} prompts: "
                "add data, lower batch_size or set max_steps"
            )
    given = cfg.reward_weights
    reward_weights = np.ones(len(funcs), np.float32) if given is None else np.asarray(given, np.float32)
    builder = PromptBuilder(tokenizer, cfg.data)
    builder.ids(rows[0], cfg.max_prompt_length)  # a bad template fails here, not in the loop
    return _Setup(mesh, tokenizer, model_cfg, weights, rows, eval_rows, builder, funcs, reward_weights, total)


def _batch_axes(mesh) -> tuple[str, ...]:
    spec = named_sharding(("batch",), mesh, DEFAULT_RULES).spec[0]
    if spec is None:
        return ()
    return spec if isinstance(spec, tuple) else (spec,)


def prompt_iterator(num_rows: int, prompts_per_generation: int, seed: int):
    """Batches of row indices, a fresh permutation per epoch, with grain's exact get_state/set_state."""
    ds = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat(None).batch(prompts_per_generation)
    return iter(ds)


def _to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Every process holds the whole generation batch; jax asks each process only for its own devices' slices,
    so a host materialises only its rows of the global batch."""
    return {
        k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index]) for k, v in batch.items()
    }


def run_grpo(cfg: GRPOConfig, extra_rewards: dict[str, Callable] | None = None) -> GRPOResult:
    """Run (or resume) the GRPO job `cfg`. `extra_rewards` maps reward_funcs names to Python callables."""
    initialize_distributed()
    out = Path(cfg.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")
    s = check_grpo(cfg, extra_rewards)
    mesh, total_steps = s.mesh, s.total_steps
    main = jax.process_index() == 0

    optimizer = make_optimizer(cfg.optimizer, total_steps)
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    loss_cfg = LossConfig(
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        delta=cfg.delta,
        beta=cfg.beta,
        max_completion_length=cfg.max_completion_length,
    )
    on_policy = cfg.num_iterations == 1 and cfg.generation_steps == cfg.gradient_accumulation_steps
    T = cfg.max_prompt_length + cfg.max_completion_length
    with peer_watch(out / "checkpoints"), sharding_context(mesh, DEFAULT_RULES):
        graphdef, state, shardings = sharded_train_state(cfg.model, s.model_cfg, s.weights, optimizer, mesh, cfg.seed)
        # The frozen reference of the KL term: a copy of the starting weights (none when beta is 0).
        ref_params = jax.tree.map(lambda a: a.copy(), state.params) if cfg.beta > 0 else None
        row_sharding = named_sharding(("batch", None), mesh, DEFAULT_RULES, (cfg.batch_size, T))
        batch_shardings = {k: row_sharding for k in BATCH_KEYS}
        batch_shardings["advantages"] = named_sharding(("batch",), mesh, DEFAULT_RULES, (cfg.batch_size,))
        batch_shardings["num_items"] = NamedSharding(mesh, PartitionSpec())
        step_fn = make_grpo_step(
            graphdef,
            optimizer,
            loss_cfg,
            temperature=cfg.temperature,
            micro_batches=cfg.gradient_accumulation_steps,
            on_policy=on_policy,
            schedule=schedule,
            bias_update_rate=cfg.bias_update_rate,
        )
        train_step = jit_train_step(step_fn, shardings, batch_shardings)
        ref_logps = None
        if ref_params is not None:  # replicated: every process holds the whole generation batch (`_to_global`)
            replicated = NamedSharding(mesh, PartitionSpec())
            ref_logps = jax.jit(make_logps_fn(graphdef, cfg.temperature), out_shardings=replicated)
        engine = Engine.from_state(
            graphdef,
            state.params,
            state.buffers,
            s.model_cfg,
            s.tokenizer,
            mesh=mesh,
            max_batch_size=cfg.rollout.max_batch_size,
            max_seq_len=T,
            chunk_size=cfg.rollout.chunk_size,
        )
        data = prompt_iterator(len(s.rows), cfg.prompts_per_generation, cfg.data.shuffle_seed + cfg.seed)

        checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
        state, step = checkpointer.start_or_resume(cfg.resume, state, data)
        if step:
            log.info("resumed from step %d of %d", step, total_steps)

        logger = MetricsLogger(out, cfg.logging, total_steps, to_dict(cfg), is_main_process=main, start_step=step)
        accuracy = reward_registry.get_reward("accuracy")
        format_reward = reward_registry.get_reward("format", **cfg.reward_kwargs.get("format", {}))
        evaluations: list[dict] = _read_evaluations(out, step)

        def evaluate(at_step: int) -> None:
            if s.eval_rows is None:
                return
            engine.set_params(state.params, state.buffers)
            scores = heldout_scores(
                engine,
                s.eval_rows,
                s.builder,
                cfg.evaluation.max_new_tokens or cfg.max_completion_length,
                cfg.max_prompt_length,
                accuracy,
                format_reward,
            )
            evaluations.append({"step": at_step, **{k: v for k, v in scores.items() if k != "samples"}})
            logger.log(at_step, {f"eval/{k}": scores[k] for k in ("accuracy", "format_rate", "mean_length")})
            log.info(
                "step %d: held-out accuracy %.1f%%, format %.1f%%, length %.1f",
                at_step,
                100 * scores["accuracy"],
                100 * scores["format_rate"],
                scores["mean_length"],
            )
            if main:
                _write_evaluations(out, evaluations)

        if step == 0:
            evaluate(0)
        per_generation = cfg.optimizer_steps_per_generation
        chunks = cfg.generation_steps // cfg.gradient_accumulation_steps
        last_metrics: dict[str, float] = {}
        preempted = False
        with PreemptionGuard() as guard:
            while step < total_steps:
                generation = step // per_generation
                prompt_rows = [s.rows[int(i)] for i in next(data)]
                engine.set_params(state.params, state.buffers)
                rollout = generate_rollout(
                    engine,
                    prompt_rows,
                    s.builder,
                    s.reward_funcs,
                    cfg.reward_funcs,
                    s.reward_weights,
                    cfg,
                    seed=_generation_seed(cfg.seed, generation, len(prompt_rows)),
                )
                ref = None
                if ref_logps is not None:
                    ref = np.asarray(ref_logps(ref_params, state.buffers, rollout.input_ids_NxT, rollout.valid_NxT))
                num_items = float(rollout.completion_lengths_N.sum())  # TRL: before masking truncated rows
                r_metrics = rollout_metrics(rollout, cfg.reward_funcs)
                rng = np.random.default_rng([cfg.seed, generation])
                first_step = step
                for _ in range(cfg.num_iterations):
                    order = rng.permutation(rollout.size)
                    for rows_idx in np.split(order, chunks):
                        if step >= total_steps:
                            break
                        batch = _to_global(rollout.batch(rows_idx, ref, num_items), batch_shardings)
                        start = time.perf_counter()
                        state, metrics = train_step(state, batch)
                        step += 1
                        # Reading the metrics waits for the step (timing it); the next rollout needs its
                        # parameters anyway, so only steps within one generation lose their overlap.
                        last_metrics = {**r_metrics, **{k: float(v) for k, v in metrics.items()}}
                        seconds = time.perf_counter() - start
                        last_metrics["tokens_per_sec/training"] = float(rollout.valid_NxT[rows_idx].sum()) / seconds
                        last_metrics["seconds/training"] = seconds
                        if logger.is_due(step) or step == total_steps:
                            logger.log(step, last_metrics)
                        logger.update(step, last_metrics)
                if cfg.log_completions and logger.is_due(step):
                    for k, sample in enumerate(sample_log(rollout, cfg.num_completions_to_print)):
                        logger.log_text(step, f"completions/{k}", json.dumps(sample, ensure_ascii=False))
                preempted = step < total_steps and guard.should_stop(step)
                saved_due = any(checkpointer.is_due(t) for t in range(first_step + 1, step + 1))
                if saved_due or preempted:
                    checkpointer.maybe_save(step, state, data, {"config": to_dict(cfg)}, force=True)
                if (
                    cfg.evaluation.eval_steps
                    and any(t % cfg.evaluation.eval_steps == 0 for t in range(first_step + 1, step + 1))
                    and step < total_steps
                ):
                    evaluate(step)
                if preempted:
                    break
        checkpointer.maybe_save(step, state, data, {"config": to_dict(cfg)}, force=True)
        checkpointer.wait()
        checkpointer.close()
        if preempted:
            logger.close()
            log.info("preempted: saved step %d; rerun the same command to resume", step)
            return GRPOResult(out, step, True, evaluations, last_metrics)
        if not evaluations or evaluations[-1]["step"] != step:
            evaluate(step)
        logger.close()
        export_model(
            merge_model(graphdef, state.params, state.buffers), s.tokenizer, out, export_hf=cfg.export_hf, main=main
        )
        if main:
            from openr1_jax.rl.plot import plot_rewards

            plot_rewards(out / "metrics.jsonl", out / "rewards.png")
    return GRPOResult(out, step, False, evaluations, last_metrics)


def _generation_seed(seed: int, generation: int, prompts: int) -> int:
    """Row i of generation g samples with seed + i: distinct across generations, fixed for a resume."""
    return int(np.random.SeedSequence([seed, generation]).generate_state(1)[0] % (2**31 - prompts))


def _read_evaluations(out: Path, step: int) -> list[dict]:
    path = out / "eval.json"
    if step == 0 or not path.exists():
        return []
    return [e for e in json.loads(path.read_text()) if e["step"] <= step]


def _write_evaluations(out: Path, evaluations: list[dict]) -> None:
    from openr1_jax.fileio import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(evaluations, indent=2) + "\n")


__all__ = ["GRPOResult", "check_grpo", "run_grpo"]
