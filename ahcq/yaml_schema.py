"""The one way a YAML file of this project is read and checked: quantization configs, table specs and video
run configs alike name the file, the dotted key and what is allowed in every error."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SchemaError", "bad_value", "check_keys", "read_yaml", "require_mapping", "unknown_key"]


class SchemaError(ValueError):
    """A YAML file is malformed or holds an unknown key or a bad value; the message names both."""


def _at(source: str, where: str) -> str:
    return f"{source}: {where}: " if where else f"{source}: "


def unknown_key(source: str, where: str, key: Any, allowed: Iterable[str],
                cls: type[Exception] = SchemaError) -> Exception:
    """``<file>: <where>.<key>: unknown key '<key>'; allowed keys: ...`` (as ``cls``)."""
    path = f"{where}.{key}" if where else str(key)
    return cls(f"{_at(source, path)}unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def bad_value(source: str, where: str, value: Any, expected: str, cls: type[Exception] = SchemaError
              ) -> Exception:
    """``<file>: <where>: <value> is not allowed; expected <expected>`` (as ``cls``)."""
    return cls(f"{_at(source, where)}{value!r} is not allowed; expected {expected}")


def require_mapping(source: str, where: str, data: Any, cls: type[Exception] = SchemaError) -> dict:
    """``data`` when it is a mapping, else the error naming the key that should have held one."""
    if not isinstance(data, dict):
        raise bad_value(source, where, data, "a mapping of keys to values", cls)
    return data


def check_keys(source: str, where: str, data: dict, allowed: Iterable[str],
               cls: type[Exception] = SchemaError) -> None:
    """Every key of ``data`` is one of ``allowed``."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise unknown_key(source, where, key, allowed, cls)


def read_yaml(path: Path, shown: str | None = None, cls: type[Exception] = SchemaError) -> Any:
    """The parsed file; a missing, unreadable or malformed one raises naming the file (and the line)."""
    shown = str(path) if shown is None else shown
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise cls(f"{shown}: file not found") from None
    except OSError as err:
        raise cls(f"{shown}: cannot read: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise cls(f"{shown}: {line}malformed YAML: {problem}") from None


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in the strings of a parsed YAML value, read from the environment."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is None:
                raise SchemaError(f"environment variable {m.group(1)} is not set and has no default")
            return m.group(2)
        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value
