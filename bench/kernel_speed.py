"""Kernel speed: each Pallas kernel against its XLA peer, measured in the same process on the same inputs.

    python bench/kernel_speed.py [--only attention|gmm|tpu-roofline] [--quick] [--tune] [--reps 10] [--json OUT]
                            [--tpu v5e v5p v6e] [--seq-lens 1024 ... 32768]

Sections (one function each, registered in SECTIONS; on a GPU the attention and gmm sections run, elsewhere
tpu-roofline):

- attention: the Pallas GPU flash attention (kernels/flash_attention/gpu.py) vs the XLA reference (which
  materialises the [T, T] scores), bf16, causal, packed rows (4 segments per row), fwd and fwd+bwd, at T = 1k ..
  32k with B = max(1, 16k // T) so tokens stay ~constant. Shapes: MLA (N=16, H=192, O=128, DeepSeek-V3's
  per-head dims) and GQA (N=32, M=8, H=O=128, a Llama-style student). An XLA run whose [T, T] scores cannot fit
  in GPU memory is not attempted ("oom (est)"); one that fails allocating says "oom".
- gmm: the Pallas GPU grouped matmul (kernels/gmm/gpu.py) at DeepSeek-V3 expert shapes (hidden K=7168, expert
  ffn N=2048, G=256 experts, top-8 routing of 4k-16k tokens, so M = tokens * 8 rows; group sizes from a skewed
  random router) vs (a) jax.lax.ragged_dot (XLA) and (b) a dense [M, K] x [K, N] matmul of the same FLOPs.
  fwd, fwd+bwd (gmm's custom_vjp: dlhs by gmm on rhs transposed, drhs by tgmm) and tgmm alone (vs XLA's
  ragged_dot transpose and a dense [K, M] x [M, N] matmul). hbm_floor_ms: the time to move each operand once at
  3.0 TB/s; with 256 experts the weights alone (7.5 GB) take 2.5 ms, more than a dense matmul of 4k tokens.

- tpu-roofline (no accelerator needed): every TPU kernel and its XLA reference compiled ahead of time for a TPU
  chip through libtpu; the compiler's FLOPs and bytes give an expected time max(FLOPs / peak, bytes / HBM
  bandwidth) (v5p: 459 bf16 TFLOP/s, 2.76 TB/s). A Mosaic kernel's numbers are the pl.CostEstimate it declares
  (our model of its traffic); the reference's are XLA's own. Not a measurement: a bound to compare against.

Timing: jitted functions, `jax.block_until_ready`, a compiling call and a first timed call (a peer slower than 2 s
per call keeps that one sample), then the median of --reps calls. --tune first sweeps block sizes at T=8k (MLA)
and 8k tokens (gmm) for the sections being run, then runs them with the fastest. Goals (issue 6): flash
attention fwd+bwd >= 2x XLA at 8k; gmm within 1.5x of a dense matmul of the same FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax
import jax.numpy as jnp
import numpy as np
from openr1_jax_kernels.flash_attention import gpu as fa_gpu
from openr1_jax_kernels.flash_attention.reference import flash_attention_reference
from openr1_jax_kernels.gmm import gpu as gmm_gpu
from openr1_jax_kernels.gmm.reference import gmm_reference, tgmm_reference
from tqdm.auto import tqdm

ATTENTION_SHAPES = {"mla": dict(N=16, M=16, H=192, O=128), "gqa": dict(N=32, M=8, H=128, O=128)}
ATTENTION_TOKENS = 16384
GMM = dict(K=7168, N=2048, G=256, top_k=8)
GPU_BYTES = 80e9
HBM_BYTES_PER_S = 3.0e12  # an H100's measured device-to-device copy rate (bytes read + written)


def timed(fn, *args, reps: int) -> float:
    """Median seconds of fn(*args) after two warm-up calls."""
    jax.block_until_ready(fn(*args))  # compiles
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    if first > 2.0:  # a slow peer (seconds per call): one sample is enough to show the ratio
        return first
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attempt(fn, *args, reps: int):
    """(milliseconds, None) or (None, 'oom' / the error's first line)."""
    try:
        return timed(fn, *args, reps=reps) * 1e3, None
    except Exception as e:  # a benchmark row records the failure and moves on
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return None, "oom"
        traceback.print_exc()
        return None, text.splitlines()[0][:120] if text else type(e).__name__


def _attention_inputs(B, T, N, M, H, O, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, M, H), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, M, O), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, N, O), jnp.bfloat16)
    # Packed rows: 4 documents per row with random boundaries.
    cuts = jnp.sort(jax.random.randint(ks[4], (B, 3), 1, T), axis=1)
    seg = jnp.sum(jnp.arange(T)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)
    return q, k, v, seg, do


