"""Typed stage parameters from ``params.yaml`` sections, with errors that say where.

``build(cls, mapping, where="params.yaml:bootstrap")`` turns a (nested) mapping into the
dataclass ``cls``: unknown keys, missing required keys and wrong types fail with the dotted
path of the offending key, so a typo in ``params.yaml`` never silently falls back to a default.

A key that moved (``grpo.teacher_url`` is now ``grpo.teacher.server.url``) is refused with its new
place: a params class lists its old keys in a ``MOVED_KEYS`` class variable (old key -> new dotted
key within the section). A nested params class that was once a plain value (``teacher:
data/models/teacher``) may say how to write it now in a ``SCALAR_HINT`` class variable (formatted
with ``where``, the dotted key, and ``value``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from relaypipe.errors import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A params section that does not match its dataclass (an InputError, so a ValueError:
    command lines report it in a line or two, without a traceback)."""


def _check_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: expected {tp.__name__}, got a boolean {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _check_scalar(value, tp, where)


def _section(where: str) -> str:
    """``params.yaml:grpo.teacher`` -> ``grpo.teacher`` (the dotted key, without the file)."""
    return where.rsplit(":", 1)[-1]


def build(cls: type[T], mapping: Any, where: str) -> T:
    """Instantiate dataclass ``cls`` from ``mapping``; ``where`` names it in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not isinstance(mapping, dict):
        hint = getattr(cls, "SCALAR_HINT", None)
        if hint and not isinstance(mapping, list | tuple):
            raise ConfigError(
                f"{where}: expected a mapping, got {mapping!r}; "
                + hint.format(where=_section(where), value=mapping)
            )
        raise ConfigError(
            f"{where}: expected a mapping of {cls.__name__} fields ({', '.join(fields)}), "
            f"got {mapping!r}"
        )
    hints = typing.get_type_hints(cls)
    moved = getattr(cls, "MOVED_KEYS", None) or {}
    for key in sorted(set(mapping) - set(fields)):
        if key in moved:
            raise ConfigError(
                f"{where}.{key} moved to {_section(where)}.{moved[key]} (see docs/presets.md)"
            )
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _convert(mapping[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from err
