"""Update steps replayed as CUDA graphs (the runtime's ``cuda_graphs`` setting)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# eager steps per distinct step before capture (allocator, cuBLAS and optimiser state settle)
CUDA_GRAPH_WARMUP = 3


class CudaGraphSteps:
    """Runs an algorithm's update step as a replayed CUDA graph: one launch instead of hundreds.

    At batch 256 a CQL step is a few hundred small kernels, so on a GPU it is bound by launch
    latency, not arithmetic. Each distinct step (function, static arguments, batch shapes) first runs
    eagerly ``warmup`` times on a side stream, then is captured once and replayed: the batch is copied
    into the graph's static input tensors, the graph replays, and its metrics come back as fresh tensors.

    What a captured step must satisfy (the algorithms that opt in are checked on a GPU by
    ``benchmarks/gpu_check.py``): every tensor it reads or writes outside the batch keeps its storage
    (parameters are updated in place, optimisers are capturable), its randomness comes from
    ``generators``, it makes no host sync and no host-dependent branch beyond its static arguments.
    Anything that replaces parameter or optimiser-state storage (loading a state, moving devices)
    must drop this object and start a new one.
    """

    def __init__(self, generators: Sequence[torch.Generator], warmup: int = CUDA_GRAPH_WARMUP) -> None:
        self.generators = list(generators)
        self.warmup = warmup
        self._steps: dict[Any, _Step] = {}

    @staticmethod
    def supported() -> bool:
        """Graphs need CUDA and registration of the algorithms' own generators (torch >= 2.5)."""
        return torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "register_generator_state")

    @property
    def captured(self) -> int:
        """How many distinct steps replay as graphs."""
        return sum(s.graph is not None for s in self._steps.values())

    def run(
        self, fn: Callable[..., dict[str, Tensor]], batch: Any, args: tuple[Any, ...]
    ) -> dict[str, Tensor]:
        inputs = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
        key = (
            getattr(fn, "__name__", id(fn)),
            tuple(a if isinstance(a, (bool, int, float, str, type(None))) else id(a) for a in args),
            tuple((tuple(t.shape), t.dtype) for t in inputs),
        )
        step = self._steps.get(key)
        if step is None:
            # warm-up steps read the same static tensors as the capture, so a compiled step meets
            # no new guard (and recompiles, which a capture cannot) when it is captured
            static = [t.clone() for t in inputs]
            fields = dataclasses.fields(batch)
            step = _Step(
                static, dataclasses.replace(batch, **{f.name: t for f, t in zip(fields, static, strict=True)})
            )
            self._steps[key] = step
        else:
            torch._foreach_copy_(step.inputs, inputs)
        if step.graph is None:
            if step.eager_calls < self.warmup:
                step.eager_calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = fn(step.batch, *args)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(step, fn, args)
        step.graph.replay()
        assert step.metrics is not None  # set with the graph
        return dict(zip(step.names, step.metrics.clone().unbind(), strict=True))

    def _capture(self, step: _Step, fn: Callable[..., dict[str, Tensor]], args: tuple[Any, ...]) -> None:
        graph = torch.cuda.CUDAGraph()
        default = torch.cuda.default_generators
        for g in self.generators:
            if g not in default:
                graph.register_generator_state(g)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            metrics = fn(step.batch, *args)
            stacked = torch.stack([m.reshape(()).float() for m in metrics.values()])
        step.graph, step.names, step.metrics = graph, list(metrics), stacked


@dataclasses.dataclass
class _Step:
    """One distinct update step: its static batch, then (once captured) its graph and metric slots."""

    inputs: list[Tensor]  # the batch's static copies, in field order
    batch: Any  # the batch built from them
    eager_calls: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    names: list[str] = dataclasses.field(default_factory=list)
    metrics: Tensor | None = None  # (n_metrics,) float32, rewritten by each replay
