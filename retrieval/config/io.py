"""Loading and saving :mod:`retrieval.config`: YAML over the typed defaults, then dotted overrides, validated.

``load_config("configs/tiny.yaml", ["train.lr=1e-4", "data.num_workers=2"])`` merges the YAML file
over the defaults, then the dotted overrides, then validates every field. Errors name the
field (``optim.lr: expected a float, got 'abc'``) so a typo fails before any GPU time is spent.
Every run writes its fully resolved config next to its outputs (:func:`save_config`).

A config file is bounded before it is used: at most :data:`MAX_CONFIG_BYTES` of UTF-8 text, whose YAML (aliases
expanded) holds at most :data:`MAX_CONFIG_NODES` values and never contains itself; a "billion laughs" file, a
self-referencing alias, a binary or a directory each fail in one line naming the file.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from retrieval.config.schema import Config, ConfigError

MAX_CONFIG_BYTES = 1 << 20  # an experiment config is a few kB
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded (a real config holds a few hundred)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type; raise ConfigError naming it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{name}: expected one of {[_type_name(a) for a in args]}, got {value!r}"
        )
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        return _float(name, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{name}: unsupported field type {tp!r}")  # schema bug, not user error


def _float(name: str, value: Any) -> float:
    """A finite float: NaN or inf in a learning rate or a margin is silent garbage, never a setting."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return number


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        tp, value, dotted = hints[f.name], values[f.name], f"{prefix}{f.name}"
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
            kwargs[f.name] = _build(tp, value, dotted + ".")
        else:
            kwargs[f.name] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4); values are parsed as YAML (lists, null, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = nxt
    node[path[-1]] = value


def config_from_dict(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = _deepcopy(values)
    for item in overrides:
        path, value = parse_override(item)
        _set_dotted(tree, path, value)
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        values = _read_yaml(path)
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def _read_yaml(path: Path) -> dict:
    """The mapping of a config file, checked for size, text, YAML, and the size and shape of what it expands to."""
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"config file {name} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {name} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {name}: {path.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {name} is not UTF-8 text (a binary?); expected a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {name} is not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {name}: expected a mapping at top level")
    _check_expanded(loaded or {}, name)
    return loaded or {}


def _check_expanded(tree: Any, name: str) -> None:
    """Walk what the YAML expands to (aliases followed), bounded: no node inside itself, at most
    :data:`MAX_CONFIG_NODES` values (a few-kB file of nested aliases can expand to billions)."""
    count, stack = 0, [(tree, ())]
    while stack:
        node, ancestors = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"config file {name} expands to more than {MAX_CONFIG_NODES} values (YAML aliases?)")
        if isinstance(node, (dict, list)):
            if id(node) in ancestors:
                raise ConfigError(f"config file {name} contains itself (a YAML alias inside its own anchor)")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, (*ancestors, id(node))) for child in children)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(asdict(cfg))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in the schema's field order (what ``save_config`` writes, ``--print-config``
    prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_yaml(cfg))


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x
