"""Hand-written update steps, registered per algorithm class.

A module of :data:`_MODULES` registers a factory for an algorithm class with :func:`register`; the
factory returns the fast version of that algorithm's reference step ``algo._step`` (same arguments,
same metrics, same numbers to float rounding), or None where it does not apply to this instance (for
example a network that is not a plain relu MLP). The base class's step runner asks :func:`fast_step`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[..., dict[str, Tensor]]
Factory = Callable[[Any, torch.dtype], StepFn | None]

_MODULES = ("offrl.fast.bc", "offrl.fast.cql_discrete", "offrl.fast.sac")
_FACTORIES: dict[type, Factory] = {}
_loaded = False


def register(*classes: type) -> Callable[[Factory], Factory]:
    """Decorator: the factory of the fast step of ``classes`` (exactly these classes, not subclasses)."""

    def deco(factory: Factory) -> Factory:
        for cls in classes:
            _FACTORIES[cls] = factory
        return factory

    return deco


def registered() -> dict[type, Factory]:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(mod)
        _loaded = True
    return dict(_FACTORIES)


def applies(fast_paths: bool, compile_mode: str | None, device: torch.device) -> bool:
    """Whether a registered fast step runs: with ``fast_paths``, eagerly everywhere and compiled on CPU.
    On CUDA a compiled step stays the autograd one, the one ``benchmarks/gpu_check.py`` checked there."""
    return fast_paths and (compile_mode is None or device.type == "cpu")


def fast_step(algo: Any, dtype: torch.dtype) -> StepFn | None:
    """The fast step of ``algo`` under its runtime, hidden layers in ``dtype``; None: run ``algo._step``."""
    rt = algo.runtime
    factory = registered().get(type(algo))
    if factory is None or not applies(rt.fast_paths, rt.compile, algo.device):
        return None
    return factory(algo, dtype)
