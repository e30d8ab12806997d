"""Algorithm names → classes; the dataset's action space picks the continuous or discrete variant."""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym

from offrl.algos.base import OfflineAlgorithm
from offrl.errors import ConfigError

# Modules that register algorithms when imported. One algorithm (variant) per file.
_MODULES = (
    "offrl.algos.bc",
    "offrl.algos.cql",
    "offrl.algos.cql_discrete",
    "offrl.algos.td3bc",
    "offrl.algos.iql",
    "offrl.algos.iql_discrete",
    "offrl.algos.awac",
    "offrl.algos.bcq",
    "offrl.algos.bcq_discrete",
)

_REGISTRY: dict[str, dict[str, type[OfflineAlgorithm]]] = {}
_loaded = False


def register(cls: type[OfflineAlgorithm]) -> type[OfflineAlgorithm]:
    """Class decorator: make ``cls`` available under ``cls.name`` for its action-space kind."""
    variant = "discrete" if cls.discrete else "continuous"
    slot = _REGISTRY.setdefault(cls.name, {})
    if variant in slot and slot[variant] is not cls:
        raise RuntimeError(f"algorithm '{cls.name}' ({variant}) registered twice")
    slot[variant] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(mod)
        _loaded = True


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def variants() -> list[tuple[str, str, type[OfflineAlgorithm]]]:
    """Every registered (name, 'continuous'|'discrete', class), for the contract suite."""
    _load()
    return [(n, v, cls) for n in sorted(_REGISTRY) for v, cls in sorted(_REGISTRY[n].items())]


def algorithm_class(
    name: str, action_space: gym.Space | None = None, *, discrete: bool | None = None
) -> type[OfflineAlgorithm]:
    """The class for ``name`` and an action space; a clear error if it has no matching variant."""
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if discrete is None:
        discrete = isinstance(action_space, gym.spaces.Discrete)
    variant = "discrete" if discrete else "continuous"
    if variant not in _REGISTRY[name]:
        have = ", ".join(_REGISTRY[name])
        raise ConfigError(
            f"algorithm {name!r} has no {variant} variant (it has: {have}); the dataset's action space is {action_space}"
        )
    return _REGISTRY[name][variant]


def config_class(name: str, action_space: gym.Space) -> Any:
    return algorithm_class(name, action_space).Config
