"""The one registry of algorithms, offline and online: names → classes.

A class joins with ``@register``; its ``online`` class attribute (set by ``OnlineAlgorithm``) says
which command trains it (``offrl train`` or ``offrl online``), its ``discrete`` attribute which
action space it serves. A name is one algorithm of one kind, with a continuous and/or a discrete
variant; the dataset's or environment's action space picks the variant.
"""

from __future__ import annotations

import importlib

import gymnasium as gym

from offrl.algos.base import Algorithm
from offrl.errors import ConfigError

# Modules that register algorithms when imported. One algorithm (variant) per file.
_MODULES = (
    "offrl.algos.bc",
    "offrl.algos.cql",
    "offrl.algos.calql",
    "offrl.algos.cql_discrete",
    "offrl.algos.td3bc",
    "offrl.algos.iql",
    "offrl.algos.iql_discrete",
    "offrl.algos.awac",
    "offrl.algos.bcq",
    "offrl.algos.bcq_discrete",
    "offrl.online.sac",
    "offrl.online.dqn",
    "offrl.online.ppo",
)

_REGISTRY: dict[str, dict[str, type[Algorithm]]] = {}
_loaded = False


def _kind(online: bool) -> str:
    return "online" if online else "offline"


def _command(online: bool) -> str:
    return "offrl online" if online else "offrl train"


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available under ``cls.name`` for its kind and action space."""
    variant = "discrete" if cls.discrete else "continuous"
    slot = _REGISTRY.setdefault(cls.name, {})
    if variant in slot and slot[variant] is not cls:
        raise RuntimeError(f"algorithm '{cls.name}' ({variant}) registered twice")
    if any(other.online != cls.online for other in slot.values()):
        raise RuntimeError(f"algorithm '{cls.name}' registered as both online and offline")
    slot[variant] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(mod)
        _loaded = True


def _is_online(name: str) -> bool:
    return next(iter(_REGISTRY[name].values())).online


def names(*, online: bool | None = None) -> list[str]:
    """Registered names, sorted: all, or only the online (``online=True``) or offline ones."""
    _load()
    return sorted(n for n in _REGISTRY if online is None or _is_online(n) == online)


def variants(*, online: bool | None = None) -> list[tuple[str, str, type[Algorithm]]]:
    """Every registered (name, 'continuous'|'discrete', class), of one kind or of both."""
    return [(n, v, cls) for n in names(online=online) for v, cls in sorted(_REGISTRY[n].items())]


def algorithm_class(
    name: str,
    action_space: gym.Space | None = None,
    *,
    discrete: bool | None = None,
    online: bool | None = False,
) -> type[Algorithm]:
    """The class for ``name`` and an action space (or ``discrete``), of the kind ``online`` asks for
    (None: either); a one-line error for an unknown name, the other kind or a missing variant."""
    _load()
    if name not in _REGISTRY:
        label = "" if online is None else f" {_kind(online)}"
        raise ConfigError(f"unknown algorithm {name!r}; available{label}: {', '.join(names(online=online))}")
    if online is not None and _is_online(name) != online:
        raise ConfigError(
            f"{name!r} is an {_kind(not online)} algorithm: use `{_command(not online)}` "
            f"({_kind(online)} algorithms: {', '.join(names(online=online))})"
        )
    if discrete is None:
        discrete = isinstance(action_space, gym.spaces.Discrete)
    variant = "discrete" if discrete else "continuous"
    if variant not in _REGISTRY[name]:
        have = ", ".join(_REGISTRY[name])
        raise ConfigError(
            f"algorithm {name!r} has no {variant} variant (it has: {have}); the action space is {action_space}"
        )
    return _REGISTRY[name][variant]
