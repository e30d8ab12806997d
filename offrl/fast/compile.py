"""torch.compile of update steps (the runtime's ``compile`` setting)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def compiled(fn: Callable[..., T], mode: str | None) -> Callable[..., T]:
    """``fn`` through ``torch.compile(mode=mode)`` (``mode`` None: ``fn`` itself), falling back cleanly.

    A frame that fails to compile runs eagerly (dynamo's ``suppress_errors``), and if compiling is not
    possible at all here, ``fn`` runs eagerly with a warning. Compilation happens on the first call.
    """
    if mode is None:
        return fn
    try:
        inner = torch.compile(fn, mode=mode)
    except Exception as exc:  # any failure to set up compilation means: run eagerly
        warnings.warn(f"torch.compile unavailable ({exc}); running eagerly", RuntimeWarning, stacklevel=2)
        return fn

    def run(*args: Any) -> T:
        with torch._dynamo.config.patch(suppress_errors=True):
            return inner(*args)

    return run
