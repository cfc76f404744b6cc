"""The GRPO loop end to end on the embedded task: rollout log-probs, the sharded step, learning, exact resume,
and bad input that fails before any compile."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from openr1_jax.cli import main as cli_main
from openr1_jax.data.chat import load_tokenizer
from openr1_jax.data.config import DataConfig
from openr1_jax.data.embedded import load_rows
from openr1_jax.generate.engine import Engine
from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from openr1_jax.rl.config import PromptDataSection, load_grpo_config
from openr1_jax.rl.grpo import run_grpo
from openr1_jax.rl.loss import LossConfig
from openr1_jax.rl.rollout import PromptBuilder, generate_rollout
from openr1_jax.rl.step import make_grpo_step, make_logps_fn
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
from openr1_jax.train.state import create_train_state, split_model, train_state_shardings

TINY = [
    "model.name_or_path=demo-moe",
    "model.overrides={num_hidden_layers: 2}",
    "batch_size=16",
    "num_generations=4",
    "max_prompt_length=24",
    "max_completion_length=12",
    "evaluation.num_examples=8",
    "evaluation.max_new_tokens=8",
    "logging.logging_steps=1",
    "logging.progress_bar=false",
    "logging.report_to=[jsonl]",
    "rollout.max_batch_size=16",
]


def digit_reward(completions, **_):
    """Learnable from a random model: the share of digits in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DataConfig())


@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config("demo-moe", {"num_hidden_layers": 2})


def _cfg(tmp_path: Path, *extra: str):
    return load_grpo_config("default", [f"output_dir={tmp_path}", *TINY, *extra])


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_trainer_logps_equal_the_samplers(tokenizer, model_cfg, scan_layers):
    """Every rollout token's log-prob as the trainer recomputes it (logits[t] / temperature at token t + 1)
    equals what the sampler returned, for prompts of different lengths, EOS included; padding is masked.
    Scanned: the trainer's forward pass is a scan over stacked MoE layers, the sampler unrolls them."""
    from openr1_jax.rl.config import GRPOConfig

    if scan_layers:
        model_cfg = model_cfg.replace(num_hidden_layers=3, scan_layers=True)
    model = build_model(model_cfg, seed=3)
    cfg = GRPOConfig(batch_size=12, num_generations=3, temperature=0.7, max_prompt_length=24, max_completion_length=16)
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=40)
    rows = load_rows("train", 4)
    rows[1] = {**rows[1], "problem": "What is 1 + 2 + 3 + 4 + 5 + 6?"}  # a longer prompt
    rollout = generate_rollout(
        engine,
        rows,
        PromptBuilder(tokenizer, PromptDataSection()),
        [digit_reward],
        ["digits"],
        np.ones(1, np.float32),
        cfg,
        seed=5,
    )
    graphdef, params, buffers = split_model(model)
    logps = np.asarray(
        jax.jit(make_logps_fn(graphdef, cfg.temperature))(params, buffers, rollout.input_ids_NxT, rollout.valid_NxT)
    )
    mask = rollout.mask_NxT > 0
    assert mask.sum() == rollout.completion_lengths_N.sum() > 0
    np.testing.assert_allclose(logps[mask], rollout.old_logps_NxT[mask], atol=2e-5, rtol=0)
    assert (rollout.old_logps_NxT[~mask] == 0).all()
    eos = tokenizer.eos_token_id
    for n in np.flatnonzero(~rollout.truncated_N):  # a finished completion ends with EOS, which is trained on
        last = np.flatnonzero(mask[n])[-1] + 1
        assert rollout.input_ids_NxT[n, last] == eos


def _step_inputs(model_cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T = 16, 20
    ids = rng.integers(3, model_cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = rng.integers(6, T, B)
    valid = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    mask = ((np.arange(T)[None] >= 4) & (np.arange(T)[None] < lengths[:, None] - 1)).astype(np.float32)
    batch = {
        "input_ids": ids,
        "valid": valid,
        "mask": mask,
        "old_logps": (rng.normal(size=(B, T)) * 0.1 - 4.0).astype(np.float32) * mask,
        "ref_logps": (rng.normal(size=(B, T)) * 0.1 - 4.0).astype(np.float32) * mask,
        "advantages": rng.normal(size=B).astype(np.float32),
        "num_items": np.asarray(mask.sum(), np.float32),
    }
    return batch


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_sharded_grpo_step_equals_single_device(model_cfg, loss_type, level):
    """One off-policy step with KL and two micro-batches: 8 devices (fsdp 4 x data 2) == 1 device."""
    batch = _step_inputs(model_cfg)
    optimizer = optax.sgd(0.5)  # Adam would turn rounding noise in near-zero gradients into full-size steps
    loss_cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04, max_completion_length=16)

    def run(mesh):
        with sharding_context(mesh, DEFAULT_RULES):
            from openr1_jax.sharding.init import create_sharded_model

            graphdef, params, buffers = create_sharded_model(model_cfg, mesh, seed=1)
            abstract = jax.eval_shape(lambda p, b: create_train_state(p, b, optimizer, 0), params, buffers)
            shardings = train_state_shardings(
                optimizer,
                abstract,
                jax.tree.map(lambda a: a.sharding, params),
                jax.tree.map(lambda a: a.sharding, buffers),
                mesh,
            )
            state = jax.jit(lambda p, b: create_train_state(p, b, optimizer, 0), out_shardings=shardings)(
                params, buffers
            )
            step = make_grpo_step(
                graphdef,
                optimizer,
                loss_cfg,
                temperature=0.9,
                micro_batches=2,
                on_policy=False,
                schedule=lambda s: 1e-3,
                bias_update_rate=1e-3,
            )
            rows = named_sharding(("batch", None), mesh, DEFAULT_RULES, batch["input_ids"].shape)
            placed = {k: jax.device_put(v, rows if v.ndim == 2 else None) for k, v in batch.items()}
            new_state, metrics = jax.jit(step)(state, placed)
            return jax.device_get((new_state.params, new_state.buffers, metrics))

    single = run(make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]))
    sharded = run(make_mesh(MeshConfig(data=2, fsdp=4)))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert single[2]["kl"] > 0 and np.isfinite(single[2]["loss"])


