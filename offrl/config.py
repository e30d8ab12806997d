"""Configs are data: frozen dataclasses whose field help texts are the CLI help, read from and
written to TOML, and overridden with ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from offrl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nonempty: bool = False,
) -> Any:
    """A config field with its help text (shown by ``offrl train --help-algo`` and in the docs) and its
    declared range: ``low``/``high`` bound a number (``*_open``: the bound itself is excluded), or each
    item of a tuple (``nonempty``: at least one item, e.g. hidden layer sizes with ``low=1``). ``None``
    values of optional fields are not range-checked; NaN is never in range. :func:`validate` and
    :func:`from_dict` check the range of every field that declares one."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    meta: dict[str, Any] = {"help": help}
    if low is not None or high is not None or nonempty:
        meta["range"] = Range(low, high, low_open, high_open, nonempty)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Range:
    """A field's declared range (see :func:`option`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nonempty: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return (
                f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {self.high}"
        return "set"

    def holds(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return True  # not a number: the type check's business
        if isinstance(x, float) and math.isnan(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None."""
        if value is None:
            return None
        if isinstance(value, tuple):
            if self.nonempty and not value:
                return "must not be empty"
            bad = [v for v in value if not self.holds(v)]
            return f"every item must be {self.describe()}" if bad else None
        return None if self.holds(value) else f"must be {self.describe()}"


def field_range(f: dataclasses.Field[Any]) -> Range | None:
    r = f.metadata.get("range")
    return r if isinstance(r, Range) else None


def range_problems(cfg: Any) -> list[str]:
    """``name=value (why)`` for every field of ``cfg`` outside its declared range, and every float
    field holding NaN (NaN is no setting's value)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        r = field_range(f)
        why = r.problem(value) if r is not None else None
        if why is None and isinstance(value, float) and math.isnan(value):
            why = "must be a number, not nan"
        if why is not None:
            what = str(f.metadata.get("help", "")).split(";")[0].split(" (")[0].split(":")[0]
            out.append(f"{f.name}={value!r} ({why}{'; ' + what if what else ''})")
    return out


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` type (``| None`` adds None); None for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_literal_choices(a) if a is not type(None) else (None,) for a in typing.get_args(tp)]
        if all(p is not None for p in parts):
            return tuple(v for p in parts if p is not None for v in p)
    return None


def validate(cfg: Any, name: str, checks: Mapping[str, bool] | None = None) -> None:
    """Raise one ConfigError naming every invalid field of the dataclass ``cfg``: values outside their
    ``Literal`` choices, values outside their declared range (:func:`option`), NaN, and failed
    ``checks`` (field name -> condition). Configs call it in ``__post_init__``, so a config built in
    code is checked as one read from a file; :func:`from_dict` checks every config it builds."""
    hints = _resolved_types(type(cfg))
    bad = []
    for f in dataclasses.fields(cfg):
        choices, value = _literal_choices(hints[f.name]), getattr(cfg, f.name)
        if choices is not None and value not in choices:
            bad.append(f"{f.name}={value!r} (one of {', '.join(map(repr, choices))})")
    bad += range_problems(cfg)
    named = {b.split("=", 1)[0] for b in bad}
    bad += [f"{k}={getattr(cfg, k)!r}" for k, ok in (checks or {}).items() if not ok and k not in named]
    if bad:
        raise ConfigError(f"{name}: invalid {', '.join(bad)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML or command-line value to a field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, str):
            for arg in args:
                if str(arg) == value:
                    return arg
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else str
        return tuple(_coerce(v, item, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a mapping; unknown keys are an error that lists the valid ones."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}"
        )
    hints = _resolved_types(cls)
    kwargs = {k: _coerce(v, hints[k], f"{source}: '{k}'") for k, v in data.items()}
    out = cls(**kwargs)
    bad = range_problems(out)
    if bad:
        raise ConfigError(f"{source}: invalid {', '.join(bad)}")
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def replace(cfg: C, overrides: Mapping[str, Any], source: str = "--set") -> C:
    """A copy of ``cfg`` with string or typed overrides applied (unknown keys → ConfigError)."""
    merged = {**to_dict(cfg), **dict(overrides)}
    return from_dict(type(cfg), merged, source)


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` → ``{"a": "1", "b.c": "x"}``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# -- TOML ---------------------------------------------------------------------------------------
def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    except OSError as exc:  # a folder, unreadable
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}[repr(v)]
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML for a mapping of scalars, lists and one level of tables.

    TOML has no null: ``None`` is written as the string ``"none"``, which :func:`from_dict` reads
    back as ``None`` for optional fields.
    """
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    for k, v in data.items():
        if not isinstance(v, Mapping):
            lines.append(f"{k} = {_toml_value('none' if v is None else v)}")
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        for k, v in table.items():
            if isinstance(v, Mapping):
                raise ConfigError(f"nested table '{name}.{k}' is not supported")
            lines.append(f"{k} = {_toml_value('none' if v is None else v)}")
    return "\n".join(lines) + "\n"
