"""The configuration's parsing: YAML as users write it, typed values, errors naming keys.

It knows nothing of the sections (colocate/config/__init__.py ties them together): it reads
YAML (only true/false as booleans), coerces values to the dataclass fields' declared types,
builds nested dataclasses with "did you mean" for unknown keys, and parses `key=value`
overrides. Every user mistake is a `ConfigError` naming the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the dotted key and the fix."""


def require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans: YAML 1.1 also reads on/off/yes/no as
    booleans, which would turn `mps.mode: off` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def user_number(value: Any, *, integer: bool) -> int | float | None:
    """A number as users write it (``3e-4``, ``1_000``, ``1e3`` or ``10.0`` for an integer),
    or None when `value` is not one. YAML 1.1 reads ``3e-4`` and ``1e3`` (no dot) as
    strings, so strings are parsed here; a bool is never a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:  # exact for long integers; int() and float() both accept 1_000
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        return None
    if not integer:
        return float(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value


def _arg_type(integer: bool):
    import argparse

    def parse(text: str):
        number = user_number(text, integer=integer)
        if number is None:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if integer else 'a number'}, got {text!r}")
        return number
    parse.__name__ = "int" if integer else "float"
    return parse


int_arg = _arg_type(True)
"""argparse ``type=`` for integers as users write them (1_000, 1e3)."""
float_arg = _arg_type(False)
"""argparse ``type=`` for numbers as users write them (3e-4, 1_000)."""


def describe_path(path: str) -> str:
    """`path` for an error message: a relative one also says where it was looked for
    (relative paths resolve from the working directory of the command)."""
    if os.path.isabs(path):
        return path
    return (f"{path} (looked for {os.path.abspath(path)}; relative paths resolve from the "
            f"working directory {os.getcwd()})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the key."""
    origin, args = get_origin(hint), get_args(hint)
    if value is None:
        require(type(None) in args, key, "may not be null")
        return None
    if origin in (list, tuple) or (origin is not None and type(None) in args and
                                   get_origin(args[0]) in (list, tuple)):
        seq_hint = args[0] if type(None) in args else hint
        require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        item = get_args(seq_hint)[0]
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if get_origin(seq_hint) is tuple else items
    if origin is not None and type(None) in args:  # Optional[scalar]
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        number = user_number(value, integer=True)
        require(number is not None, key, f"expected an integer, got {value!r}")
        return number
    if hint is float:
        number = user_number(value, integer=False)
        require(number is not None, key, f"expected a number, got {value!r}")
        return number
    if hint is str:
        require(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
                 f"expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint} (valid: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[name]):
            require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
            kwargs[name] = build(hints[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    require(all(path), key, "empty component in dotted key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return path, value
