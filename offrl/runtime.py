"""Run-level settings: how a run computes, not what it learns.

An algorithm's config holds its hyperparameters only; the :class:`Runtime` holds the settings that
belong to the process and the device: torch threads, subnormal flushing, compute precision, compile,
CUDA graphs and the hand-written fast paths. Both trainers apply it once at start and record it in the
run's ``config.toml`` (section ``[runtime]``). Threads, precision and subnormal flushing change a
run's numbers, so they are part of what a run is a function of.

Older runs and grid files wrote some of these settings elsewhere (``precision`` and ``compile`` in the
algorithm's config, ``threads``, ``flush_denormal`` and ``cuda_graphs`` in ``[train]``);
:func:`migrate` moves them here, so those spellings keep working.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from offrl.config import option, validate

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

FLUSH_DENORMAL_HELP = (
    "flush subnormal floats to zero on CPU (x86 FTZ/DAZ, process-wide): Adam's moments of "
    "weights that stop getting gradient (dead relu units) decay into subnormals, where CPU "
    "arithmetic is ~100× slower; results differ from a run without it, so it is recorded"
)


@dataclass(frozen=True)
class Runtime:
    """How a run computes: set with ``--set runtime.KEY=VALUE`` (or the plain key), recorded in ``[runtime]``."""

    threads: int = option(
        2, "torch intra-op threads; results differ between thread counts, so it is recorded", low=1
    )
    flush_denormal: bool = option(True, FLUSH_DENORMAL_HELP)
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of hidden layers in update steps: 'bf16' runs them in bfloat16 (fast on CPUs "
        "with AMX/AVX-512 BF16) with float32 master weights, output layers, Q-values and losses",
    )
    compile: Literal["default", "max-autotune-no-cudagraphs"] | None = option(
        None,
        "torch.compile mode of update steps (none: eager); needs a C++ compiler on CPU and takes seconds "
        "on first use; a frame that fails to compile runs eagerly",
    )
    cuda_graphs: bool = option(
        True,
        "on CUDA, replay each update step of algorithms checked for it as a CUDA graph after 3 eager "
        "steps; no effect on CPU",
    )
    fast_paths: bool = option(
        True,
        "run the speed layer's hand-written update steps where one is registered (equal to the autograd "
        "reference step to float rounding); false: always the autograd reference step",
    )

    def __post_init__(self) -> None:
        validate(self, "runtime")

    def apply(self) -> None:
        """The process-wide settings of a run: intra-op threads, subnormal flushing and, with the fast
        paths, an allocator that keeps freed memory (see :func:`offrl.fast.memory.keep_freed_memory`)."""
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(self.flush_denormal)
        if self.fast_paths:
            from offrl.fast.memory import keep_freed_memory  # the speed layer imports this module

            keep_freed_memory()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of hidden layers that :attr:`precision` names."""
        return PRECISIONS[self.precision]


RUNTIME_KEYS = frozenset(f.name for f in dataclasses.fields(Runtime))
# where older configs kept a runtime setting: section -> keys that moved to [runtime]
LEGACY_SECTIONS: dict[str, frozenset[str]] = {
    "algo_config": frozenset({"precision", "compile"}),
    "train": frozenset({"threads", "flush_denormal", "cuda_graphs"}),
}


def migrate(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A run config document (as read from ``config.toml``) with runtime settings moved from their old
    sections (``[algo_config]`` precision/compile, ``[train]`` threads/flush_denormal/cuda_graphs)
    into ``[runtime]``. A key set in both places keeps the ``[runtime]`` value."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in doc.items()}
    runtime: dict[str, Any] = {}
    for section, keys in LEGACY_SECTIONS.items():
        table = out.get(section)
        if isinstance(table, dict):
            for key in keys & set(table):
                runtime[key] = table.pop(key)
    if runtime or "runtime" in out:
        existing = out.get("runtime")
        out["runtime"] = {**runtime, **(existing if isinstance(existing, Mapping) else {})}
    return out
