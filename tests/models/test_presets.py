"""Model presets: every shipped YAML parses, the full-size presets have their published parameter counts
(counted on abstract models: shapes only, no memory), bad names and keys fail with clear errors, and the small
presets survive the Hugging Face config round trip."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import yaml

from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig
from openr1_jax.models.params import abstract_model, flat_variables
from openr1_jax.models.presets import PRESET_DIR, list_presets, load_model_config, load_preset

REPO_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"
SMALL = ["tiny-moe", "small-moe", "tiny-dense", "demo-moe", "moe-1b"]


# ----------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def counts(preset: str) -> dict[str, int]:
    """Parameter counts of a preset under the conventions that published figures use.

    main          every parameter of the model proper (embedding, blocks, final norm, output head), no MTP
    on_disk       main + the MTP modules, plus the copies of the embedding and output head that official
                  DeepSeek-V3 checkpoints store again inside each MTP layer (`embed_tokens`, `shared_head.head`)
    active        main minus the routed experts a token does not visit: all non-expert parameters plus
                  `num_experts_per_tok` routed experts in every MoE layer
    active_no_emb active without the input embedding table (a lookup, not compute); the output head stays
    main_no_emb_head / active_no_emb_head   without both the embedding and the output head
    """
    cfg = load_preset(preset)
    sizes = {name: math.prod(var.get_value().shape) for name, var in flat_variables(abstract_model(cfg)).items()}
    main = sum(n for name, n in sizes.items() if not name.startswith("mtp."))
    mtp = sum(n for name, n in sizes.items() if name.startswith("mtp."))
    routed = sum(n for name, n in sizes.items() if ".mlp.experts." in name and not name.startswith("mtp."))
    embed, head = sizes["embed.embedding"], sizes.get("lm_head.kernel", 0)
    active = main - (routed - routed * cfg.num_experts_per_tok // cfg.n_routed_experts if cfg.is_moe else 0)
    return {
        "main": main,
        "on_disk": main + mtp + cfg.num_nextn_predict_layers * (embed + head),
        "active": active,
        "active_no_emb": active - embed,
        "main_no_emb_head": main - embed - head,
        "active_no_emb_head": active - embed - head,
    }


# Tolerances: "exact" for counts read off safetensors; "0.1%"; "rounded" = within half a unit of the figure's
# last published digit (all a figure like "37B" can promise; 0.1% of it would claim digits it does not have);
# "one unit" = within one unit of the last digit, used once and explained below.
V3 = "https://huggingface.co/deepseek-ai/DeepSeek-V3"
V2 = "https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite"
MOONLIGHT = "Moonlight paper, 'Muon is Scalable for LLM Training' (arXiv:2502.16982), model comparison table"
PUBLISHED = [
    # (preset, quantity, published figure, tolerance, source)
    ("deepseek-v3-671b", "main", "671B", "0.1%", f"{V3} README and tech report (arXiv:2412.19437)"),
    # "685B, which includes 671B of the Main Model weights and 14B of the MTP Module weights". Not counted: the
    # ~41M fp8 `weight_scale_inv` values of the official checkpoint (0.006%; scales, not parameters).
    ("deepseek-v3-671b", "on_disk", "685B", "0.1%", f"{V3} README (size of the Hugging Face checkpoint)"),
    # The convention behind DeepSeek's activated figure: the input embedding is left out, the output head kept
    # ("Activation parameters: 36.6B (including 0.9B for the output Head)"). Counting the embedding too gives
    # 37.55B, which would round to 38B, not 37B.
    ("deepseek-v3-671b", "active_no_emb", "36.6B", "0.1%", f"{V3}/blob/main/README_WEIGHTS.md"),
    ("deepseek-v3-671b", "active_no_emb", "37B", "rounded", f"{V3} README and tech report (arXiv:2412.19437)"),
    ("deepseek-v2-lite-16b", "main", "15.7B", "0.1%", f"{V2} README and DeepSeek-V2 paper (arXiv:2405.04434)"),
    # No convention reproduces "2.4B" by rounding: all non-expert parameters give 2.66B, V3's convention (no
    # input embedding) 2.451B, neither embedding nor head 2.24B. V3's convention is the nearest and exceeds the
    # rounding boundary 2.45B by 0.06%, so the published figure is held to one unit of its last digit here;
    # the three-digit figures of the same architecture below (Moonlight paper) pin the count to 0.1%.
    ("deepseek-v2-lite-16b", "active_no_emb", "2.4B", "one unit", f"{V2} README and DeepSeek-V2 paper"),
    ("deepseek-v2-lite-16b", "main_no_emb_head", "15.29B", "0.1%", MOONLIGHT),
    ("deepseek-v2-lite-16b", "active_no_emb_head", "2.24B", "0.1%", MOONLIGHT),
    # The model name's 16B / A3B count every parameter (excluding embedding and head gives 2.24B, i.e. "A2B").
    ("moonlight-16b-a3b", "main", "16B", "rounded", "https://huggingface.co/moonshotai/Moonlight-16B-A3B"),
    ("moonlight-16b-a3b", "active", "3B", "rounded", "https://huggingface.co/moonshotai/Moonlight-16B-A3B"),
    # The paper's figures leave out the embedding and the output head.
    ("moonlight-16b-a3b", "main_no_emb_head", "15.29B", "0.1%", MOONLIGHT),
    # 2.2437B vs 2.24B is 0.17%: three digits cannot promise 0.1% here.
    ("moonlight-16b-a3b", "active_no_emb_head", "2.24B", "rounded", MOONLIGHT),
    # Dense models: the exact totals of their safetensors checkpoints (model.safetensors.index.json metadata).
    ("qwen2.5-1.5b", "main", "1543714304", "exact", "https://huggingface.co/Qwen/Qwen2.5-1.5B"),
    ("qwen2.5-7b", "main", "7615616512", "exact", "https://huggingface.co/Qwen/Qwen2.5-7B"),
    ("llama-3.1-8b", "main", "8030261248", "exact", "https://huggingface.co/meta-llama/Llama-3.1-8B"),
]


def _figure(text: str) -> tuple[float, float]:
    """'36.6B' -> (36.6e9, 0.1e9): the value and one unit of its last published digit."""
    if not text.endswith("B"):
        return float(text), 1.0
    digits = text[:-1]
    decimals = len(digits.partition(".")[2])
    return float(digits) * 1e9, 10.0 ** (9 - decimals)


@pytest.mark.parametrize(
    "preset,quantity,published,tolerance,source", PUBLISHED, ids=[f"{p}-{q}-{f}" for p, q, f, *_ in PUBLISHED]
)
def test_parameter_count_matches_published(preset, quantity, published, tolerance, source):
    ours = counts(preset)[quantity]
    value, unit = _figure(published)
    allowed = {"exact": 0.0, "0.1%": 1e-3 * value, "rounded": unit / 2, "one unit": unit}[tolerance]
    assert abs(ours - value) <= allowed, (
        f"{preset} {quantity}: ours {ours:,} vs published {published} ({source}); "
        f"off by {(ours - value) / value:+.3%}, allowed {tolerance}"
    )


def test_every_full_size_preset_has_a_published_count():
    assert {row[0] for row in PUBLISHED} == set(list_presets()) - set(SMALL)


# ----------------------------------------------------------------------------------------------------------
# Parsing, errors, round trips
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(REPO_PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_yaml_parses(path):
    cfg = load_model_config(path)
    assert isinstance(cfg, ModelConfig)
    assert cfg == load_preset(path.stem) == load_model_config(path.stem)
    cfg.attention_config()  # rope settings and head sizes are consistent
    if cfg.is_moe:
        cfg.moe_config()


def test_preset_dir_lists_every_preset():
    assert PRESET_DIR.is_dir()
    expected = {
        "deepseek-v3-671b",
        "deepseek-v2-lite-16b",
        "moonlight-16b-a3b",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        "llama-3.1-8b",
        *SMALL,
    }
    assert expected <= set(list_presets())
    assert set(list_presets()) == {p.stem for p in REPO_PRESETS.glob("*.yaml")}


def test_unknown_preset_names_it_and_lists_the_available_ones():
    with pytest.raises(UserError, match="'nope'") as err:
        load_preset("nope")
    assert "tiny-moe" in str(err.value)
    with pytest.raises(UserError, match="did you mean tiny-moe"):
        load_model_config("tiny-mo")


def test_misspelled_key_names_the_key_and_the_file(tmp_path):
    data = dict(load_preset("tiny-moe").to_dict())
    data["hiden_size"] = data.pop("hidden_size")
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(UserError) as err:
        load_model_config(path)
    message = str(err.value)
    assert "'hiden_size'" in message and str(path) in message and "did you mean 'hidden_size'" in message


def test_overrides_apply_and_are_validated():
    cfg = load_model_config("tiny-moe", {"num_hidden_layers": 2, "moe_impl": "dense"})
    assert (cfg.num_hidden_layers, cfg.moe_impl) == (2, "dense")
    assert load_preset("tiny-moe").num_hidden_layers == 3
    with pytest.raises(UserError, match=r"'num_expert_per_tok'.*tiny-moe"):
        load_model_config("tiny-moe", {"num_expert_per_tok": 2})
    with pytest.raises(UserError, match=r"overrides of preset 'tiny-moe'.*topk_group"):
        load_model_config("tiny-moe", {"topk_group": 3})


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-5` as a string; the loader reads it as the number meant.
    fields = {k: v for k, v in load_preset("tiny-dense").to_dict().items() if k not in ("rms_norm_eps", "rope_theta")}
    path = tmp_path / "eps.yaml"
    path.write_text(yaml.safe_dump(fields) + "rms_norm_eps: 1e-5\n")
    assert load_model_config(path).rms_norm_eps == 1e-5
    path.write_text(yaml.safe_dump(fields) + "rope_theta: big\n")
    with pytest.raises(UserError, match=r"rope_theta.*must be a number, not 'big'"):
        load_model_config(path)


@pytest.mark.parametrize(
    "text,problem",
    [("vocab_size: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping"), ("", "must be a mapping")],
)
def test_bad_yaml_names_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=problem) as err:
        load_model_config(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("preset", SMALL)
def test_small_presets_round_trip_through_hf_config(preset):
    cfg = load_preset(preset)
    hf = json.loads(json.dumps(cfg.to_hf_config()))  # as written to and read from config.json
    assert ModelConfig.from_hf_config(hf).to_dict() == cfg.to_dict()
