"""SFT configs: every shipped YAML parses and validates, the Open-R1 distill recipe runs on a tiny model, and
bad input gets one clear sentence, exit code 2 and no output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from openr1_jax.cli import main
from openr1_jax.data.embedded import TOKENIZER_DIR
from openr1_jax.models.presets import config_dir, list_presets, load_model_config
from openr1_jax.train.config import list_recipes, load_sft_config
from openr1_jax.train.sft import run_sft
from tests.hf_models import save_random_model

CONFIGS = config_dir("models").parent


def test_every_yaml_in_configs_parses_and_validates():
    """Every shipped YAML loads with the loader of its kind (model presets and every job's recipes)."""
    from openr1_jax.ablate import load_sweep_config
    from openr1_jax.cli import JOBS, _job
    from openr1_jax.plan import load_preset

    others = {"ablate": load_sweep_config, "plan": lambda path, overrides: load_preset(Path(path).stem)}
    yamls = sorted(CONFIGS.rglob("*.yaml"))
    kinds = {p.parent.name for p in yamls}
    known = {"models", *JOBS, *others}
    assert kinds <= known, f"configs/{kinds - known} has no loader"
    assert len(list_presets()) >= 9 and "default" in list_recipes()
    for name in list_presets():
        load_model_config(name)
    for path in yamls:
        kind = path.parent.name
        if kind in others:
            others[kind](str(path), [])  # the sweep and plan tests check what these load into
        elif kind != "models":
            cls, load = _job(kind)
            assert isinstance(load(str(path), []), cls), path
    for name in list_recipes():
        cfg = load_sft_config(name)
        if not Path(cfg.model.name_or_path).exists():  # presets resolve now; checkpoint paths at run time
            assert cfg.model.name_or_path in list_presets() or "/" in cfg.model.name_or_path


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for key in ("optimizer.learning_rate", "data.datasets.N.path", "mesh.fsdp", "checkpoint.save_steps"):
        assert key in text
    assert "[default: cosine_with_min_lr]" in text


def test_distill_recipe_on_a_tiny_qwen2(tmp_path):
    """The Open-R1 recipe as shipped (remat, bf16 compute, grad accumulation 8, system prompt, <|im_end|> EOS,
    HF export), pointed at a tiny random Qwen2 and the embedded data."""
    hf = tmp_path / "qwen2"
    save_random_model(hf, "qwen2", vocab_size=512, num_key_value_heads=2)
    cfg = load_sft_config(
        "openr1-distill-qwen2.5-7b",
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={hf}",
            "data.tokenizer=embedded",
            "data.datasets=[{path: 'embedded:train'}]",
            "data.seq_len=192",  # the recipe's system prompt alone is ~110 embedded tokens
            "batch_size=8",
            "max_steps=2",
            "logging.progress_bar=false",
        ],
    )
    assert cfg.optimizer.learning_rate == 4e-5 and cfg.optimizer.max_grad_norm == 0.2
    result = run_sft(cfg)
    assert result.steps == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert model.config.rope_parameters["rope_theta"] == 300000.0


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
def _fails(capsys, tmp_path, *argv: str, needles: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    code = main(["sft", *argv, f"output_dir={out}", "logging.progress_bar=false", "max_steps=1"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("openr1-jax: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists(), "nothing may be written on bad input"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unknown_key_gets_a_suggestion(capsys, tmp_path):
    _fails(capsys, tmp_path, "optimizer.learnig_rate=1e-4", needles=("optimizer.learnig_rate", "learning_rate"))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("batch_size: 8\noptimizer:\n  lr_sheduler_type: linear\n")
    _fails(capsys, tmp_path, str(recipe), needles=("optimizer.lr_sheduler_type", "lr_scheduler_type", str(recipe)))
    # a nested section's field written at the top level: the suggestion names its section
    _fails(
        capsys,
        tmp_path,
        "gradient_accumulation_steps=4",
        needles=("unknown override key 'gradient_accumulation_steps'", "did you mean 'training.gradient_accumulation"),
    )


def test_wrong_type(capsys, tmp_path):
    _fails(capsys, tmp_path, "batch_size=many", needles=("'batch_size'", "integer", "many"))
    _fails(capsys, tmp_path, "data.overlong=skip", needles=("'data.overlong'", "truncate"))


def test_dataset_without_the_needed_column(capsys, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "hello", "label": 1}])
    _fails(capsys, tmp_path, f"data.datasets=[{{path: '{data}'}}]", needles=(str(data), "messages", "text"))


def test_empty_dataset(capsys, tmp_path):
    data = _jsonl(tmp_path / "empty.jsonl", [])
    _fails(capsys, tmp_path, f"data.datasets=[{{path: '{data}'}}]", needles=(str(data), "no rows"))


def test_tokenizer_without_chat_template(capsys, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    _fails(capsys, tmp_path, f"data.tokenizer={tok}", needles=("chat template",))


def test_mesh_that_does_not_divide_the_devices(capsys, tmp_path):
    _fails(capsys, tmp_path, "mesh.fsdp=3", needles=("mesh", "3", "8"))


def test_unknown_recipe(capsys, tmp_path):
    _fails(capsys, tmp_path, "defualt", needles=("defualt", "default"))
