"""Typed, validated params: each params.yaml section becomes a frozen dataclass.

Every stage loads its sections here before doing any work, so an unknown key, a
wrong type or an impossible value stops the stage with a message that names the
key (``spectrogram.n_mels=512 exceeds n_fft/2+1=257``). params.yaml is the single
source of hyperparameters: the dataclasses have no defaults, so a key missing from
params.yaml is an error too.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml key is missing, unknown, of the wrong type or impossible."""


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml as a plain dict (no validation)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(params: Mapping[str, Any], name: str, cls: type[T]) -> T:
    """Validate ``params[name]`` into the frozen dataclass ``cls``.

    Raises ParamsError naming ``name.key`` on a missing section or key, an unknown
    key, a wrong type, or a value that the class's ``__post_init__`` rejects.
    """
    if name not in params:
        raise ParamsError(f"params section '{name}' is missing")
    return _build(cls, params[name], name)


def load(path: str | Path, name: str, cls: type[T]) -> T:
    """Read params.yaml at ``path`` and validate section ``name`` into ``cls``."""
    return load_section(read_params(path), name, cls)


def check(condition: bool, key: str, value: Any, reason: str) -> None:
    """Raise ParamsError ``key=value reason`` unless ``condition`` holds.

    For use in ``__post_init__``; ``key`` is the bare field name and the section
    prefix is added by the loader.
    """
    if not condition:
        raise ParamsError(f"{key}={value!r} {reason}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass back to plain data (for logging and MLflow)."""
    return dataclasses.asdict(config)


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mapping to ``{"train.augment.mixup_alpha": 0.2, ...}`` (keys joined by ``sep``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{full}{sep}", sep))
        else:
            flat[full] = value
    return flat


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, Mapping):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    missing = sorted(k for k in fields if k not in data)
    if missing:
        raise ParamsError(f"{where}: missing key(s) {', '.join(f'{where}.{k}' for k in missing)}")
    values = {key: _coerce(hints[key], data[key], f"{where}.{key}") for key in fields}
    try:
        return cls(**values)
    except ParamsError as err:
        message = str(err)
        raise ParamsError(message if message.startswith(f"{where}.") else f"{where}.{message}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint; return it in canonical form."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}={value!r} must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}={value!r} must be a list")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, item, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"{key}: unsupported type hint {hint!r}")  # a bug in a config class


__all__ = [
    "DEFAULT_PARAMS",
    "ParamsError",
    "check",
    "flatten",
    "load",
    "load_section",
    "read_params",
    "to_dict",
]