def _attention_fns(impl, scale, blocks=None):
    if impl == "pallas":
        attn = lambda q, k, v, s: fa_gpu.flash_attention_gpu(q, k, v, s, scale=scale, causal=True, block_sizes=blocks)  # noqa: E731
    else:
        attn = lambda q, k, v, s: flash_attention_reference(q, k, v, s, scale=scale, causal=True)  # noqa: E731
    fwd = jax.jit(attn)

    def run(q, k, v, s, do):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, s), q, k, v)
        return out, *vjp(do)  # returning out keeps the forward from being dead code

    fwd_bwd = jax.jit(run)
    return fwd, fwd_bwd


def attention_section(args, tuned):
    blocks = tuned.get("attention")
    lengths = [1024, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    rows = []
    for shape_name, dims in ATTENTION_SHAPES.items():
        for T in lengths:
            B = max(1, ATTENTION_TOKENS // T)
            q, k, v, seg, do = _attention_inputs(B, T, **dims)
            scale = dims["H"] ** -0.5
            # Causal FLOPs (half the square): fwd q.k and p.v; bwd recompute of q.k plus dp, dv, dk, dq.
            fwd_flops = B * dims["N"] * T * T * (dims["H"] + dims["O"])
            flops = {"fwd": fwd_flops, "fwd+bwd": B * dims["N"] * T * T * (4 * dims["H"] + 3 * dims["O"])}
            scores_bytes = B * dims["N"] * T * T * 4
            fns = {impl: _attention_fns(impl, scale, blocks) for impl in ("pallas", "xla")}
            for mode, index, xla_copies in (("fwd", 0, 2), ("fwd+bwd", 1, 4)):
                call = (q, k, v, seg) if mode == "fwd" else (q, k, v, seg, do)
                pallas_ms, pallas_err = attempt(fns["pallas"][index], *call, reps=args.reps)
                if scores_bytes * xla_copies > GPU_BYTES:
                    xla_ms, xla_err = None, "oom (est)"
                else:
                    xla_ms, xla_err = attempt(fns["xla"][index], *call, reps=args.reps)
                row = dict(
                    section="attention", shape=shape_name, T=T, B=B, mode=mode, pallas_ms=pallas_ms, xla_ms=xla_ms
                )
                row["pallas_tflops"] = flops[mode] / pallas_ms / 1e9 if pallas_ms else None
                row["speedup_vs_xla"] = xla_ms / pallas_ms if pallas_ms and xla_ms else None
                row["note"] = pallas_err or xla_err or ""
                rows.append(row)
                _print_row(row)
            del q, k, v, seg, do, fns
    return rows


def _router_group_sizes(tokens, G, top_k, seed=0):
    """Expert loads of a skewed random router: per-expert popularity plus per-token noise, top-k per token."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, G)).astype(np.float32) + rng.normal(scale=0.7, size=G).astype(np.float32)
    chosen = np.argpartition(-logits, top_k, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=G).astype(np.int32)


def _gmm_inputs(M, K, N, G, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(ks[0], (M, K), jnp.bfloat16)
    rhs = (jax.random.normal(ks[1], (G, K, N), jnp.bfloat16) * (K**-0.5)).astype(jnp.bfloat16)
    grad = jax.random.normal(ks[2], (M, N), jnp.bfloat16)
    return lhs, rhs, grad


def _gmm_fns(tiling=None, tgmm_tiling=None):
    pallas = lambda x, w, gs: gmm_gpu.gmm_gpu(x, w, gs, tiling=tiling, tgmm_tiling=tgmm_tiling)  # noqa: E731
    dense = lambda x, w, gs: jnp.dot(x, w)  # noqa: E731  w is one [K, N] expert: the same FLOPs over all M rows

    def fwd_bwd(f):
        def run(x, w, gs, dy):
            out, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
            return out, *vjp(dy)  # returning out keeps the forward product from being dead code

        return jax.jit(run)

    G = GMM["G"]
    tgmm = {
        "pallas": jax.jit(lambda x, dy, gs: gmm_gpu.tgmm_gpu(x, dy, gs, G, tiling=tgmm_tiling)),
        "xla": jax.jit(lambda x, dy, gs: tgmm_reference(x, dy, gs, num_groups=G)),
        "dense": jax.jit(lambda x, dy, gs: jnp.dot(x.T, dy)),
    }
    fns = {name: (jax.jit(f), fwd_bwd(f)) for name, f in (("pallas", pallas), ("xla", gmm_reference), ("dense", dense))}
    return fns, tgmm


def gmm_section(args, tuned):
    tokens_list = [4096] if args.quick else [4096, 8192, 16384]
    K, N, G, top_k = GMM["K"], GMM["N"], GMM["G"], GMM["top_k"]
    fns, tgmm = _gmm_fns(tuned.get("gmm"), tuned.get("tgmm"))
    rows = []
    for tokens in tokens_list:
        M = tokens * top_k
        sizes = _router_group_sizes(tokens, G, top_k)
        gs = jnp.asarray(sizes)
        lhs, rhs, grad = _gmm_inputs(M, K, N, G)
        weights = {"pallas": rhs, "xla": rhs, "dense": rhs[0]}
        for mode in ("fwd", "fwd+bwd", "tgmm"):
            times, notes = {}, []
            for impl in ("pallas", "xla", "dense"):
                if mode == "tgmm":
                    fn, call = tgmm[impl], (lhs, grad, gs)
                else:
                    fn = fns[impl][0 if mode == "fwd" else 1]
                    call = (lhs, weights[impl], gs) if mode == "fwd" else (lhs, weights[impl], gs, grad)
                if impl == "xla" and G * M * K * 2 > GPU_BYTES:
                    # XLA:GPU expands ragged_dot into a dense [G, M, K] masked batch (G times the FLOPs); at these
                    # shapes that cannot be allocated (measured on an H100: "Out of memory ... 448 GiB").
                    times[impl], err = None, "oom (est)"
                else:
                    times[impl], err = attempt(fn, *call, reps=args.reps)
                if err:
                    notes.append(f"{impl}: {err}")
            flops = 2 * M * K * N * (3 if mode == "fwd+bwd" else 1)
            # Fewest bytes the grouped product must move: every operand read once, the result written once.
            passes = {"fwd": [M * K, G * K * N, M * N], "tgmm": [M * K, M * N, G * K * N]}
            passes["fwd+bwd"] = passes["fwd"] + [M * N, G * K * N, M * K] + passes["tgmm"]
            hbm_floor_ms = 2 * sum(passes[mode]) / HBM_BYTES_PER_S * 1e3
            row = dict(
                section="gmm", tokens=tokens, M=M, mode=mode, group_min=int(sizes.min()), group_max=int(sizes.max())
            )
            row.update({f"{impl}_ms": ms for impl, ms in times.items()})
            row["hbm_floor_ms"] = hbm_floor_ms
            p, x, d = times["pallas"], times["xla"], times["dense"]
            row["pallas_tflops"] = flops / p / 1e9 if p else None
            row["pallas_over_dense"] = p / d if p and d else None
            row["speedup_vs_xla"] = x / p if p and x else None
            row["note"] = "; ".join(notes)
            rows.append(row)
            _print_row(row)
        del lhs, rhs, grad, weights
    return rows


# Triton tilings tried by `--tune` (GPU): the attention backward's (block_q_dq, block_k_dq, block_q_dkv,
# block_k_dkv, warps, stages) and the gmm's (tm, tk, tn, warps, stages, group_m).
BACKWARD_BLOCKS = [(64, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 2), (128, 64, 64, 128, 8, 2), (64, 32, 32, 64, 4, 2),
                   (128, 32, 32, 128, 8, 2)]  # fmt: skip
GMM_TILES = [(128, 64, 256, 8, 3, 8), (128, 64, 128, 4, 4, 8), (128, 64, 256, 8, 4, 8), (128, 64, 256, 8, 3, 16),
             (128, 32, 256, 8, 4, 8), (64, 64, 256, 4, 4, 8), (128, 64, 256, 4, 3, 8)]  # fmt: skip


def _fastest(label: str, candidates: list, time_one) -> object:
    """Times `time_one(candidate) -> (ms, error)` for each candidate and returns the fastest; the first (the
    default) if none ran."""
    results = []
    for cand in candidates:
        ms, err = time_one(cand)
        results.append((ms, cand))
        print(f"tune {label} {cand}: {ms} {err or ''}", flush=True)
    ran = [r for r in results if r[0]]
    return min(ran, key=lambda r: r[0])[1] if ran else results[0][1]


def tune_attention(args):
    """The fastest block sizes at T=8k (MLA): the forward's first, then the backward's with that forward."""
    B, T, dims = 2, 8192, ATTENTION_SHAPES["mla"]
    q, k, v, seg, do = _attention_inputs(B, T, **dims)
    scale = dims["H"] ** -0.5
    forward = [
        fa_gpu.BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
        for bq, bk, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)]
    ]
    fwd = _fastest(
        "attention fwd", forward, lambda c: attempt(_attention_fns("pallas", scale, c)[0], q, k, v, seg, reps=5)
    )
    backward = [
        dataclasses.replace(
            fwd, block_q_dq=dq_q, block_k_dq=dq_k, block_q_dkv=kv_q, block_k_dkv=kv_k, num_warps_bwd=w, num_stages_bwd=s
        )
        for dq_q, dq_k, kv_q, kv_k, w, s in BACKWARD_BLOCKS
    ]
    best = _fastest(
        "attention fwd+bwd",
        backward,
        lambda c: attempt(_attention_fns("pallas", scale, c)[1], q, k, v, seg, do, reps=5),
    )
    return {"attention": best}


def tune_gmm(args):
    """The fastest gmm and tgmm tilings at 8k tokens (M = 64k rows)."""
    tokens, G = 8192, GMM["G"]
    gs = jnp.asarray(_router_group_sizes(tokens, G, GMM["top_k"]))
    lhs, rhs, grad = _gmm_inputs(tokens * GMM["top_k"], GMM["K"], GMM["N"], G)
    gmm_tilings = [
        gmm_gpu.GmmTiling(tm=tm, tk=tk, tn=tn, num_warps=w, num_stages=s, group_m=gm)
        for tm, tk, tn, w, s, gm in GMM_TILES
    ]
    tgmm_tilings = [
        gmm_gpu.TgmmTiling(tm=tm, tk=tk, tn=tn, num_warps=w, num_stages=s)
        for tm, tk, tn, w, s in [(32, 128, 128, 4, 3), (32, 64, 256, 4, 3), (32, 128, 128, 8, 4)]
    ]

    def time_gmm(c):
        return attempt(jax.jit(lambda x, w_, g: gmm_gpu.gmm_gpu(x, w_, g, tiling=c)), lhs, rhs, gs, reps=5)

    def time_tgmm(c):
        return attempt(jax.jit(lambda x, dy, g: gmm_gpu.tgmm_gpu(x, dy, g, G, tiling=c)), lhs, grad, gs, reps=5)

    return {"gmm": _fastest("gmm", gmm_tilings, time_gmm), "tgmm": _fastest("tgmm", tgmm_tilings, time_tgmm)}


# ----------------------------------------------------------------------------------------------------------
# TPU roofline: compile for a real TPU generation ahead of time (libtpu, no TPU) and turn the compiler's cost
# analysis into an expected time, max(FLOPs / peak, bytes / HBM bandwidth), for each kernel and its XLA
# reference. Mosaic kernels report the pl.CostEstimate we give them (our model of the kernel's traffic); the
# XLA reference's numbers are the compiler's own.
# ----------------------------------------------------------------------------------------------------------
TPU_CHIPS = {  # bf16 dense peak FLOP/s, HBM bytes/s (per chip)
    "v5e": ("v5e:2x2", 197e12, 0.819e12),
    "v5p": ("v5p:2x2x1", 459e12, 2.76e12),
    "v6e": ("v6e:2x2", 918e12, 1.64e12),
}


def _tpu_sharding(generation: str):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = topologies.get_topology_desc(platform="tpu", topology_name=TPU_CHIPS[generation][0]).devices[0]
    return NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())


def _tpu_cost(fn, shapes, sharding) -> tuple[float, float, int]:
    """(flops, bytes accessed, peak bytes) of `fn` compiled for one TPU chip."""
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    compiled = jax.jit(fn).lower(*specs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), peak


def tpu_roofline(args, tuned=None) -> list[dict]:
    from openr1_jax_kernels.flash_attention import flash_attention
    from openr1_jax_kernels.gmm import gmm
    from openr1_jax_kernels.latent_decode import latent_decode_attention

    rows = []
    bf16, i32 = jnp.bfloat16, jnp.int32
    for generation in args.tpu:
        sharding = _tpu_sharding(generation)
        _, peak_flops, hbm = TPU_CHIPS[generation]

        cases = []
        N, H, O = 16, 192, 128  # MLA heads of a scaled DeepSeek-V3 (V3: 128 heads, 192 / 128)
        for T in args.seq_lens:
            shapes = [((1, T, N, H), bf16), ((1, T, N, H), bf16), ((1, T, N, O), bf16), ((1, T), i32)]
            for impl in ("tpu", "xla"):
                attn = functools.partial(flash_attention, scale=H**-0.5, implementation=impl)

                def fwd_bwd(q, k, v, s, attn=attn):
                    return jax.grad(lambda q, k, v: attn(q, k, v, s).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

                cases.append((f"flash_attention fwd T={T}", impl, attn, shapes))
                cases.append((f"flash_attention fwd+bwd T={T}", impl, fwd_bwd, shapes))
        M, K, F, G = 8192, 7168, 2048, 32  # 4096 tokens x top-8 over 256 experts, 32 of them on this chip
        gshapes = [((M, K), bf16), ((G, K, F), bf16), ((G,), i32)]
        for impl in ("tpu", "xla"):
            mm = functools.partial(gmm, implementation=impl)

            def gmm_fwd_bwd(x, w, sizes, mm=mm):
                return jax.grad(lambda x, w: mm(x, w, sizes).astype(jnp.float32).sum(), (0, 1))(x, w)

            cases.append((f"gmm fwd M={M} K={K} N={F} G={G}", impl, mm, gshapes))
            cases.append((f"gmm fwd+bwd M={M} K={K} N={F} G={G}", impl, gmm_fwd_bwd, gshapes))
        B, Nd, KL, R, S = 8, 128, 512, 64, 8192
        dshapes = [((B, 1, Nd, KL), bf16), ((B, 1, Nd, R), bf16), ((B, S, KL), bf16), ((B, S, R), bf16), ((B,), i32)]
        for impl in ("tpu", "xla"):
            dec = functools.partial(latent_decode_attention, scale=192**-0.5, implementation=impl)
            cases.append((f"latent_decode B={B} N={Nd} S={S}", impl, dec, dshapes))

        for name, impl, fn, shapes in tqdm(cases, desc=f"TPU {generation} compiles", leave=False):
            try:
                flops, nbytes, peak = _tpu_cost(fn, shapes, sharding)
            except Exception as e:  # e.g. the XLA reference's [T, T] scores exceed the chip's memory
                rows.append({"chip": generation, "case": name, "impl": impl, "error": str(e).splitlines()[0][:80]})
                continue
            rows.append(
                {
                    "chip": generation,
                    "case": name,
                    "impl": impl,
                    "gflop": flops / 1e9,
                    "gbytes": nbytes / 1e9,
                    "peak_gib": peak / 2**30,
                    "expected_ms": 1e3 * max(flops / peak_flops, nbytes / hbm),
                }
            )
    for row in rows:  # expected kernel time against its XLA reference's, case by case
        if row["impl"] == "tpu" and "expected_ms" in row:
            peer = next(
                (r for r in rows if r["chip"] == row["chip"] and r["case"] == row["case"] and r["impl"] == "xla"), {}
            )
            row["xla_over_kernel"] = peer.get("expected_ms", 0) / row["expected_ms"] if "expected_ms" in peer else None
    return rows


# ----------------------------------------------------------------------------------------------------------
# model: the whole model's training pass (loss and gradients) with the kernels switched on against the XLA paths
# ----------------------------------------------------------------------------------------------------------
def model_section(args, tuned=None) -> list[dict]:
    """moe-1b (MLA 96/64 heads, 32 experts top-6, MTP) cut to 4 layers, bf16, packed rows: fwd+bwd of the token
    cross-entropy with attention_impl/moe_impl = xla/ragged vs pallas/pallas on the same weights."""
    from flax import nnx

    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_model_config

    preset = Path(__file__).resolve().parents[1] / "configs" / "models" / "moe-1b.yaml"
    rows = []
    for T in [2048] if args.quick else [2048, 4096, 8192]:
        B = max(1, 16384 // T)
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, 32768, (B, T)), jnp.int32)
        segments = jnp.asarray(np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0), jnp.int32)
        row = {"section": "model", "model": "moe-1b x4 layers", "T": T, "B": B}
        for name, impl in (
            ("xla", dict(attention_impl="xla", moe_impl="ragged")),
            ("pallas", dict(attention_impl="pallas", moe_impl="pallas")),
        ):
            cfg = load_model_config(str(preset), {"num_hidden_layers": 4, **impl})
            graphdef, params, rest = nnx.split(build_model(cfg, dtype="bfloat16", seed=0), nnx.Param, ...)

            def loss_fn(params, ids, segments, graphdef=graphdef, rest=rest):
                out = nnx.merge(graphdef, params, rest)(ids, segment_ids=segments)
                logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
                return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

            step = jax.jit(jax.value_and_grad(loss_fn))
            loss, _ = step(params, ids, segments)
            row[f"{name}_ms"] = 1e3 * timed(step, params, ids, segments, reps=args.reps)
            row[f"{name}_loss"] = float(loss)
        row["speedup"] = row["xla_ms"] / row["pallas_ms"]
        _print_row(row)
        rows.append(row)
    return rows


SECTIONS = {"attention": attention_section, "gmm": gmm_section, "tpu-roofline": tpu_roofline, "model": model_section}
GPU_SECTIONS = ("attention", "gmm", "model")
TUNERS = {"attention": tune_attention, "gmm": tune_gmm}


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _print_row(row) -> None:
    print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "section"), flush=True)


def _table(rows) -> str:
    keys = [k for k in rows[0] if k != "section"]
    for row in rows[1:]:
        keys += [k for k in row if k not in keys and k != "section"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    parser.add_argument("--tune", action="store_true", help="sweep block sizes first and use the fastest")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--json", type=Path, help="write all rows (and the tuned block sizes) here")
    parser.add_argument("--tpu", nargs="+", default=["v5p"], choices=sorted(TPU_CHIPS), help="tpu-roofline chips")
    parser.add_argument(
        "--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768], help="tpu-roofline T"
    )
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    on_gpu = device.platform == "gpu"
    sections = [args.only] if args.only else list(GPU_SECTIONS if on_gpu else ["tpu-roofline"])
    if not on_gpu and set(sections) & set(GPU_SECTIONS):
        print("the attention and gmm sections time the Pallas GPU kernels and need a CUDA GPU", file=sys.stderr)
        return 2
    tuned = {}
    for name in sections if args.tune and on_gpu else []:
        tuned.update(TUNERS[name](args))
    print(f"tuned: {tuned}", flush=True)
    results = {"device": device.device_kind, "jax": jax.__version__, "tuned": {k: repr(v) for k, v in tuned.items()}}
    for name in sections:
        results[name] = SECTIONS[name](args, tuned)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    for name in sections:
        print(f"\n## {name}\n{_table(results[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
