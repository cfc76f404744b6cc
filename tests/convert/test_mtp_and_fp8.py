"""Official-format DeepSeek-V3 folders (MTP layer `num_hidden_layers`, fp8 weights with 128x128 block scales)
against references we did not write: transformers for the main model, and an independent float64 numpy
implementation of the MTP module (V3 report, section 2.2) that reads the raw Hugging Face tensors.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from openr1_jax.convert import checkpoint as ckpt
from openr1_jax.convert.fp8 import quantize_fp8
from openr1_jax.convert.hf_to_jax import convert_hf_to_jax
from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
from openr1_jax.convert.names import hf_names
from openr1_jax.convert.safetensors_io import INDEX_FILE, SafetensorsReader, save_safetensors
from openr1_jax.models.load import load_model
from tests.hf_models import hf_config, random_hf_model, torch_logits

TOL = 1e-4
# Two main layers (dense, then MoE) plus the MTP layer (index 2, MoE). rms_norm_eps differs from the latent
# norms' 1e-6 so that using the wrong eps shows.
SMALL = dict(
    num_hidden_layers=2,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    num_nextn_predict_layers=1,
    rms_norm_eps=1e-5,
)
# fp8: sizes that are not multiples of 128 and exceed it, so weights have several blocks and ragged edges:
# experts [136, 160] / [160, 136], dense MLP [200, 160], q_a_proj [136, 160], q_b_proj [48, 136].
FP8_SIZES = dict(hidden_size=160, moe_intermediate_size=136, intermediate_size=200, q_lora_rank=136, vocab_size=96)
BLOCK = 128


# ----------------------------------------------------------------------------------------------------------------
# Building an official-format folder


def _random_like(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random values in the style of tests/hf_models.py: norms near 1, router bias spread, weights small."""
    if "norm" in name:
        value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif "e_score_correction_bias" in name:
        value = 0.3 * rng.standard_normal(shape)
    else:
        value = 0.1 * rng.standard_normal(shape)
    return value.astype(dtype)


def _is_quantised(name: str, array: np.ndarray) -> bool:
    """The 2-D linear weights of attention, MLPs and experts (not embeddings, heads, norms, router gate)."""
    return (
        name.startswith("model.layers.")
        and array.ndim == 2
        and (".self_attn." in name or ".mlp." in name)
        and not name.endswith(".mlp.gate.weight")
    )


