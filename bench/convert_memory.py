"""Peak host memory of the streaming converters on a generated multi-shard DeepSeek-V3-style checkpoint.

    python bench/convert_memory.py [--size-gb 1.2] [--workdir DIR] [--keep]

1. Generates a Hugging Face folder (config.json with model_type deepseek_v3, bf16 safetensors shards of
   ~--shard-mb each, the MTP layer with its copies of the embedding and head) tensor by tensor, never holding
   more than one shard in memory. Names and shapes come from the converters' own tables (`abstract_model` +
   `flat_variables` + `hf_names` + `Layout.hf_shapes`), so they are right by construction; the number of layers
   is picked so the tensors add up to at least --size-gb (1 GB = 10**9 bytes) while no tensor is more than
   a few percent of it.
2. Runs `convert_hf_to_jax` and then `convert_jax_to_hf` (group_bytes --group-mb, output shards of
   --out-shard-mb) each in a fresh child process, and measures that child's peak RSS (its own high-water mark,
   VmHWM, cross-checked by polling the RSS of its process tree every 20 ms). Bare `import openr1_jax, jax` and
   "imports + CPU backend + orbax" children give the fixed interpreter/JAX overhead that every conversion pays
   whatever the checkpoint size; the table shows each peak with and without it ("- base", "r-base": the
   ratio of peak minus that baseline to the checkpoint size). PASS/FAIL judges the whole peak ("ratio").
3. Checks that the round trip gives back the same tensor names, dtypes, shapes and bytes, prints a table and
   exits non-zero if a direction's peak RSS exceeds --goal (25%) of the checkpoint it converts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 10**9
MB = 10**6
_MIB = 1 << 20
_RESULT_MARK = "@@convert_memory@@"

# A small DeepSeek-V3 (MLA, 1 dense + MoE layers, 1 MTP layer); only num_hidden_layers varies with --size-gb.
# The largest tensor is the embedding / head (32768 x 512 bf16 = 33.5 MB), the largest one our side stacks
# is a [48, 512, 384] expert weight (18.9 MB).
BASE_HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 32768,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 384,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 48,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
MIN_LAYERS = 3


# ----------------------------------------------------------------------------------------------------------
# The generated checkpoint
# ----------------------------------------------------------------------------------------------------------
def hf_tensors(hf_config: dict) -> tuple[list[tuple[str, tuple[int, ...], str]], int]:
    """Every HF tensor `(name, shape, dtype, source)` of the model `hf_config` describes, in our parameter order
    (`source` is the tensor whose bytes it repeats, itself unless it is an MTP copy of the embedding or head),
    and the bytes of the parameters on our side (the openr1-jax checkpoint, without the MTP copies)."""
    import numpy as np

    from openr1_jax.convert.names import MTP_SHARED_COPIES, hf_names
    from openr1_jax.models.config import ModelConfig
    from openr1_jax.models.params import abstract_model, flat_variables

    cfg = ModelConfig.from_hf_config(hf_config)
    L = cfg.num_hidden_layers
    tensors: list[tuple[str, tuple[int, ...], str, str]] = []
    ours = 0
    for path, var in flat_variables(abstract_model(cfg)).items():
        shape = tuple(var.get_value().shape)
        # Official DeepSeek-V3 checkpoints keep the router's correction bias in float32.
        dtype = "float32" if path.endswith("e_score_correction_bias") else "bfloat16"
        ours += math.prod(shape) * np.dtype(_np_dtype(dtype)).itemsize
        names, layout = hf_names(path, shape, L)
        tensors += [(n, s, dtype, n) for n, s in zip(names, layout.hf_shapes(shape))]
        if path in ("embed.embedding", "lm_head.kernel"):
            # ... and repeat the embedding and the head (same bytes) in each MTP layer.
            copy = MTP_SHARED_COPIES[0] if path == "embed.embedding" else MTP_SHARED_COPIES[1]
            hf_shape = layout.hf_shapes(shape)[0]
            for k in range(cfg.num_nextn_predict_layers):
                tensors.append((f"model.layers.{L + k}.{copy}", hf_shape, dtype, names[0]))
    return tensors, ours


def _np_dtype(name: str):
    import ml_dtypes
    import numpy as np

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _nbytes(tensors) -> int:
    import numpy as np

    return sum(math.prod(s) * np.dtype(_np_dtype(d)).itemsize for _, s, d, _ in tensors)


def sized_hf_config(size_bytes: int) -> dict:
    """BASE_HF_CONFIG with the fewest layers whose tensors add up to at least `size_bytes`."""
    sizes = {}
    for layers in (MIN_LAYERS, MIN_LAYERS + 1):
        sizes[layers] = _nbytes(hf_tensors({**BASE_HF_CONFIG, "num_hidden_layers": layers})[0])
    per_layer = sizes[MIN_LAYERS + 1] - sizes[MIN_LAYERS]
    layers = MIN_LAYERS + max(0, math.ceil((size_bytes - sizes[MIN_LAYERS]) / per_layer))
    return {**BASE_HF_CONFIG, "num_hidden_layers": layers}


def generate_hf_checkpoint(out_dir: Path, size_bytes: int, shard_bytes: int, seed: int = 0) -> dict:
    """Write a DeepSeek-V3-style Hugging Face folder of at least `size_bytes`, one tensor at a time.

    Values: a bf16 pool of N(0, 0.02) (norm scales 1 + N(0, 0.02)) of a prime length, each tensor a tile of it at
    its own random offset, so every tensor (and every expert of a stacked weight) has different bytes."""
    import numpy as np

    from openr1_jax.convert.safetensors_io import ShardedSafetensorsWriter

    hf_config = sized_hf_config(size_bytes)
    tensors, ours_bytes = hf_tensors(hf_config)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1_000_003, dtype=np.float32) * 0.02).astype(_np_dtype("bfloat16"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    largest = 0
    starts: dict[str, int] = {}
    with ShardedSafetensorsWriter(out_dir, max_shard_bytes=shard_bytes) as writer:
        for name, shape, dtype, source in tensors:
            start = starts.setdefault(source, int(rng.integers(len(pool))))
            array = np.resize(np.roll(pool, -start), shape).astype(_np_dtype(dtype))
            if name.endswith("norm.weight"):
                array += 1
            writer.add(name, array)
            largest = max(largest, array.nbytes)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    return {
        "hf_bytes": index["metadata"]["total_size"],
        "ours_bytes": ours_bytes,
        "tensors": len(tensors),
        "shards": len(set(index["weight_map"].values())),
        "largest_tensor": largest,
        "num_hidden_layers": hf_config["num_hidden_layers"],
    }


def compare_hf_folders(a: Path, b: Path, every: int = 1) -> int:
    """Raise AssertionError unless both folders hold the same tensor names, and (for every `every`-th name in
    sorted order) the same dtype, shape and bytes. Returns the number of tensors whose bytes were compared."""
    from openr1_jax.convert.safetensors_io import SafetensorsReader

    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        names_a, names_b = ra.names(), rb.names()
        if names_a != names_b:
            only_a, only_b = sorted(set(names_a) - set(names_b)), sorted(set(names_b) - set(names_a))
            raise AssertionError(f"tensor names differ: only in {a}: {only_a[:3]}, only in {b}: {only_b[:3]}")
        compared = 0
        for name in names_a[::every]:
            x, y = ra.get(name), rb.get(name)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                raise AssertionError(f"tensor {name} differs: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            compared += 1
    return compared


# ----------------------------------------------------------------------------------------------------------
# Children and their memory
# ----------------------------------------------------------------------------------------------------------
def _own_peak_rss() -> int:
    """This process's peak RSS in bytes. On Linux `VmHWM` of /proc/self/status: `ru_maxrss` is no good there,
    because exec() folds the parent's high-water mark into it (a child started by a 400 MB parent reports
    >= 400 MB however little it uses)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def _child_main(mode: str, args: list[str]) -> None:
    """Entry of a measured child: do one thing, then print its own peak RSS."""
    t0 = time.perf_counter()
    import jax

    import openr1_jax  # noqa: F401

    if mode != "import":
        from openr1_jax.convert import checkpoint
        from openr1_jax.convert.hf_to_jax import convert_hf_to_jax
        from openr1_jax.convert.jax_to_hf import convert_jax_to_hf

        jax.devices()
        checkpoint._ocp()
    t1 = time.perf_counter()
    if mode == "hf-to-jax":
        src, dst, group_bytes = args
        convert_hf_to_jax(src, dst, group_bytes=int(group_bytes), progress=False)
    elif mode == "jax-to-hf":
        src, dst, group_bytes, shard_bytes = args
        convert_jax_to_hf(src, dst, group_bytes=int(group_bytes), max_shard_bytes=int(shard_bytes), progress=False)
    t2 = time.perf_counter()
    result = {
        "peak_rss": _own_peak_rss(),
        "setup_s": t1 - t0,
        "convert_s": t2 - t1,
    }
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that exits between the listing and the read
            total += p.memory_info().rss
    return total


