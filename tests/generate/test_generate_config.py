"""The generate config: shipped recipes parse, Open-R1's recipe carries its settings, bad combinations fail."""

import pytest

from openr1_jax.errors import UserError
from openr1_jax.generate.config import GenerateConfig, list_recipes, load_generate_config
from openr1_jax.structured import help_text

OPEN_R1_PROMPT = (
    "You will be given a problem. Please reason step by step, and put your final answer within \\boxed{}:\n"
)


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads(name):
    assert isinstance(load_generate_config(name), GenerateConfig)


def test_default_recipe_uses_the_embedded_task_and_the_engine():
    cfg = load_generate_config("default")
    assert (cfg.backend, cfg.dataset.path, cfg.dataset.prompt_column) == ("engine", "embedded:test", "problem")
    assert cfg.filters.math_verify and cfg.filters.reference_column == "answer"


def test_open_r1_recipe_matches_open_r1():
    cfg = load_generate_config("openr1-math-r1")
    assert cfg.backend == "openai" and cfg.openai.endpoint == "chat"
    assert cfg.openai.model == "deepseek-ai/DeepSeek-R1"
    assert cfg.dataset.prompt_column == "problem"
    assert cfg.prompt_template.format(problem="What is 1+1?") == OPEN_R1_PROMPT + "What is 1+1?"
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.max_new_tokens, cfg.num_generations) == (0.6, 0.95, 32768, 4)


def test_overrides_and_help():
    cfg = load_generate_config("default", ["sampling.temperature=0", "openai.base_url=http://h:1/v1"])
    assert cfg.sampling.temperature == 0.0 and cfg.openai.base_url == "http://h:1/v1"
    assert "filters.pass_rate_min" in help_text(GenerateConfig)
    with pytest.raises(UserError, match=r"unknown override key 'sampling.temprature' \(did you mean"):
        load_generate_config("default", ["sampling.temprature=0"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=openai", "use_chat_template=false"], "endpoint 'chat' always applies"),
        (["backend=openai", "openai.endpoint=completions"], "needs openai.tokenizer"),
        (["use_chat_template=false", "system_prompt=hi"], "need use_chat_template: true"),
        (["filters.pass_rate_min=0.8", "filters.pass_rate_max=0.2"], "pass_rate_min <= pass_rate_max"),
        (["sampling.top_p=0"], r"top_p must lie in \(0, 1\]"),
        (["num_generations=0"], "num_generations must be >= 1"),
        (["openai.base_url=localhost:8000"], "must start with http"),
    ],
)
def test_bad_settings_are_one_sentence(overrides, message):
    with pytest.raises(UserError, match=message):
        load_generate_config("default", overrides)


def test_unknown_recipe_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'default'"):
        load_generate_config("defualt")
