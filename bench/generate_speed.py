"""Decode speed: our engine vs transformers' `generate`, same converted weights, same prompts, one script.

    python bench/generate_speed.py [--preset tiny-moe] [--batch 16] [--prompt-len 32] [--new-tokens 256]
                                   [--dtype float32|bfloat16] [--repeats N] [--torch-threads N] [--no-torch]
                                   [--json OUT]

1. Builds our model from the preset (`build_model(cfg, seed=0)`), saves it as an openr1-jax checkpoint, exports
   that with `convert_jax_to_hf` and loads the export with `transformers.AutoModelForCausalLM` (its default
   implementations, KV cache on), so both sides hold the same weights.
2. --batch random prompts of --prompt-len tokens (numpy seed 0); both sides decode greedily exactly
   --new-tokens tokens per row (EOS ignored), ours with `Engine.generate`, transformers with
   `model.generate(do_sample=False, min_new_tokens=max_new_tokens)`. The greedy tokens must agree on the first
   16 positions of every row (float32), which shows both sides compute the same thing.
3. Each side runs once untimed (ours: compilation), then --repeats timed calls, alternating ours and
   transformers, and the best call of each counts (a burst of other load on the machine hurts neither side
   alone). Decode tokens/s = batch * new tokens / wall time of a whole `generate` call (prefill included).
4. The cache: our bytes per token and layer against a full per-head K/V cache of the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def build(preset: str, dtype: str, work: Path):
    from openr1_jax.convert.checkpoint import save_model
    from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_model_config

    cfg = load_model_config(preset)
    model = build_model(cfg, dtype=dtype, param_dtype="float32", seed=0)
    save_model(model, work / "ckpt")
    convert_jax_to_hf(work / "ckpt", work / "hf", progress=False)
    return cfg, model, work / "hf"


def ours(model, prompts: list[list[int]], new_tokens: int) -> tuple[Callable[[], list[list[int]]], dict]:
    """A call that generates with our engine (compiled by a first call here), and the cache's sizes."""
    from transformers import AutoTokenizer

    from openr1_jax.data.embedded import TOKENIZER_DIR
    from openr1_jax.generate import Engine, SamplingParams
    from openr1_jax.models.kv_cache import (
        cache_bytes_per_token_per_layer,
        full_kv_values_per_token_per_layer,
        values_per_token_per_layer,
    )

    engine = Engine(model, AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), max_batch_size=len(prompts))
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, logprobs=False)

    def generate() -> list[list[int]]:
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]

    generate()  # compile
    cfg = model.config
    cache_bytes = cache_bytes_per_token_per_layer(model.init_cache(1, 1)[0])
    itemsize = np.dtype(model.dtype).itemsize
    cache = {
        "values_per_token_per_layer": values_per_token_per_layer(cfg),
        "full_kv_values_per_token_per_layer": full_kv_values_per_token_per_layer(cfg),
        "bytes_per_token_per_layer": cache_bytes,
        "full_kv_bytes_per_token_per_layer": full_kv_values_per_token_per_layer(cfg) * itemsize,
        "ratio": full_kv_values_per_token_per_layer(cfg) / values_per_token_per_layer(cfg),
    }
    return generate, cache


def transformers_side(hf_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: str, threads: int):
    """A call that generates with transformers (warmed up by a first call here)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kw = dict(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )

    def generate() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return out[:, ids.shape[1] :].tolist()

    generate()  # warm up
    return generate


def timed(fn: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, hf_dir = build(args.preset, args.dtype, Path(tmp))
        # Ids 0-9 are the embedded tokenizer's specials (pad, eos, ...): prompts use ordinary tokens.
        prompts = rng.integers(10, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
        our_generate, cache = ours(model, prompts, args.new_tokens)
        sides = {"ours": our_generate}
        if not args.no_torch:
            sides["transformers"] = transformers_side(hf_dir, prompts, args.new_tokens, args.dtype, args.torch_threads)
        tokens, seconds = {}, {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, generate in sides.items():
                tokens[name], s = timed(generate)
                seconds[name].append(s)
        our_s = min(seconds["ours"])
        total = args.batch * args.new_tokens
        result = {
            "preset": args.preset,
            "dtype": args.dtype,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "ours_s": our_s,
            "ours_s_all": seconds["ours"],
            "ours_tokens_per_s": total / our_s,
            "cache": cache,
            "machine": f"{os.cpu_count()} CPU cores",
        }
        if not args.no_torch:
            hf_s = min(seconds["transformers"])
            agree = all(a[:16] == b[:16] for a, b in zip(tokens["ours"], tokens["transformers"], strict=True))
            result |= {
                "transformers_s": hf_s,
                "transformers_s_all": seconds["transformers"],
                "transformers_tokens_per_s": total / hf_s,
                "speedup": hf_s / our_s,
                "torch_threads": args.torch_threads,
                "first_16_tokens_agree": agree,
            }
    return result


def report(r: dict) -> None:
    print(
        f"{r['preset']} {r['dtype']}, batch {r['batch']} x {r['new_tokens']} new tokens ({r['machine']}), "
        f"best of {r['repeats']} calls each"
    )
    print(f"  ours:         {r['ours_tokens_per_s']:10.0f} tokens/s  ({r['ours_s']:.2f} s)")
    if "speedup" in r:
        print(f"  transformers: {r['transformers_tokens_per_s']:10.0f} tokens/s  ({r['transformers_s']:.2f} s)")
        print(f"  speedup: {r['speedup']:.1f}x; greedy tokens agree on the first 16: {r['first_16_tokens_agree']}")
    c = r["cache"]
    print(
        f"  cache per token and layer: {c['values_per_token_per_layer']} values ({c['bytes_per_token_per_layer']} B)"
        f" vs full K/V {c['full_kv_values_per_token_per_layer']} ({c['full_kv_bytes_per_token_per_layer']} B):"
        f" {c['ratio']:.1f}x smaller"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (best kept)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-torch", action="store_true", help="only our engine (e.g. on a GPU machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    r = run(args)
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r.get("first_16_tokens_agree", True) else 1


if __name__ == "__main__":
    sys.exit(main())