def _block_dequantize(weight: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """Independent dequantisation: an explicit loop over every 128x128 block, edge blocks partial."""
    rows, cols = weight.shape
    grid = (-(-rows // BLOCK), -(-cols // BLOCK))
    assert scale_inv.shape == grid, (scale_inv.shape, grid)
    out = np.full(weight.shape, np.nan, np.float32)
    for i, j in itertools.product(range(grid[0]), range(grid[1])):
        r, c = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
        out[r, c] = weight[r, c].astype(np.float32) * np.float32(scale_inv[i, j])
    assert not np.isnan(out).any()
    return out


def build_official_folder(folder: Path, *, fp8: bool = False, seed: int = 0, **overrides):
    """save_pretrained a random transformers DeepSeek-V3, then add the MTP layer the way official checkpoints
    store it (an extra shard + the index), optionally with fp8 linear weights.

    Returns (torch model, config, values): `values` maps every HF tensor name except `*_scale_inv` to the
    float32 value it stands for (fp8 tensors dequantised by `_block_dequantize`).
    """
    cfg = hf_config("deepseek_v3", **{**SMALL, **overrides})
    model = random_hf_model(cfg, seed)
    model.save_pretrained(folder)
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    assert cfg.first_k_dense_replace <= L - 1, "the last main layer must be a MoE layer (the MTP template)"

    index_path = folder / INDEX_FILE
    with SafetensorsReader(folder) as reader:
        shard_of = {name: reader.shard(name) for name in reader.names()}
        tensors = {name: reader.get(name) for name in reader.names()}
    mtp_shard = "model-mtp.safetensors"
    if not index_path.exists():  # single file: move it into index form
        (folder / "model.safetensors").unlink()
        shard_of = dict.fromkeys(shard_of, "model-00001-of-00002.safetensors")
        mtp_shard = "model-00002-of-00002.safetensors"
    assert not any(n.startswith(f"model.layers.{L}.") for n in tensors), (
        "transformers should not have saved an MTP layer"
    )

    rng = np.random.default_rng(seed + 1000)
    mtp, prefix, template = {}, f"model.layers.{L}.", f"model.layers.{L - 1}."
    for name, array in tensors.items():  # own attention, MoE and norms, shaped like a normal MoE layer
        if name.startswith(template):
            mtp[prefix + name[len(template) :]] = _random_like(rng, name, array.shape, array.dtype)
    dtype = tensors["model.embed_tokens.weight"].dtype
    for name, shape in [
        ("enorm.weight", (D,)),
        ("hnorm.weight", (D,)),
        ("eh_proj.weight", (D, 2 * D)),
        ("shared_head.norm.weight", (D,)),
    ]:
        mtp[prefix + name] = _random_like(rng, name, shape, dtype)
    mtp[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    mtp[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    tensors.update(mtp)
    shard_of.update(dict.fromkeys(mtp, mtp_shard))

    values = {name: array.astype(np.float32) for name, array in tensors.items()}
    stored = {}
    for name, array in tensors.items():
        if fp8 and _is_quantised(name, array):
            weight, scale_inv = quantize_fp8(array)
            stored[name], stored[name + "_scale_inv"] = weight, scale_inv
            shard_of[name + "_scale_inv"] = shard_of[name]
            values[name] = _block_dequantize(weight, scale_inv)
        else:
            stored[name] = array

    for shard in sorted(set(shard_of.values())):
        save_safetensors(folder / shard, {n: a for n, a in stored.items() if shard_of[n] == shard})
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in stored.values())},
        "weight_map": dict(sorted(shard_of.items())),
    }
    index_path.write_text(json.dumps(index, indent=2) + "\n")

    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model, cfg, values


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference of one MTP module


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(x, W, prefix):
    return (_silu(x @ W(prefix + "gate_proj.weight").T) * (x @ W(prefix + "up_proj.weight").T)) @ W(
        prefix + "down_proj.weight"
    ).T


def _rotate_interleaved(x, cos, sin):
    """Rotate the complex pairs (x[2i], x[2i+1]) by the angle, keeping the interleaved layout."""
    out = np.empty_like(x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def _mla(x, W, p, cfg):
    B, T, _ = x.shape
    N, Hn, R, O, K = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    c_q = _rms(x @ W(p + "q_a_proj.weight").T, W(p + "q_a_layernorm.weight"), 1e-6)
    q = (c_q @ W(p + "q_b_proj.weight").T).reshape(B, T, N, Hn + R)
    ckv = x @ W(p + "kv_a_proj_with_mqa.weight").T  # [B, T, K + R]
    c_kv, k_pe = _rms(ckv[..., :K], W(p + "kv_a_layernorm.weight"), 1e-6), ckv[..., K:]
    kv = (c_kv @ W(p + "kv_b_proj.weight").T).reshape(B, T, N, Hn + O)
    k_nope, v = kv[..., :Hn], kv[..., Hn:]

    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (np.arange(0, R, 2, dtype=np.float64) / R)
    angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq  # [T, R/2]
    cos, sin = np.cos(angles), np.sin(angles)
    q_pe = _rotate_interleaved(q[..., Hn:], cos[None, :, None], sin[None, :, None])
    k_pe = _rotate_interleaved(k_pe, cos[None], sin[None])  # one key for all heads

    scores = np.einsum("btnh,bsnh->bnts", q[..., :Hn], k_nope) + np.einsum("btnh,bsh->bnts", q_pe, k_pe)
    scores = scores * (Hn + R) ** -0.5
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsno->btno", probs, v).reshape(B, T, N * O)
    return out @ W(p + "o_proj.weight").T


def _moe(x, W, p, cfg):
    B, T, D = x.shape
    E, G = cfg.n_routed_experts, cfg.n_group
    xt = x.reshape(B * T, D)
    scores = 1.0 / (1.0 + np.exp(-(xt @ W(p + "mlp.gate.weight").T)))  # [T, E]
    choice = scores + W(p + "mlp.gate.e_score_correction_bias")  # selection only
    out = np.zeros_like(xt)
    for t in range(B * T):
        groups = choice[t].reshape(G, E // G)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(axis=1)  # sum of each group's best two
        kept = np.full(E, -np.inf)
        for g in np.argsort(-group_score)[: cfg.topk_group]:
            kept[g * (E // G) : (g + 1) * (E // G)] = groups[g]
        top = np.argsort(-kept)[: cfg.num_experts_per_tok]
        gates = scores[t, top] / scores[t, top].sum() * cfg.routed_scaling_factor
        for e, gate in zip(top, gates):
            out[t] += gate * _swiglu(xt[t], W, f"{p}mlp.experts.{e}.")
    out += _swiglu(xt, W, p + "mlp.shared_experts.")
    return out.reshape(B, T, D)


def reference_mtp_logits(W, cfg, ids: np.ndarray, h0: np.ndarray) -> np.ndarray:
    """MTP depth 1 from the raw HF tensors `W(name)` (float64): position i sees h0_i and Emb(t_{i+1})."""
    p, eps = f"model.layers.{cfg.num_hidden_layers}.", cfg.rms_norm_eps
    next_ids = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)  # last position: token 0
    emb_next = W(p + "embed_tokens.weight")[next_ids]
    joined = np.concatenate([_rms(emb_next, W(p + "enorm.weight"), eps), _rms(h0, W(p + "hnorm.weight"), eps)], -1)
    h = joined @ W(p + "eh_proj.weight").T
    h = h + _mla(_rms(h, W(p + "input_layernorm.weight"), eps), W, p + "self_attn.", cfg)
    h = h + _moe(_rms(h, W(p + "post_attention_layernorm.weight"), eps), W, p, cfg)
    return _rms(h, W(p + "shared_head.norm.weight"), eps) @ W(p + "shared_head.head.weight").T


def torch_final_hidden(model, ids: np.ndarray) -> np.ndarray:
    """The main model's final normed hidden state, from transformers in float64 (the grouped-matmul experts
    kernel refuses float64, so the experts run eagerly)."""
    model = copy.deepcopy(model).double()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        return model.model(torch.as_tensor(ids)).last_hidden_state.numpy()


def _max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (2, 9))


# ----------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A float32 official-format folder with the MTP layer, and its openr1-jax checkpoint."""
    root = tmp_path_factory.mktemp("official")
    model, cfg, _ = build_official_folder(root / "hf")
    convert_hf_to_jax(root / "hf", root / "ckpt", progress=False)
    return root, model, cfg


@pytest.fixture(scope="module")
def official_fp8(tmp_path_factory):
    """The same with fp8 linear weights, ragged block grids, its float32 checkpoint, and the transformers model
    loaded with the (independently) dequantised weights."""
    root = tmp_path_factory.mktemp("official_fp8")
    _, cfg, values = build_official_folder(root / "hf", fp8=True, seed=1, **FP8_SIZES)
    convert_hf_to_jax(root / "hf", root / "ckpt", dtype="float32", progress=False)

    L = cfg.num_hidden_layers
    main = {n: v for n, v in values.items() if not n.startswith(f"model.layers.{L}.")}
    (root / "dequantised").mkdir()
    save_safetensors(root / "dequantised" / "model.safetensors", main)
    config = json.loads((root / "hf" / "config.json").read_text())
    del config["quantization_config"], config["num_nextn_predict_layers"]
    (root / "dequantised" / "config.json").write_text(json.dumps(config))
    ref_model = transformers.DeepseekV3ForCausalLM.from_pretrained(root / "dequantised", dtype=torch.float32).eval()
    loaded = ref_model.state_dict()["model.layers.1.mlp.experts.down_proj"][3]
    assert torch.equal(loaded, torch.from_numpy(main["model.layers.1.mlp.experts.3.down_proj.weight"]))
    return root, ref_model, cfg, values


def _check_logits(source, ids, want_logits, want_mtp, label):
    out = load_model(source, dtype="float32")(jnp.asarray(ids))
    assert len(out.mtp_logits) == 1
    main_err, mtp_err = _max_err(out.logits, want_logits), _max_err(out.mtp_logits[0], want_mtp)
    print(f"{label}: main logits max|diff| {main_err:.2e}, MTP logits max|diff| {mtp_err:.2e}")
    assert main_err <= TOL, f"{label}: main logits differ by {main_err}"
    assert mtp_err <= TOL, f"{label}: MTP logits differ by {mtp_err}"


@pytest.mark.parametrize("source", ["hf", "ckpt"])
def test_mtp_logits_match_independent_reference(official, source):
    root, model, cfg = official
    ids = _ids(cfg.vocab_size)
    with SafetensorsReader(root / "hf") as reader:
        raw = {name: reader.get(name).astype(np.float64) for name in reader.names()}
    want_mtp = reference_mtp_logits(raw.__getitem__, cfg, ids, torch_final_hidden(model, ids))
    want_logits = torch_logits(model, ids)
    # The comparison has teeth: the MTP head predicts something else than the main head.
    assert _max_err(want_mtp, want_logits) > 100 * TOL
    _check_logits(root / source, ids, want_logits, want_mtp, source)


def test_fp8_folder_has_ragged_blocks(official_fp8):
    root, _, cfg, _ = official_fp8
    L = cfg.num_hidden_layers
    with SafetensorsReader(root / "hf") as reader:
        fp8_names = [n for n in reader.names() if reader.dtype(n) == "F8_E4M3"]
        grids = {reader.shape(n + "_scale_inv") for n in fp8_names}
        shapes = {reader.shape(n) for n in fp8_names}
        assert all(reader.dtype(n + "_scale_inv") == "F32" for n in fp8_names)
        for unquantised in ("model.embed_tokens.weight", "lm_head.weight", f"model.layers.{L}.mlp.gate.weight"):
            assert reader.dtype(unquantised) == "F32", unquantised
    assert any(n.startswith(f"model.layers.{L}.mlp.experts.") for n in fp8_names)
    assert any(f"model.layers.{L}.self_attn." in n for n in fp8_names)
    assert any(r % BLOCK and c % BLOCK and max(r, c) > BLOCK for r, c in shapes)
    assert {(2, 2), (1, 2), (2, 1)} <= grids


def test_fp8_converted_params_equal_blockwise_dequantisation(official_fp8):
    root, _, cfg, values = official_fp8
    L = cfg.num_hidden_layers
    meta = ckpt.param_metadata(root / "ckpt")
    params = ckpt.load_params(root / "ckpt", dict.fromkeys(meta))
    covered = set()
    for path, got in params.items():
        assert got.dtype == np.float32, path
        names, layout = hf_names(path, got.shape, L)
        hf = [values[n] for n in names]
        if layout.kind == "experts":  # HF: one [out, in] per expert; ours: stacked [E, in, out]
            want = np.stack([w.T for w in hf])
        elif layout.kind == "linear":  # HF [out, in]; ours: [in..., out...]
            want = hf[0].T.reshape(got.shape)
        else:
            want = hf[0].reshape(got.shape)
        np.testing.assert_array_equal(got, want, err_msg=path)
        covered.update(names)
    copies = {f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight"}
    assert covered == set(values) - copies


def _fp8_logits_check(official_fp8, source):
    root, ref_model, cfg, values = official_fp8
    ids = _ids(cfg.vocab_size, seed=1)
    h0 = torch_final_hidden(ref_model, ids)
    want_mtp = reference_mtp_logits(lambda n: values[n].astype(np.float64), cfg, ids, h0)
    _check_logits(root / source, ids, torch_logits(ref_model, ids), want_mtp, f"fp8 {source}")


def test_fp8_checkpoint_logits_match_dequantised_reference(official_fp8):
    _fp8_logits_check(official_fp8, "ckpt")


def test_fp8_folder_logits_match_dequantised_reference(official_fp8):
    _fp8_logits_check(official_fp8, "hf")


def test_round_trip_with_mtp_is_bitwise(official, tmp_path):
    root, _, cfg = official
    L = cfg.num_hidden_layers
    convert_jax_to_hf(root / "ckpt", tmp_path / "back", progress=False)
    with SafetensorsReader(root / "hf") as before, SafetensorsReader(tmp_path / "back") as after:
        assert after.names() == before.names()
        assert f"model.layers.{L}.embed_tokens.weight" in after.names()
        assert f"model.layers.{L}.shared_head.head.weight" in after.names()
        for name in before.names():
            a, b = before.get(name), after.get(name)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), name
            assert a.tobytes() == b.tobytes(), name


def test_official_folder_is_well_formed(official, official_fp8):
    """The helper's own output: an index over two shards, the MTP copies equal the main tensors."""
    for root, fp8 in ((official[0], False), (official_fp8[0], True)):
        index = json.loads((root / "hf" / INDEX_FILE).read_text())
        assert not (root / "hf" / "model.safetensors").exists()
        assert len(set(index["weight_map"].values())) == 2
        config = json.loads((root / "hf" / "config.json").read_text())
        assert config["num_nextn_predict_layers"] == 1
        with SafetensorsReader(root / "hf") as reader:
            assert reader.names() == sorted(index["weight_map"])
            for copy_name, main_name in (("embed_tokens", "model.embed_tokens"), ("shared_head.head", "lm_head")):
                assert np.array_equal(
                    reader.get(f"model.layers.2.{copy_name}.weight"), reader.get(main_name + ".weight")
                )
            D = reader.shape("model.norm.weight")[0]
            assert reader.shape("model.layers.2.eh_proj.weight") == (D, 2 * D)
            assert (reader.dtype("model.layers.2.self_attn.q_a_proj.weight") == "F8_E4M3") == fp8
            assert reader.dtype("model.layers.2.eh_proj.weight") == "F32"
