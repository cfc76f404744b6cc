"""Named model presets: the YAML files of `configs/models/`, one flat mapping of `ModelConfig` fields each.

`load_model_config` is what the CLI and recipes call: it takes a preset name or a YAML path plus overrides,
and every key, from the file or from an override, is checked by `ModelConfig.from_dict`, so a misspelled key
fails with its name, the file it came from and a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from pathlib import Path
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig


def config_dir(kind: str) -> Path:
    """`configs/<kind>` inside the installed wheel (package `openr1_jax._configs`), else in the checkout."""
    try:
        packaged = importlib.resources.files("openr1_jax._configs") / kind
        if isinstance(packaged, Path) and packaged.is_dir():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "configs" / kind


PRESET_DIR = config_dir("models")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; anything else is a UserError naming the file."""
    from openr1_jax.structured import read_yaml

    return read_yaml(path, "model config", allow_empty=False)


def load_preset(name: str) -> ModelConfig:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        available = list_presets()
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown model preset '{name}': {hint}available presets: {', '.join(available)}")
    return _build(read_yaml_mapping(path), f"preset '{name}' ({path})")


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name (`deepseek-v3-671b`) or a YAML file path, with optional `{field: value}` overrides."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or "/" in text or path.is_file():
        if not path.is_file():
            raise UserError(f"model config file '{path}' does not exist")
        source = f"model config '{path}'"
        cfg = _build(read_yaml_mapping(path), source)
    else:
        source = f"preset '{text}'"
        cfg = load_preset(text)
    if not overrides:
        return cfg
    # Rebuilt through from_dict, so a misspelled override is named as one and every check runs again.
    return _build({**cfg.to_dict(), **overrides}, f"the overrides of {source}")


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if "float" in str(f.type)}


def _build(data: dict[str, Any], source: str) -> ModelConfig:
    """`ModelConfig.from_dict`, with YAML 1.1's string-typed exponents (`1e-6`) read as the floats meant, and
    every error naming `source`."""
    data = dict(data)
    for key in _FLOAT_FIELDS & set(data):
        if isinstance(data[key], str):
            try:
                data[key] = float(data[key])
            except ValueError:
                raise UserError(f"{key} in {source} must be a number, not '{data[key]}'") from None
    try:
        return ModelConfig.from_dict(data, source=source)
    except UserError as err:
        if source in str(err):
            raise
        raise UserError(f"{source}: {err}") from None
