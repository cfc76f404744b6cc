"""GRPO step speed: our co-located rollout + jitted step vs TRL's GRPOTrainer, same weights, prompts and reward.

    python bench/grpo_speed.py [--preset tiny-moe] [--prompts 8] [--num-generations 8] [--new-tokens 128]
                               [--steps 5] [--warmup 1] [--torch-threads N] [--no-trl] [--json OUT]

TRL is not a dependency of openr1-jax. Its side runs in a subprocess with `bench/.trl-site` first on PYTHONPATH,
a folder made (git-ignored) with

    .venv/bin/pip install --no-deps --target bench/.trl-site trl==1.16.0 accelerate==1.15.0

(--no-deps so pip cannot pull another torch; everything else TRL imports is already in .venv).

1. Builds our model from the preset in float32 (`build_model(cfg, seed=0)`), without the MTP module
   (transformers' DeepSeek-V3 has none, and GRPO's loss does not use it), saves it as an openr1-jax checkpoint
   with the embedded tokenizer, and exports that with `convert_jax_to_hf`. Ours loads the checkpoint as `openr1-jax
   grpo` does (`sharded_train_state`, one CPU device); TRL gets `AutoModelForCausalLM.from_pretrained(export)`.
   Before timing, the transformers model scores four of our rollout sequences: its log-probs must equal the ones
   our sampler returned (float32, max abs diff printed), which shows both sides run the same model.
2. One step = one generation batch of --prompts embedded-task prompts x --num-generations completions of exactly
   --new-tokens sampled tokens (temperature 1, no top-k/top-p), a digit-share reward, group advantages, and one
   AdamW step on all of them (one micro-batch): TRL's beta=0 (no reference model), loss_type="dapo",
   num_iterations=1, steps_per_generation=1, so neither side needs old log-probs (ratio 1). Same constant
   learning rate, betas, eps, no weight decay, gradient clipping at 1.0, no MoE auxiliary loss on either side.
   Fixed length: ours samples with `SamplingParams(ignore_eos=True)` (an adapter around the engine: the GRPO config
   has no such option), TRL with `generation_kwargs={"min_new_tokens": N}` (transformers masks EOS until then).
   Both sides check that every completion has exactly N tokens.
3. Generation time = prompts -> scored, normalised batch (ours: `generate_rollout`; TRL:
   `_generate_and_score_completions`, both include the reward and advantages). Training time = the rest of the
   step (ours: batch to device, the jitted step, block until done; TRL: the rest of its step from
   `on_step_begin` to `on_step_end`: loss, backward, clipping, AdamW). The two sides alternate step by step (the
   TRL worker waits for a "go" before each step), so load from other processes falls on both. --warmup steps
   (our compiles, torch's first calls; the first step's time is printed) are dropped; the median of --steps
   steps and the fastest step are reported. torch runs with torch.set_num_threads(--torch-threads), default all
   cores. On a 2-core machine that other processes also use, torch's OpenMP threads slow down far more than
   XLA's (steps of 10-120 s instead of ~1.2 s were seen): read the printed load average, and trust a run only
   when it is about 1 before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LEARNING_RATE = 1e-6  # TRL's default; speed does not depend on it
MAX_GRAD_NORM = 1.0
SEED = 0
TRL_SITE = Path(__file__).resolve().parent / ".trl-site"
ROOT = Path(__file__).resolve().parent.parent


def digit_reward(completions, **_) -> list[float]:
    """The share of digits in each completion: cheap, deterministic, the same code on both sides."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


# ----------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------
def build(preset: str, work: Path):
    from openr1_jax.convert.checkpoint import save_model
    from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
    from openr1_jax.data.chat import load_tokenizer
    from openr1_jax.data.config import DataConfig
    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_model_config

    tokenizer = load_tokenizer(DataConfig())
    cfg = load_model_config(preset).replace(num_nextn_predict_layers=0)
    if len(tokenizer) > cfg.vocab_size:
        raise SystemExit(f"{preset}'s vocab ({cfg.vocab_size}) does not cover the tokenizer ({len(tokenizer)})")
    model = build_model(cfg, dtype="float32", param_dtype="float32", seed=SEED)
    save_model(model, work / "ckpt", tokenizer=tokenizer)
    convert_jax_to_hf(work / "ckpt", work / "hf", progress=False)
    return cfg, tokenizer, work / "ckpt", work / "hf"


