"""SFT train-step speed: our jitted step vs transformers' PyTorch step, same model, weights, batch and optimizer.

    python bench/sft_speed.py [--preset tiny-moe] [--batch 8] [--seq-len 256] [--steps 10] [--warmup 2]
                              [--rounds 2] [--dtype float32|bfloat16] [--moe-impl ragged|dense] [--no-torch]
                              [--torch-threads N] [--peak-tflops X] [--json OUT]

1. Builds our model from the preset (`build_model(cfg, seed=0)`, jitted), saves it as an openr1-jax checkpoint,
   exports that with `convert_jax_to_hf` and loads the export with `transformers.AutoModelForCausalLM` in
   float32 (its default experts and attention implementations), so both sides hold the same weights.
   transformers' DeepSeek-V3 has no MTP, so for the comparison our model is built with
   num_nextn_predict_layers=0 and trained with mtp_loss_weight=0 (the same compute); with --no-torch the preset's
   MTP modules stay and are trained (weight 0.3), as in a real run.
2. One batch of random token ids [B, T] (numpy seed 0), the loss on every next token: ours as a packed batch with
   one segment per row (segment_ids 1, positions arange, loss_mask 1), transformers with labels=input_ids (it
   shifts them itself). Both take the mean over the B * (T - 1) predicted tokens.
3. Both sides: AdamW lr 1e-4 (constant), betas (0.9, 0.999), eps 1e-8, no weight decay, gradients clipped to
   global norm 1.0 (ours: optax.clip_by_global_norm in the step, torch: clip_grad_norm_). Ours also moves the
   routers' correction biases after each update (DeepSeek-V3's aux-loss-free balancing, a few element-wise ops
   per MoE layer); transformers' step does not.
4. The first step's losses must agree (float32: within 1e-3; the step exits non-zero if not), which shows both
   sides compute the same thing. Then --warmup untimed and --steps timed steps each, alternating ours and torch
   --rounds times (best round kept, so a burst of other load on the machine hurts neither side alone).
   torch runs with torch.set_num_threads(all cores) unless --torch-threads says otherwise; on a CPU that other
   processes also load, its OpenMP threads can be several times slower than one thread, so try both.

MFU = flops_per_token(cfg, T) * tokens/s / (devices * peak). The peak: --peak-tflops, else the device's dense
bf16 peak from `train.flops.PEAK_BF16_FLOPS`, else (CPU) measured here: the best float32 FLOP/s of a large
square matmul, in JAX and in torch, so MFU on CPU is relative to what this machine's BLAS actually reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
SEED = 0


# ----------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------
def model_config(preset: str, *, with_mtp: bool, moe_impl: str | None, remat: str = "none"):
    from openr1_jax.models.presets import load_model_config

    cfg = load_model_config(preset)
    changes = {} if with_mtp else {"num_nextn_predict_layers": 0}
    if moe_impl:
        changes["moe_impl"] = moe_impl
    if remat != "none":
        changes["remat"] = remat
    return cfg.replace(**changes) if changes else cfg


def init_model(cfg, dtype: str):
    """(graphdef, params, buffers) of `build_model(cfg, dtype=dtype, seed=0)`, initialised in one jitted call
    (float32 params; the same values as the eager build, much faster for a large model on an accelerator)."""
    import jax
    from flax import nnx

    from openr1_jax.models.params import build_model
    from openr1_jax.sharding.init import split_model

    def build():
        return build_model(cfg, dtype=dtype, param_dtype="float32", seed=SEED)

    graphdef, _, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    params, buffers = jax.jit(lambda: split_model(build())[1:])()
    return graphdef, params, buffers


def make_batch(vocab_size: int, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(SEED).integers(0, vocab_size, (batch, seq_len)).astype(np.int32)
    return {
        "input_ids": ids,
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy(),
        "loss_mask": np.ones_like(ids),
    }


def export_to_hf(graphdef, params, buffers, work: Path) -> Path:
    """Our weights -> openr1-jax checkpoint -> Hugging Face folder (the project's own export path)."""
    from openr1_jax.convert.checkpoint import save_model
    from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
    from openr1_jax.sharding.init import merge_model

    ckpt, hf = work / "ckpt", work / "hf"
    save_model(merge_model(graphdef, params, buffers), ckpt)
    convert_jax_to_hf(ckpt, hf, progress=False)
    return hf


# ----------------------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, graphdef, params, buffers, batch, *, mtp_loss_weight: float):
        import jax

        from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
        from openr1_jax.train.state import create_train_state
        from openr1_jax.train.step import StepConfig, jit_train_step, make_train_step

        opt_cfg = OptimizerConfig(
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM
        )
        total_steps = 1_000_000
        optimizer = make_optimizer(opt_cfg, total_steps)
        step_cfg = StepConfig(mtp_loss_weight=mtp_loss_weight)
        self.step_fn = jit_train_step(
            make_train_step(graphdef, optimizer, step_cfg, learning_rate_schedule(opt_cfg, total_steps))
        )
        device = jax.devices()[0]
        self.state = jax.device_put(create_train_state(params, buffers, optimizer, SEED), device)
        self.batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, device)
        self.losses: list[float] = []

    def step(self, record_loss: bool = False) -> None:
        import jax

        self.state, metrics = self.step_fn(self.state, self.batch)
        if record_loss:
            self.losses.append(float(metrics["loss"]))
        jax.block_until_ready((self.state, metrics))


