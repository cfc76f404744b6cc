"""Typed configs from YAML and `key=value` overrides: nested frozen dataclasses, checked field by field.

Every run config (SFT, GRPO, ...) is a tree of dataclasses whose fields carry `metadata={"help": ...}`. This
module turns a YAML mapping plus dotted overrides (`optimizer.learning_rate=4e-5`, `data.datasets.0.path=x`)
into that tree, and names the exact key when something is wrong: an unknown key (with a suggestion), a value
of the wrong type, a list index out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from openr1_jax.errors import UserError


# ----------------------------------------------------------------------------------------------------------
# dict -> dataclass
# ----------------------------------------------------------------------------------------------------------
def from_dict(cls: type, data: Any, source: str, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping. `source` names the origin (e.g. "config 'sft.yaml'") and `path` the
    dotted key of this mapping inside it; both appear in every error."""
    where = f"'{path}' in {source}" if path else source
    if not isinstance(data, Mapping):
        raise UserError(f"{where} must be a mapping of key: value, not {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{dotted.rpartition('.')[0] + '.' if path else ''}{close[0]}'?)" if close else ""
            raise UserError(f"unknown key '{dotted}' in {source}{hint}")
        kwargs[key] = _convert(hints[key], value, source, dotted)
    try:
        return cls(**kwargs)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    where = f"'{path}' in {source}"
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, source, path)
        for option in options:
            try:
                return _convert(option, value, source, path)
            except UserError:
                continue
        raise UserError(f"{where} must be {' or '.join(_name(a) for a in args)}, not {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where} must be one of {', '.join(map(repr, args))}, not {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, path)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} must be a list, not {value!r}")
        item = args[0] if args else Any
        converted = [_convert(item, v, source, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping, not {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `4e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, not {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------------------------------------
# YAML files and overrides
# ----------------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path, what: str = "config", allow_empty: bool = True) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is {} when `allow_empty`); anything else is a
    UserError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{what} '{path}' is not valid YAML{at}") from None
    if data is None and allow_empty:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must be a mapping of key: value, not {_kind(data)}")
    return data


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """`["a.b=3", "c=[1, 2]"]` -> `[(["a", "b"], 3), (["c"], [1, 2])]`; values are parsed as YAML."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"override '{item}' is not of the form key=value (e.g. optimizer.learning_rate=1e-5)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """Set each dotted key in a copy of `data`. With `cls`, unknown keys fail here with a suggestion, before any
    default is filled in; list items are addressed by index (`data.datasets.0.weight=2`)."""
    import copy

    data = copy.deepcopy(data)
    for keys, value in parse_overrides(overrides):
        node: Any = data
        node_cls = cls
        for depth, key in enumerate(keys):
            dotted = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise UserError(f"override '{dotted}': index {key} is out of range (the list has {len(node)})")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                    node_cls = _item_class(node_cls)
                continue
            if node_cls is not None:
                names = {f.name for f in dataclasses.fields(node_cls)}
                if key not in names:
                    close = difflib.get_close_matches(key, sorted(names), n=1)
                    # a field of a nested section written without its section (`gradient_accumulation_steps`
                    # for `training.gradient_accumulation_steps`) beats a merely similar name at this level
                    nested = _nested_paths(node_cls, key)
                    guess = ".".join([*keys[:depth], nested[0]]) if nested else None
                    if guess is None and close:
                        guess = ".".join([*keys[:depth], close[0]])
                    hint = f" (did you mean '{guess}'?)" if guess else ""
                    raise UserError(f"unknown override key '{dotted}'{hint}")
                node_cls = _field_class(node_cls, key)
            if last:
                node[key] = value
            else:
                child = node.get(key)
                if child is None:
                    child = _default_of(node_cls)
                    node[key] = child
                node = child
    return data


def _nested_paths(cls: type, key: str, prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted paths of fields named `key` in the dataclass sections below `cls` (not `cls`'s own fields)."""
    found = []
    for f in dataclasses.fields(cls):
        sub = _field_class(cls, f.name)
        if dataclasses.is_dataclass(sub) and depth > 0:
            if key in {g.name for g in dataclasses.fields(sub)}:
                found.append(f"{prefix}{f.name}.{key}")
            found += _nested_paths(sub, key, f"{prefix}{f.name}.", depth - 1)
    return found


def _field_class(cls: type, name: str) -> Any:
    """The dataclass (or list-of-dataclass marker) behind field `name`, None for leaves."""
    tp = typing.get_type_hints(cls)[name]
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (list, tuple):
        return ("list", _strip_optional(typing.get_args(tp)[0]))
    return None


def _item_class(marker: Any) -> Any:
    if isinstance(marker, tuple) and marker[0] == "list" and dataclasses.is_dataclass(marker[1]):
        return marker[1]
    return None


def _default_of(node_cls: Any) -> Any:
    return [] if isinstance(node_cls, tuple) else {}


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def load_config(cls: type, path: str | Path | None, overrides: Sequence[str] = (), what: str = "config") -> Any:
    """YAML file (or nothing: all defaults) + dotted overrides -> a validated `cls`."""
    data = read_yaml(path, what) if path is not None else {}
    source = f"{what} '{path}'" if path is not None else what
    if overrides:
        data = apply_overrides(data, overrides, cls)
        source += " (with overrides)"
    return from_dict(cls, data, source)


# ----------------------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------------------
def describe(cls: type, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf option of `cls`, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if dataclasses.is_dataclass(tp):
            yield from describe(tp, key + ".")
            continue
        item = _list_item(tp)
        if dataclasses.is_dataclass(item):
            yield key, _show(default), f.metadata.get("help", "") + f" (a list of: {item.__name__})"
            yield from describe(item, key + ".N.")
            continue
        yield key, _show(default), f.metadata.get("help", "")


def _list_item(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp) else None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "..."
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return f"[{len(value)} items]"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def help_text(cls: type) -> str:
    rows = list(describe(cls))
    width = min(max(len(k) for k, _, _ in rows), 44)
    lines = []
    for key, default, text in rows:
        lines.append(f"  {key:<{width}}  {text} [default: {default}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
