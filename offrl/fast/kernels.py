"""Faster computations of the network modules' own forward passes, installed on an algorithm's modules.

``offrl.nets`` modules are plain autograd modules; a relu :class:`~offrl.nets.EnsembleMLP` and the MLP
heads (actors, discrete heads) have a ``kernel`` slot the speed layer fills. :class:`Kernels` does so
for one algorithm from its runtime: with ``fast_paths``, relu ensembles run through
:func:`offrl.fast.relu.ensemble_mlp` once their matmuls outweigh its bookkeeping; inside an update step
of a ``precision="bf16"`` run (:meth:`Kernels.lowered`), ensembles and heads compute their hidden layers
in bfloat16. Outside update steps (acting, evaluation) they compute in float32.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.fast import relu

# Below this many observation features, projecting observations once per state (the split first
# layer) costs more memory passes over the (rows, hidden) activations than the matmul work it saves.
SPLIT_MIN_OBS = 32
# Ensembles with fewer rows × widest layer than this run through plain autograd ops in float32: the
# hand-written path only pays once the matmuls outweigh its Python bookkeeping.
FAST_MIN_SIZE = 256 * 1024


class EnsembleKernel:
    """A relu ensemble's forward through :func:`relu.ensemble_mlp`, hidden layers in ``dtype``; None
    (the module's plain forward) where it does not pay or does not apply."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, ens: nets.EnsembleMLP, state: Tensor | None, rest: Tensor) -> Tensor | None:
        if rest.dtype != torch.float32 or (state is not None and state.dtype != torch.float32):
            return None
        dt = relu.hidden_dtype(self.dtype, rest.device)
        if dt == torch.float32 and rest.shape[0] * ens.width < FAST_MIN_SIZE:
            return None
        if state is not None and state.shape[1] < SPLIT_MIN_OBS:
            rest = torch.cat([state.repeat_interleave(rest.shape[0] // state.shape[0], 0), rest], dim=1)
            state = None
        layers: list[nets.EnsembleLinear] = list(ens.layers)  # type: ignore[arg-type]
        return relu.ensemble_mlp(
            state, rest, [lin.weight for lin in layers], [lin.bias for lin in layers], dt
        )


_OUTPUT_SPLIT: weakref.WeakKeyDictionary[nn.Sequential, tuple[nn.Module, nn.Module, nn.Module | None]]
_OUTPUT_SPLIT = weakref.WeakKeyDictionary()


def _output_split(seq: nn.Sequential) -> tuple[nn.Module, nn.Module, nn.Module | None] | None:
    """``seq`` as (hidden part, output Linear, trailing activation or None), for MLPs as :func:`nets.mlp` builds."""
    if seq not in _OUTPUT_SPLIT:
        mods = list(seq)
        tail = mods.pop() if len(mods) > 1 and not isinstance(mods[-1], nn.Linear) else None
        if len(mods) < 2 or not isinstance(mods[-1], nn.Linear):
            return None
        _OUTPUT_SPLIT[seq] = (nn.Sequential(*mods[:-1]), mods[-1], tail)
    return _OUTPUT_SPLIT[seq]


class HeadKernel:
    """A policy-sized MLP ``seq(x)`` with its hidden layers under autocast in ``dtype``.

    Policy-sized MLPs are bound by per-op overhead, so their hidden layers simply run under autocast
    (the hand-written ensemble path does not pay at these sizes). The output layer stays float32, so
    actions, log-probabilities and Q-values keep float32 precision.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, seq: nn.Sequential, x: Tensor) -> Tensor:
        dt = relu.hidden_dtype(self.dtype, x.device)
        parts = _output_split(seq) if dt != torch.float32 and x.dtype == torch.float32 else None
        if parts is None:
            return seq(x)
        hidden, output, tail = parts
        with torch.autocast(x.device.type, dtype=dt):
            h = hidden(x)
        y = output(h.float())
        return y if tail is None else tail(y)


HEADS = (nets.TanhGaussianActor, nets.DeterministicActor, nets.DiscreteHead)


def relu_ensembles(root: nn.Module) -> list[nets.EnsembleMLP]:
    return [m for m in root.modules() if isinstance(m, nets.EnsembleMLP) and m.relu_hidden]


def accelerate(root: nn.Module) -> None:
    """Run the relu ensembles in ``root`` through the float32 fast path where it pays (for networks
    trained outside an algorithm, such as FQE's)."""
    for ens in relu_ensembles(root):
        ens.kernel = EnsembleKernel(torch.float32)


class Kernels:
    """The kernels of one algorithm's networks under its runtime (see the module docstring)."""

    def __init__(self, root: nn.Module, dtype: torch.dtype, fast_paths: bool) -> None:
        self.ensembles = relu_ensembles(root)
        self.heads = [m for m in root.modules() if isinstance(m, HEADS)]
        self.dtype = dtype
        self.resting = EnsembleKernel(torch.float32) if fast_paths else None
        self.low = (EnsembleKernel(dtype), HeadKernel(dtype))
        for ens in self.ensembles:
            ens.kernel = self.resting

    @contextlib.contextmanager
    def lowered(self) -> Iterator[None]:
        """Within the block (one update step), hidden layers compute in the runtime's dtype."""
        if self.dtype == torch.float32:
            yield
            return
        ens_kernel, head_kernel = self.low
        for ens in self.ensembles:
            ens.kernel = ens_kernel
        for head in self.heads:
            head.kernel = head_kernel
        try:
            yield
        finally:
            for ens in self.ensembles:
                ens.kernel = self.resting
            for head in self.heads:
                head.kernel = None