class FixedLength:
    """The engine, sampling every completion to max_new_tokens (EOS ignored): both sides then do the same work."""

    def __init__(self, engine):
        self.engine, self.pad_id = engine, engine.pad_id

    def generate(self, prompts, params):
        return self.engine.generate(prompts, [p.replace(ignore_eos=True) for p in params])


# ----------------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------------
def ours(ckpt: Path, model_cfg, tokenizer, rows: list[dict], args, after_step=None) -> dict:
    """Our steps; `after_step(i, first_rollout_rows)` runs between them (untimed: the peer's step goes there)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from openr1_jax.generate.engine import Engine
    from openr1_jax.rl.config import GRPOConfig, PromptDataSection
    from openr1_jax.rl.loss import LossConfig
    from openr1_jax.rl.rollout import PromptBuilder, generate_rollout
    from openr1_jax.rl.step import BATCH_KEYS, make_grpo_step
    from openr1_jax.sharding.context import sharding_context
    from openr1_jax.sharding.mesh import MeshConfig, make_mesh
    from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
    from openr1_jax.train.config import ModelSection
    from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
    from openr1_jax.train.sft import sharded_train_state

    G, C = args.num_generations, args.new_tokens
    builder = PromptBuilder(tokenizer, PromptDataSection())
    P = max(len(builder.ids(r, 10**6)) for r in rows)
    opt_cfg = OptimizerConfig(
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0
    )
    cfg = GRPOConfig(
        batch_size=args.prompts * G,
        num_generations=G,
        max_prompt_length=P,
        max_completion_length=C,
        loss_type="dapo",
        beta=0.0,
        num_iterations=1,
        temperature=1.0,
        reward_funcs=["digits"],
        model=ModelSection(name_or_path=str(ckpt), dtype="float32", param_dtype="float32"),
        optimizer=opt_cfg,
        mesh=MeshConfig(),
    )
    steps_total = args.warmup + args.steps
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    optimizer = make_optimizer(opt_cfg, steps_total)
    loss_cfg = LossConfig(loss_type="dapo", beta=0.0, max_completion_length=C)
    with sharding_context(mesh, DEFAULT_RULES):
        graphdef, state, shardings = sharded_train_state(cfg.model, model_cfg, ckpt, optimizer, mesh, SEED)
        T = P + C
        rows_sharding = named_sharding(("batch", None), mesh, DEFAULT_RULES, (cfg.batch_size, T))
        batch_shardings = {k: rows_sharding for k in BATCH_KEYS}
        batch_shardings["advantages"] = named_sharding(("batch",), mesh, DEFAULT_RULES, (cfg.batch_size,))
        batch_shardings["num_items"] = NamedSharding(mesh, PartitionSpec())
        step_fn = make_grpo_step(
            graphdef,
            optimizer,
            loss_cfg,
            temperature=cfg.temperature,
            micro_batches=1,
            on_policy=True,
            schedule=learning_rate_schedule(opt_cfg, steps_total),
        )
        train_step = jax.jit(
            step_fn,
            in_shardings=(shardings, batch_shardings),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=(0,),
        )
        engine = Engine.from_state(
            graphdef,
            state.params,
            state.buffers,
            model_cfg,
            tokenizer,
            mesh=mesh,
            max_batch_size=cfg.rollout.max_batch_size,
            max_seq_len=T,
            chunk_size=cfg.rollout.chunk_size,
        )
        sampler = FixedLength(engine)
        gen_s, train_s, total_s, lengths, first = [], [], [], set(), None
        for i in range(steps_total):
            step_rows = rows[i * args.prompts : (i + 1) * args.prompts]
            start = time.perf_counter()
            engine.set_params(state.params, state.buffers)
            rollout = generate_rollout(
                sampler, step_rows, builder, [digit_reward], ["digits"], np.ones(1, np.float32), cfg, seed=SEED + i
            )
            mid = time.perf_counter()
            num_items = float(rollout.completion_lengths_N.sum())
            batch = jax.device_put(rollout.batch(np.arange(rollout.size), None, num_items), batch_shardings)
            state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)  # blocks: the step is done
            jax.block_until_ready(state)
            end = time.perf_counter()
            gen_s.append(mid - start)
            train_s.append(end - mid)
            total_s.append(end - start)
            lengths |= set(rollout.completion_lengths_N.tolist())
            if first is None:
                first = {
                    "input_ids": rollout.input_ids_NxT[:4].tolist(),
                    "valid": rollout.valid_NxT[:4].tolist(),
                    "mask": rollout.mask_NxT[:4].tolist(),
                    "old_logps": rollout.old_logps_NxT[:4].tolist(),
                }
            if not np.isfinite(metrics["loss"]):
                raise SystemExit(f"our step {i} produced a non-finite loss")
            if after_step is not None:
                after_step(i, first)
    return {
        "prompt_tokens": P,
        "completion_lengths": sorted(lengths),
        "gen_s": gen_s,
        "train_s": train_s,
        "total_s": total_s,
        "check_rows": first,
    }


# ----------------------------------------------------------------------------------------------------------
# TRL (runs in a subprocess with bench/.trl-site on the path)
# ----------------------------------------------------------------------------------------------------------
def trl_worker(spec: dict, proto_in, proto_out) -> dict:
    import torch

    torch.set_num_threads(spec["torch_threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    transformers.logging.set_verbosity_error()
    hf_dir = spec["hf_dir"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    # The same model: transformers' log-probs of our sampled tokens equal our sampler's.
    check = spec["check_rows"]
    with torch.no_grad():
        ids = torch.tensor(check["input_ids"])
        logits = model(input_ids=ids, attention_mask=torch.tensor(check["valid"])).logits.float()
        logps = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.tensor(check["mask"])[:, :-1] > 0
        ours = torch.tensor(check["old_logps"])[:, :-1]
        logp_diff = float((logps - ours)[mask].abs().max())
    prompt_ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in spec["problems"]
    ]
    prompt_ids = [p["input_ids"] if hasattr(p, "keys") else p for p in prompt_ids]  # transformers 5: a dict

    lengths: set[int] = set()

    def digits(completions, completion_ids, **kw):
        lengths.update(len(c) for c in completion_ids)
        return digit_reward(completions)

    gen_s: list[float] = []
    starts: list[float] = []
    ends: list[float] = []

    class Timed(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            gen_s.append(time.perf_counter() - start)
            return out

    class Gate(TrainerCallback):
        """Each step waits for the driver's go, so the driver can run our step in between (machine load then
        falls on both sides alike)."""

        def on_step_begin(self, args, state, control, **kw):
            proto_out.write("ready\n")
            proto_out.flush()
            if proto_in.readline().strip() != "go":
                raise SystemExit("the benchmark driver went away")
            starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    N, G = spec["new_tokens"], spec["num_generations"]
    steps_total = spec["warmup"] + spec["steps"]
    args = trl.GRPOConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["prompts"] * G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        max_completion_length=N,
        generation_kwargs={"min_new_tokens": N},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=MAX_GRAD_NORM,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        epsilon=0.2,
        scale_rewards="group",
        router_aux_loss_coef=0.0,
        bf16=False,
        gradient_checkpointing=False,
        max_steps=steps_total,
        shuffle_dataset=False,
        logging_steps=10**6,
        log_completions=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in spec["problems"]])
    trainer = Timed(
        model=model,
        reward_funcs=[digits],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Gate()],
    )
    trainer.train()
    total_s = [e - b for b, e in zip(starts, ends, strict=True)]
    return {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": sorted({len(p) for p in prompt_ids}),
        "prompts_equal_ours": prompt_ids == spec["our_prompt_ids"],
        "logp_max_abs_diff": logp_diff,
        "completion_lengths": sorted(lengths),
        "gen_s": gen_s,
        "total_s": total_s,
        "train_s": [t - g for t, g in zip(total_s, gen_s, strict=True)],
    }


class TRLDriver:
    """TRL's trainer in a subprocess (bench/.trl-site on its path), stepping in lockstep with ours: one line
    protocol on its stdin/stdout ("ready" before each step, "go" to run it, "result JSON" at the end)."""

    def __init__(self, spec: dict, work: Path):
        if not (TRL_SITE / "trl").is_dir():
            raise SystemExit(
                f"TRL is not installed for the benchmark: run\n  {sys.executable} -m pip install --no-deps "
                f"--target {TRL_SITE} trl==1.16.0 accelerate==1.15.0\nor pass --no-trl"
            )
        (work / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRL_SITE), str(ROOT)]), "JAX_PLATFORMS": "cpu"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(work / "spec.json")]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._pending: str | None = None

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the TRL worker exited (code {self.proc.wait()}); its error is above")
        return line

    def step(self) -> None:
        """Run one TRL step; returns when it is over (the worker then waits before the next one, or is done)."""
        line = self._pending or self._line()
        if line.strip() != "ready":
            raise SystemExit(f"the TRL worker is out of step: {line[:80]!r}")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._pending = self._line()

    def finish(self) -> dict:
        line = self._pending or self._line()
        if not line.startswith("result "):
            raise SystemExit(f"the TRL worker wants more steps than asked: {line[:80]!r}")
        self.proc.stdin.close()
        self.proc.wait()
        return json.loads(line.removeprefix("result "))


# ----------------------------------------------------------------------------------------------------------
# Run and report
# ----------------------------------------------------------------------------------------------------------
def _stats(side: dict, skip: int) -> dict:
    """Medians of the timed steps, and the fastest step (the best estimate of an unloaded machine: other
    processes on a small CPU only ever add time, and torch's OpenMP threads suffer most from them)."""
    out = {k: statistics.median(side[k][skip:]) for k in ("gen_s", "train_s", "total_s")}
    best = min(range(skip, len(side["total_s"])), key=lambda i: side["total_s"][i])
    out |= {f"best_{k}": side[k][best] for k in ("gen_s", "train_s", "total_s")}
    return out | {"all_gen_s": side["gen_s"], "all_total_s": side["total_s"], "first_step_s": side["total_s"][0]}


def run(args) -> dict:
    from openr1_jax.data.embedded import load_rows
    from openr1_jax.rl.config import PromptDataSection
    from openr1_jax.rl.rollout import PromptBuilder

    steps_total = args.warmup + args.steps
    rows = load_rows("train", args.prompts * steps_total)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_cfg, tokenizer, ckpt, hf_dir = build(args.preset, work)
        builder = PromptBuilder(tokenizer, PromptDataSection())
        driver: TRLDriver | None = None

        def after_step(i: int, check_rows: dict) -> None:
            nonlocal driver
            if args.no_trl:
                return
            if driver is None:
                spec = {
                    "hf_dir": str(hf_dir),
                    "out_dir": str(work / "trl-out"),
                    "problems": [r["problem"] for r in rows],
                    "our_prompt_ids": [builder.ids(r, 10**6) for r in rows],
                    "check_rows": check_rows,
                    "prompts": args.prompts,
                    "num_generations": args.num_generations,
                    "new_tokens": args.new_tokens,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "torch_threads": args.torch_threads,
                }
                driver = TRLDriver(spec, work)
            driver.step()

        mine = ours(ckpt, model_cfg, tokenizer, rows, args, after_step)
        tokens = args.prompts * args.num_generations * args.new_tokens
        result = {
            "preset": args.preset,
            "dtype": "float32",
            "prompts": args.prompts,
            "num_generations": args.num_generations,
            "new_tokens": args.new_tokens,
            "warmup": args.warmup,
            "steps": args.steps,
            "machine": f"{os.cpu_count()} CPU cores",
            "ours": {
                "prompt_tokens": mine["prompt_tokens"],
                "completion_lengths": mine["completion_lengths"],
                **_stats(mine, args.warmup),
            },
        }
        result["ours"]["tokens_per_s"] = tokens / result["ours"]["total_s"]
        result["ours"]["gen_tokens_per_s"] = tokens / result["ours"]["gen_s"]
        ok = mine["completion_lengths"] == [args.new_tokens]
        if driver is not None:
            theirs = driver.finish()
            t = {
                **{
                    k: theirs[k]
                    for k in (
                        "versions",
                        "torch_threads",
                        "prompt_tokens",
                        "prompts_equal_ours",
                        "logp_max_abs_diff",
                        "completion_lengths",
                    )
                },
                **_stats(theirs, args.warmup),
            }
            t["tokens_per_s"] = tokens / t["total_s"]
            t["gen_tokens_per_s"] = tokens / t["gen_s"]
            result["trl"] = t
            keys = ("gen_s", "train_s", "total_s", "best_gen_s", "best_train_s", "best_total_s")
            result["speedup"] = {k: t[k] / result["ours"][k] for k in keys}
            ok = ok and t["completion_lengths"] == [args.new_tokens] and t["prompts_equal_ours"]
            ok = ok and t["logp_max_abs_diff"] < 1e-3
        result["checks_pass"] = ok
    result["load_average"] = [load_before, os.getloadavg()[0]]  # other processes on the machine inflate both sides
    return result


def report(r: dict) -> None:
    n = r["prompts"] * r["num_generations"]
    print(
        f"{r['preset']} {r['dtype']}: one GRPO step = {r['prompts']} prompts x G={r['num_generations']} = {n} "
        f"completions x {r['new_tokens']} tokens; {r['steps']} timed steps after {r['warmup']} warm-up, the two "
        f"sides alternating step by step ({r['machine']})"
    )
    sides = [("ours", r["ours"])] + ([("TRL GRPOTrainer", r["trl"])] if "trl" in r else [])
    head = f"  {'':18s} {'generation s':>13s} {'training s':>11s} {'step s':>8s} {'tokens/s':>9s}"
    for label, prefix in (("median", ""), ("fastest step", "best_")):
        print(f"  {label}:")
        print(head + (f" {'first step s':>13s}" if not prefix else ""))
        for name, s in sides:
            g, t, total = (s[prefix + k] for k in ("gen_s", "train_s", "total_s"))
            first = f" {s['first_step_s']:13.2f}" if not prefix else ""
            n_tokens = r["prompts"] * r["num_generations"] * r["new_tokens"]
            print(f"  {name:18s} {g:13.2f} {t:11.2f} {total:8.2f} {n_tokens / total:9.0f}{first}")
        if "speedup" in r:
            sp = r["speedup"]
            g, t, total = (sp[prefix + k] for k in ("gen_s", "train_s", "total_s"))
            print(f"  {'speedup':18s} {g:12.1f}x {t:10.1f}x {total:7.1f}x")
    if "trl" in r:
        t = r["trl"]
        v = t["versions"]
        print(
            f"  TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']} on {t['torch_threads']} threads;"
            f" same prompts: {t['prompts_equal_ours']}; transformers' log-probs of our samples differ by at most"
            f" {t['logp_max_abs_diff']:.1e}"
        )
    print(
        f"  1-minute load average before / after: {r['load_average'][0]:.1f} / {r['load_average'][1]:.1f}"
        " (the benchmark alone adds about 1; more means other processes shared the cores)"
    )
    lengths = {name: s["completion_lengths"] for name, s in sides}
    print(f"  completion lengths seen: {lengths}; checks pass: {r['checks_pass']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trl-worker"]:
        # The protocol keeps the real stdout; everything else the worker prints goes to stderr.
        proto_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        result = trl_worker(json.loads(Path(argv[1]).read_text()), sys.stdin, proto_out)
        proto_out.write("result " + json.dumps(result) + "\n")
        proto_out.flush()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compiles, first calls)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-trl", action="store_true", help="only our side (e.g. on a GPU machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    r = run(args)
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r["checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
