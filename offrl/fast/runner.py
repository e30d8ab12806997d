"""How one algorithm's update steps run under its runtime: the step the base class's ``_run_step`` calls."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from offrl.fast import registry, relu
from offrl.fast.compile import compiled
from offrl.fast.kernels import Kernels

StepFn = Callable[..., dict[str, Tensor]]


class StepRunner:
    """Chooses, per reference step of ``algo``, the function that runs it under ``algo.runtime``:

    - ``algo._step`` with a fast step registered for the algorithm's class (``runtime.fast_paths``):
      that step (:mod:`offrl.fast.registry`);
    - otherwise the reference step itself, through torch.compile (``runtime.compile``) for algorithms
      marked ``compile_safe``, with the networks' kernels in the runtime's precision for its duration.

    The algorithm's networks get their kernels (:class:`Kernels`) when the runner is made, after they
    are built.
    """

    def __init__(self, algo: Any) -> None:
        self.algo: Any = algo
        self.runtime = algo.runtime
        self.kernels = Kernels(algo.nets, self.runtime.dtype, self.runtime.fast_paths)
        self._steps: dict[Any, StepFn] = {}

    def step(self, fn: StepFn) -> StepFn:
        algo = self.algo
        key = (getattr(fn, "__func__", fn), algo.device)
        chosen = self._steps.get(key)
        if chosen is None:
            chosen = self._choose(fn)
            self._steps[key] = chosen
        return chosen

    def _choose(self, fn: StepFn) -> StepFn:
        algo, rt = self.algo, self.runtime
        reference = getattr(fn, "__self__", None) is algo and getattr(fn, "__name__", None) == "_step"
        if reference:
            fast = registry.fast_step(algo, relu.hidden_dtype(rt.dtype, algo.device))
            if fast is not None:
                return fast
        inner = compiled(fn, rt.compile) if getattr(algo, "compile_safe", False) else fn
        if rt.dtype == torch.float32:
            return inner
        kernels = self.kernels

        @functools.wraps(fn)
        def lowered(*args: Any) -> dict[str, Tensor]:
            with kernels.lowered():
                return inner(*args)

        return lowered
