"""Generic loading machinery for dataclass config trees.

Nothing here knows the concrete schema: every function walks whatever dataclass tree it is given,
using the resolved field annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``,
``list[X]``, ``dict[str, X]``, ``Literal[...]``, nested dataclasses). Adding a field or section
to :mod:`lov15_megatron.config.schema` therefore needs no change here.

YAML files mirror the tree; missing keys keep their defaults. A top-level ``base:`` key (a path,
or a list of paths merged in order, relative to the file) names YAML loaded first and
deep-merged under the file.
Overrides are ``a.b.c=value`` strings whose value is parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, Union

import yaml

T = TypeVar("T")
_NONE = type(None)


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type or value, or inconsistent fields."""


_HINTS: dict[type, dict[str, Any]] = {}  # per dataclass: resolving annotations is slow


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass ``cls``."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _section(tp: Any) -> type | None:
    """The dataclass type if ``tp`` is a dataclass or ``Dataclass | None``, else None."""
    arms = [a for a in typing.get_args(tp) if a is not _NONE] if _is_union(tp) else [tp]
    if len(arms) == 1 and isinstance(arms[0], type) and dataclasses.is_dataclass(arms[0]):
        return arms[0]
    return None


def _type_name(tp: Any) -> str:
    if tp is _NONE:
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return repr(tp) if typing.get_origin(tp) else getattr(tp, "__name__", repr(tp))


def _got(value: Any) -> str:
    return f"got {type(value).__name__} {value!r}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown(path: str, key: Any, valid: Mapping[str, Any], source: str) -> ConfigError:
    msg = f"unknown key '{path}'" + (f" in {source}" if source else "")
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{msg}; {hint}")


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (ints become floats for floats)."""

    def fail(msg: str) -> NoReturn:
        raise ConfigError(f"{path}: {msg}" + (f" (in {source})" if source else ""))

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and _NONE in args:
            return None
        arms = [a for a in args if a is not _NONE]
        if len(arms) == 1 and (typing.get_origin(arms[0]) or dataclasses.is_dataclass(arms[0])):
            return _coerce(value, arms[0], path, source)  # its own message is more precise
        for arm in arms:
            try:
                return _coerce(value, arm, path, source)
            except ConfigError:
                pass
        fail(f"expected {_type_name(tp)}, {_got(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        fail(f"{value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            check_types(value, path)
            return value
        return build(tp, value, path, source)
    if origin is list:
        if not isinstance(value, list):
            fail(f"expected {_type_name(tp)}, {_got(value)}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            fail(f"expected {_type_name(tp)}, {_got(value)}")
        kt, vt = args or (Any, Any)
        return {
            _coerce(k, kt, path, source): _coerce(v, vt, _join(path, k), source)
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads e.g. ``1e-3`` as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail(f"expected float, {_got(value)}")
    ok = isinstance(value, tp) if isinstance(tp, type) else True
    if tp is int and isinstance(value, bool):
        ok = False
    if not ok:
        fail(f"expected {_type_name(tp)}, {_got(value)}")
    return value


def build(cls: type[T], data: Any, path: str = "", source: str = "") -> T:
    """Construct dataclass ``cls`` from a mapping, checking keys and types recursively.

    Missing keys keep their defaults; ``path`` prefixes error messages, ``source`` names the
    origin (file, override, ...).
    """
    if not isinstance(data, Mapping):
        where = f" (in {source})" if source else ""
        raise ConfigError(
            f"{path or '<root>'}: expected a mapping for {cls.__name__}, {_got(data)}{where}"
        )
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(_join(path, key), key, hints, source)
        kwargs[key] = _coerce(value, hints[key], _join(path, key), source)
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a field without default is missing
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def check_types(obj: Any, path: str = "") -> None:
    """Type-check a dataclass tree built in code, normalising values in place (e.g. int->float)."""
    for name, tp in _hints(type(obj)).items():
        setattr(obj, name, _coerce(getattr(obj, name), tp, _join(path, name), ""))


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` onto ``base`` (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(
    path: str | os.PathLike[str], cls: type, _chain: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Read a YAML mapping, resolving its ``base:`` chain; each file is checked against ``cls``."""
    file = Path(path)
    resolved = file.resolve()
    if resolved in _chain:
        raise ConfigError("cycle in 'base:' chain: " + " -> ".join(map(str, (*_chain, resolved))))
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, {_got(data)}")
    base = data.pop("base", None)
    build(cls, data, "", str(path))  # early check so errors name the file that has the key
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths, {_got(base)}")
    merged: dict[str, Any] = {}
    for b in bases:  # later bases override earlier ones; the file itself overrides all
        merged = deep_merge(merged, load_yaml_tree(file.parent / b, cls, (*_chain, resolved)))
    return deep_merge(merged, data)


def apply_override(obj: Any, text: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a dataclass tree in place.

    A section can only be assigned a mapping (YAML flow syntax, ``a.b={x: 1}``), which is
    deep-merged into it; everything else must target a leaf field.
    """
    src = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override '{text}': expected 'key.path=value'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: cannot parse value {raw!r} as YAML: {e}") from None
    target, path, parts = obj, "", key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in hints:
            raise _unknown(_join(path, part), part, hints, src)
        if i == len(parts) - 1:
            break
        path = _join(path, part)
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{src}: '{path}' is a leaf, not a section")
    full, tp, section = _join(path, part), hints[part], _section(hints[part])
    if section is not None and not (value is None and _NONE in typing.get_args(tp)):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{src}: '{full}' is a section, not a leaf; set a field such as "
                f"'{full}.{next(iter(_hints(section)))}=...' or assign a mapping '{full}={{...}}'"
            )
        current = getattr(target, part)
        merged = deep_merge(dataclasses.asdict(current) if current is not None else {}, value)
        setattr(target, part, build(section, merged, full, src))
    else:
        setattr(target, part, _coerce(value, tp, full, src))


def load(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build a ``cls`` tree from an optional YAML file plus overrides (no cross-field checks)."""
    data = load_yaml_tree(path, cls) if path is not None else {}
    obj = build(cls, data, "", str(path) if path is not None else "<defaults>")
    for text in [overrides] if isinstance(overrides, str) else overrides:
        apply_override(obj, text)
    return obj


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists/scalars."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    """The full resolved config as YAML; loading this text gives an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def format_config(cfg: Any) -> str:
    """A readable full dump for logs: a header line, then the YAML."""
    return f"==== resolved {type(cfg).__name__} ====\n{config_to_yaml(cfg).rstrip()}"
