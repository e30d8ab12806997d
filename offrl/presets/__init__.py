"""Named presets: algorithm settings chosen for a family of datasets, applied before a config file and
``--set`` (defaults ← preset ← config file ← overrides).

A preset is a TOML file beside this module, one table per algorithm with optional ``continuous`` and
``discrete`` sub-tables for the two variants; ``train.KEY`` addresses the trainer (``train.epochs`` is
the preset's budget, dropped where the run gives its own epochs or steps)::

    offrl train --algo cql --dataset classic/pendulum-medium-replay --out runs/cql --preset classic
    fit("cql", "classic/pendulum-medium-replay", "runs/cql", preset="classic")

How each preset was chosen is written at the top of its file (``offrl presets`` lists them).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from offrl import config as cfgmod
from offrl.errors import ConfigError

PRESET_DIR = Path(__file__).parent
_VARIANTS = ("continuous", "discrete")
BUDGET_KEYS = ("train.epochs", "train.steps")


def names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


@cache
def _load(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.toml"
    if not name.replace("-", "").replace("_", "").isalnum() or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names()) or 'none'}")
    return cfgmod.read_toml(path)


def describe(name: str) -> str:
    """The comment block at the top of a preset's file: how it was chosen."""
    _load(name)  # unknown names fail with the list of presets
    lines = (PRESET_DIR / f"{name}.toml").read_text().splitlines()
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line.lstrip("# ").rstrip())
    return "\n".join(head).strip()


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset_settings(name: str, algo: str, *, discrete: bool) -> dict[str, Any]:
    """The settings preset ``name`` gives ``algo`` (its discrete or continuous variant), by their
    ``--set`` keys."""
    doc = _load(name)
    if algo not in doc:
        covered = ", ".join(sorted(doc))
        raise ConfigError(f"preset {name!r} has no settings for {algo!r}; it covers: {covered}")
    table = dict(doc[algo])
    variants = {v: dict(table.pop(v, {})) for v in _VARIANTS}
    return _flatten({**table, **variants["discrete" if discrete else "continuous"]})


def without_budget(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` less the preset's budget, for a run that gives its own epochs or steps."""
    return {k: v for k, v in settings.items() if k not in BUDGET_KEYS}