def test_grpo_learns_a_reward_and_writes_its_outputs(tmp_path):
    """From a random model, 10 steps raise a learnable reward; metrics, samples, eval and plot are written."""
    cfg = _cfg(
        tmp_path,
        "max_steps=10",
        "reward_funcs=[digits]",
        "reward_kwargs={}",
        "optimizer.learning_rate=1e-2",
        "optimizer.warmup_steps=0",
        "evaluation.eval_steps=5",
    )
    result = run_grpo(cfg, extra_rewards={"digits": digit_reward})
    assert (result.steps, result.preempted) == (10, False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    first, last = np.mean([r["reward"] for r in train[:2]]), np.mean([r["reward"] for r in train[-2:]])
    assert last > first + 0.05, (first, last)
    for key in (
        "rewards/digits/mean",
        "rewards/digits/std",
        "advantages/std",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "entropy",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "tokens_per_sec/generation",
        "tokens_per_sec/training",
        "grad_norm",
    ):
        assert np.isfinite(train[-1][key]), key
    assert [e["step"] for e in result.evaluations] == [0, 5, 10]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "rewards", "advantage"} <= set(json.loads(samples[0]["text"]))
    assert (tmp_path / "rewards.png").stat().st_size > 0
    assert (tmp_path / "model" / "model_config.json").is_file()


def test_off_policy_gspo_with_reference_runs(tmp_path):
    """mu = 2 and two steps per generation (old log-probs from the rollout), GSPO weights, a KL reference."""
    cfg = _cfg(
        tmp_path,
        "max_steps=4",
        "num_iterations=2",
        "gradient_accumulation_steps=2",
        "steps_per_generation=4",
        "importance_sampling_level=sequence",
        "loss_type=grpo",
        "beta=0.04",
        "reward_funcs=[digits]",
        "reward_kwargs={}",
        "optimizer.learning_rate=3e-3",
    )
    run_grpo(cfg, extra_rewards={"digits": digit_reward})
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert len(train) == 4 and all(np.isfinite(r["kl"]) for r in train)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6) and train[-1]["kl"] > 0


@pytest.mark.slow
def test_exact_resume_after_a_crash(tmp_path, monkeypatch):
    """6 steps straight == 2 steps, a crash right after that checkpoint, and a resume: parameters bitwise equal,
    and the resumed run logs the same metrics."""
    from openr1_jax.models.load import load_model
    from openr1_jax.models.params import flat_variables
    from openr1_jax.train import checkpointing

    extra = [
        "max_steps=6",
        "reward_funcs=[digits]",
        "reward_kwargs={}",
        "checkpoint.save_steps=2",
        "checkpoint.async_save=false",
        "optimizer.learning_rate=3e-3",
    ]
    run_grpo(_cfg(tmp_path / "full", *extra), extra_rewards={"digits": digit_reward})

    original = checkpointing.Checkpointer.maybe_save

    class Crash(Exception):
        pass

    def save_then_crash(self, step, *a, **kw):
        saved = original(self, step, *a, **kw)
        if step == 2:
            self.wait()
            raise Crash
        return saved

    monkeypatch.setattr(checkpointing.Checkpointer, "maybe_save", save_then_crash)
    with pytest.raises(Crash):
        run_grpo(_cfg(tmp_path / "crash", *extra), extra_rewards={"digits": digit_reward})
    monkeypatch.setattr(checkpointing.Checkpointer, "maybe_save", original)
    run_grpo(_cfg(tmp_path / "crash", *extra), extra_rewards={"digits": digit_reward})

    def params(run):
        return {k: np.asarray(v.value) for k, v in flat_variables(load_model(run / "model")).items()}

    full, resumed = params(tmp_path / "full"), params(tmp_path / "crash")
    for name in full:
        np.testing.assert_array_equal(full[name], resumed[name], err_msg=name)

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["reward"]) for r in rows if "loss" in r}

    assert losses(tmp_path / "crash") == losses(tmp_path / "full")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["reward_funcs=[acuracy]", "reward_kwargs={}"], "did you mean"),
        (["num_generations=3"], "divisible by num_generations"),
        (["data.path={table}"], "solution"),
        (["model.name_or_path=runs/nowhere/model"], "does not exist"),
        (["reward_funcs=[accuracy, format]", "reward_weights=[1.0]"], "reward_weights"),
    ],
)
def test_bad_input_is_one_sentence_before_any_compile(tmp_path, capsys, overrides, message):
    table = tmp_path / "problems.jsonl"
    table.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    out = tmp_path / "out"
    args = [a.replace("{table}", str(table)) for a in overrides]
    code = cli_main(["grpo", "default", f"output_dir={out}", *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