def run_child(mode: str, args: list[str], log_dir: Path, timeout_s: float = 900) -> dict:
    """Run `_child_main(mode, args)` in a fresh interpreter; its peak RSS (self-reported and polled) and times."""
    import psutil

    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{mode}.out", log_dir / f"{mode}.err"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args]
    sampled = 0
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            with contextlib.suppress(psutil.Error):
                sampled = max(sampled, _tree_rss(proc))
            if time.perf_counter() - t0 > timeout_s:
                popen.kill()
                popen.wait()
                raise RuntimeError(f"{mode} child ran past {timeout_s:.0f}s; see {err_path}")
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    stdout = out_path.read_text()
    lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if popen.returncode != 0 or not lines:
        raise RuntimeError(
            f"{mode} child failed (exit {popen.returncode}):\n{stdout[-2000:]}\n{err_path.read_text()[-4000:]}"
        )
    result = json.loads(lines[-1][len(_RESULT_MARK) :])
    result["sampled_rss"] = sampled
    result["wall_s"] = wall
    result["peak"] = max(result["peak_rss"], sampled)
    return result


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------
def run_benchmark(
    size_gb: float = 1.2,
    workdir: str | Path | None = None,
    *,
    keep: bool = False,
    shard_mb: float = 200,
    group_mb: float = 32,
    out_shard_mb: float | None = None,
    goal: float = 0.25,
    verify_every: int = 1,
    report=print,
) -> dict:
    """Generate, convert both ways in children, verify, report. Returns the numbers (and, with keep, the paths)."""
    created = workdir is None
    work = Path(tempfile.mkdtemp(prefix="convert_memory_")) if created else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    hf_in, ckpt_dir, hf_out, logs = work / "hf", work / "ckpt", work / "hf_out", work / "logs"
    for path in (hf_in, ckpt_dir, hf_out):
        if path.exists():
            raise FileExistsError(f"{path} exists; give an empty --workdir")
    group_bytes = int(group_mb * MB)
    out_shard_bytes = int((out_shard_mb if out_shard_mb is not None else shard_mb) * MB)
    results: dict = {"workdir": str(work), "hf_in": str(hf_in), "ckpt": str(ckpt_dir), "hf_out": str(hf_out)}
    try:
        t0 = time.perf_counter()
        gen = generate_hf_checkpoint(hf_in, int(size_gb * GB), int(shard_mb * MB))
        results["generate_s"] = time.perf_counter() - t0
        results.update(gen)
        report(
            f"checkpoint: {gen['hf_bytes'] / GB:.3f} GB in {gen['shards']} shards, {gen['tensors']} tensors "
            f"(largest {gen['largest_tensor'] / MB:.1f} MB), {gen['num_hidden_layers']} layers + 1 MTP; "
            f"openr1-jax side {gen['ours_bytes'] / GB:.3f} GB; generated in {results['generate_s']:.1f}s"
        )
        results["baseline_import"] = run_child("import", [], logs)
        results["baseline_setup"] = run_child("setup", [], logs)
        results["hf-to-jax"] = run_child("hf-to-jax", [str(hf_in), str(ckpt_dir), str(group_bytes)], logs)
        results["jax-to-hf"] = run_child(
            "jax-to-hf", [str(ckpt_dir), str(hf_out), str(group_bytes), str(out_shard_bytes)], logs
        )
        t0 = time.perf_counter()
        results["verified_tensors"] = compare_hf_folders(hf_in, hf_out, every=verify_every)
        results["verify_s"] = time.perf_counter() - t0

        sizes = {"hf-to-jax": gen["hf_bytes"], "jax-to-hf": gen["ours_bytes"]}
        base = results["baseline_setup"]["peak"]
        rows = [
            ("import openr1_jax, jax", results["baseline_import"], None),
            ("+ converters, CPU backend, orbax", results["baseline_setup"], None),
            (f"hf-to-jax (group {group_mb:g} MB)", results["hf-to-jax"], sizes["hf-to-jax"]),
            (f"jax-to-hf (group {group_mb:g} MB, shard {out_shard_bytes / MB:g} MB)", results["jax-to-hf"],
             sizes["jax-to-hf"]),
        ]  # fmt: skip
        report(
            f"{'child':<44} {'input GB':>8} {'peak MiB':>9} {'polled':>7} {'- base':>7} {'ratio':>6} {'r-base':>6} "
            f"{'conv s':>7} {'wall s':>7}  verdict"
        )
        ok = True
        for label, r, size in rows:
            if size is None:
                report(
                    f"{label:<44} {'':>8} {r['peak'] / _MIB:9.0f} {r['sampled_rss'] / _MIB:7.0f} {'':>7} {'':>6} "
                    f"{'':>6} {'':>7} {r['wall_s']:7.1f}"
                )
                continue
            ratio = r["peak"] / size
            r["ratio"] = ratio
            r["ratio_above_base"] = (r["peak"] - base) / size
            passed = ratio < goal
            ok &= passed
            report(
                f"{label:<44} {size / GB:8.3f} {r['peak'] / _MIB:9.0f} {r['sampled_rss'] / _MIB:7.0f} "
                f"{(r['peak'] - base) / _MIB:7.0f} {ratio:6.3f} {r['ratio_above_base']:6.3f} "
                f"{r['convert_s']:7.1f} {r['wall_s']:7.1f}  "
                f"{'PASS' if passed else 'FAIL'} (goal < {goal:.2f})"
            )
        report(
            f"round trip: {results['verified_tensors']} of {gen['tensors']} tensors byte-identical, names identical "
            f"({results['verify_s']:.1f}s)"
        )
        results["passed"] = ok
        return results
    finally:
        if not keep:
            for path in (hf_in, ckpt_dir, hf_out, logs):
                shutil.rmtree(path, ignore_errors=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child_main(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size to generate, 10**9 bytes")
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    parser.add_argument("--shard-mb", type=float, default=200, help="shard size of the generated HF folder")
    parser.add_argument("--out-shard-mb", type=float, default=None, help="jax-to-hf max shard size (default: same)")
    parser.add_argument("--group-mb", type=float, default=32, help="group_bytes of both converters")
    parser.add_argument("--goal", type=float, default=0.25, help="largest allowed peak RSS / checkpoint size")
    args = parser.parse_args(argv)
    results = run_benchmark(
        args.size_gb,
        args.workdir,
        keep=args.keep,
        shard_mb=args.shard_mb,
        group_mb=args.group_mb,
        out_shard_mb=args.out_shard_mb,
        goal=args.goal,
    )
    if args.keep:
        print(f"kept {results['workdir']}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