class Torch:
    def __init__(self, hf_dir: Path, batch, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(SEED)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        self.ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        self.losses: list[float] = []
        config = self.model.config
        self.impl = (
            f"attn={getattr(config, '_attn_implementation', '?')}, "
            f"experts={getattr(config, '_experts_implementation', '?')}"
        )

    def step(self, record_loss: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        if record_loss:
            self.losses.append(float(loss.detach()))


def time_steps(side, steps: int) -> float:
    """Seconds per step over `steps` steps (each step waits for its results)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        side.step()
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------------------------------------
# Peak FLOP/s
# ----------------------------------------------------------------------------------------------------------
def measured_matmul_peak(n: int = 2048, seconds: float = 1.0) -> tuple[float, str]:
    """Best float32 FLOP/s of an n x n matmul on this machine, in JAX (XLA) and in torch; (peak, description)."""
    import jax
    import jax.numpy as jnp

    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()

    def best(fn) -> float:
        best_s, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            best_s = min(best_s, time.perf_counter() - t0)
        return flops / best_s

    results = {"jax": best(lambda: matmul(a).block_until_ready())}
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        t = torch.randn(n, n)
        results["torch"] = best(lambda: torch.mm(t, t))
    except ImportError:
        pass
    name, peak = max(results.items(), key=lambda kv: kv[1])
    detail = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in results.items())
    return peak, f"measured: best float32 {n}x{n} matmul on this machine ({detail} GFLOP/s; {name} kept)"


def peak_flops(override_tflops: float | None) -> tuple[float, str]:
    import jax

    from openr1_jax.train.flops import peak_flops_per_device

    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    device = jax.devices()[0]
    peak = peak_flops_per_device(device)
    if peak is not None:
        return peak, f"spec sheet: dense bf16 peak of '{device.device_kind}'"
    return measured_matmul_peak()


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------
def run_benchmark(args, report=print) -> dict:
    import jax

    from openr1_jax.models.params import abstract_model, count_params
    from openr1_jax.train.flops import flops_per_token

    with_torch = not args.no_torch
    with_mtp = not with_torch  # transformers' DeepSeek-V3 has no MTP: leave it out of a comparison
    cfg = model_config(args.preset, with_mtp=with_mtp, moe_impl=args.moe_impl, remat=args.remat)
    B, T = args.batch, args.seq_len
    tokens = B * T
    devices = jax.devices()
    report(
        f"preset {args.preset}: {count_params(abstract_model(cfg)) / 1e6:.2f}M params "
        f"(MTP modules: {cfg.num_nextn_predict_layers}), moe_impl={cfg.moe_impl}; batch {B} x {T} = {tokens} "
        f"tokens; ours: compute {args.dtype}, params float32, on {devices[0].device_kind} ({devices[0].platform}, "
        f"{len(devices)} device(s) seen, 1 used)"
    )
    results: dict = {
        "preset": args.preset,
        "batch": B,
        "seq_len": T,
        "dtype": args.dtype,
        "moe_impl": cfg.moe_impl,
        "mtp_modules": cfg.num_nextn_predict_layers,
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
    }

    t0 = time.perf_counter()
    graphdef, params, buffers = init_model(cfg, args.dtype)
    jax.block_until_ready(params)
    results["init_s"] = time.perf_counter() - t0
    batch = make_batch(cfg.vocab_size, B, T)

    torch_side = None
    if with_torch:
        with tempfile.TemporaryDirectory(prefix="sft_speed_") as work:
            t0 = time.perf_counter()
            hf_dir = export_to_hf(graphdef, params, buffers, Path(work))
            torch_side = Torch(hf_dir, batch, args.torch_threads or os.cpu_count() or 1)
            results["export_and_load_s"] = time.perf_counter() - t0
        report(f"transformers {_version('transformers')}, torch {_version('torch')} ({torch_side.impl}), "
               f"{torch_side.torch.get_num_threads()} threads")  # fmt: skip

    # Ours owns (and donates) the arrays from here on.
    ours = Ours(graphdef, params, buffers, batch, mtp_loss_weight=0.3 if with_mtp else 0.0)
    t0 = time.perf_counter()
    ours.step(record_loss=True)
    results["ours_first_step_s"] = time.perf_counter() - t0  # compile + one step
    if torch_side is not None:
        t0 = time.perf_counter()
        torch_side.step(record_loss=True)
        results["torch_first_step_s"] = time.perf_counter() - t0

    # Same computation: the losses at the same (initial) weights on the same batch.
    results["ours_first_loss"] = ours.losses[0]
    if torch_side is not None:
        results["torch_first_loss"] = torch_side.losses[0]
        diff = abs(ours.losses[0] - torch_side.losses[0])
        tolerance = 1e-3 if args.dtype == "float32" else 5e-2
        results["first_loss_diff"] = diff
        report(
            f"first-step loss: ours {ours.losses[0]:.6f}, torch {torch_side.losses[0]:.6f}, "
            f"|diff| {diff:.2e} (tolerance {tolerance:g} for {args.dtype})"
        )
        if not diff <= tolerance:
            raise SystemExit(f"FAIL: first-step losses differ by {diff:.3e} > {tolerance:g}: not the same computation")
    else:
        report(f"first-step loss: ours {ours.losses[0]:.6f}")

    for _ in range(max(0, args.warmup - 1)):  # the first step above was one warmup step already
        ours.step()
        if torch_side is not None:
            torch_side.step()

    sides = {"ours": ours} if torch_side is None else {"ours": ours, "torch": torch_side}
    per_round: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            per_round[name].append(time_steps(side, args.steps))
    ours.step(record_loss=True)
    results["ours_last_loss"] = ours.losses[-1]
    if torch_side is not None:
        torch_side.step(record_loss=True)
        results["torch_last_loss"] = torch_side.losses[-1]

    fpt = flops_per_token(cfg, T, with_mtp=with_mtp)
    peak, peak_source = peak_flops(args.peak_tflops)
    results.update(flops_per_token=fpt, peak_flops=peak, peak_source=peak_source, rounds=per_round)
    report(f"{'':<8} {'ms/step':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7}   (best of {args.rounds} rounds "
           f"of {args.steps} steps, after {args.warmup} warmup steps)")  # fmt: skip
    for name, times in per_round.items():
        s = min(times)
        tps = tokens / s
        achieved = fpt * tps
        mfu = achieved / peak  # one device
        results[name] = {"s_per_step": s, "tokens_per_s": tps, "tflops": achieved / 1e12, "mfu": mfu}
        report(f"{name:<8} {s * 1e3:10.1f} {tps:12.0f} {achieved / 1e12:9.3f} {mfu:7.2%}")
    if torch_side is not None:
        ratio = results["ours"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        results["ratio"] = ratio
        report(f"ratio ours / torch (tokens/s): {ratio:.2f}x   (goal >= 3x)")
        steps_done = args.warmup + args.rounds * args.steps  # the loss of the next step, at these weights
        report(
            f"loss at step {steps_done + 1} (drifts apart slowly: float32 rounding, our router-bias update): "
            f"ours {results['ours_last_loss']:.4f}, torch {results['torch_last_loss']:.4f}"
        )
    report(
        f"MFU: {fpt / 1e6:.2f} MFLOP/token (train.flops.flops_per_token, T={T}, MTP {'on' if with_mtp else 'off'}) "
        f"x tokens/s / (1 device x {peak / 1e12:.3f} TFLOP/s peak; {peak_source})"
    )
    report(f"ours: first step (compile + run) {results['ours_first_step_s']:.1f}s, not in the timings")
    return results


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-moe", help="model preset name or YAML path")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles ours)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, alternating the sides; best kept")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="our compute dtype")
    parser.add_argument("--moe-impl", choices=["ragged", "dense"], default=None, help="override the preset's")
    parser.add_argument("--remat", choices=["none", "full", "save_dots"], default="none", help="our remat policy")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers peer (keeps MTP on)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads for the peer (default: all cores)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU")
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq_len, args.steps, args.rounds) < 1 or args.warmup < 1:
        parser.error("--batch, --seq-len, --steps, --rounds and --warmup must be >= 1")
    results = run_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
