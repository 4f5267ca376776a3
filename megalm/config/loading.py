"""Loading a run config: strict YAML, strict types, dotted `section.key=value` overrides.

Loading is strict: an unknown section or key, a duplicate key or a value of the wrong type is a
`MegalmError` naming the key. An override's value is parsed as YAML and coerced to the field's
type (`parallel.tensor=2`, `optimizer.betas=[0.9,0.95]`).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megalm.config.schema import SECTIONS, Config
from megalm.errors import MegalmError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise MegalmError(f"duplicate key '{key}' at line {line} of {node.start_mark.name}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise MegalmError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise a MegalmError naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MegalmError:
                continue
        raise MegalmError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise MegalmError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise MegalmError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise MegalmError(f"{key}: expected {type_name(tp)}, got {value!r}")


def type_name(tp: Any) -> str:
    """A type as a user reads it: int, float, list[float], int | None."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def field_types(cls: type) -> dict[str, Any]:
    """name -> resolved type of every field of a section dataclass."""
    return typing.get_type_hints(cls)


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MegalmError(f"section '{name}' must be a mapping of keys, got {raw!r}")
    types_ = field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        raise MegalmError(
            f"unknown key '{name}.{unknown[0]}'; valid keys of '{name}': {', '.join(types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{name}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build a Config from nested dicts, strictly (unknown sections/keys and wrong types are errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MegalmError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise MegalmError(
            f"{source}: unknown section '{unknown[0]}'; valid sections: {', '.join(SECTIONS)}"
        )
    return Config(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to nested dicts; return them."""
    for item in overrides:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise MegalmError(f"override '{item}' must look like section.key=value")
        section, key = parts
        if section not in SECTIONS:
            raise MegalmError(
                f"override '{item}': unknown section '{section}'; valid: {', '.join(SECTIONS)}"
            )
        value = _parse_yaml(text, f"override '{item}'") if text.strip() else ""
        sec = raw.setdefault(section, {})
        if sec is None:
            sec = raw[section] = {}
        sec[key] = value
    return raw


PRESETS = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs (megalm/configs/*.yaml, package data; `configs/` in the repository)."""


def preset_path(name: str | Path) -> Path:
    """A config file: `name` itself when it exists, else the shipped preset of that name
    (`tiny`, `llama-7b.yaml`, ...), so an installed megalm runs `--config llama-7b` anywhere."""
    p = Path(name)
    if p.is_file():
        return p
    preset = PRESETS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if p.parent == Path(".") and preset.is_file():
        return preset
    raise MegalmError(f"config file not found: {p}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file or a shipped preset (defaults when path is None) strictly and apply
    dotted overrides."""
    raw: Any = {}
    if path is not None:
        p = preset_path(path)
        raw = _parse_yaml(p.read_text(encoding="utf-8"), str(p)) or {}
        if not isinstance(raw, dict):
            raise MegalmError(f"{p}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, list(overrides)), str(path or "config"))
