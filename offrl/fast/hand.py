"""What the hand-written update steps share: finding plain relu networks, and putting gradients computed
by :mod:`offrl.fast.relu` where the optimisers read them.

A hand-written step runs the maths of an algorithm's autograd reference step as explicit passes: the
forward keeps the hidden activations, the loss's gradient w.r.t. the outputs is written out
analytically, and :func:`relu.backward` writes every parameter's ``.grad`` (overwriting, as
``zero_grad(set_to_none=True)`` + ``backward`` would). Its gradient functions are functions of tensors
only, so that they compile once for every instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.fast import relu

GradsFn = Callable[..., tuple[dict[str, Tensor], list[Tensor]]]


def relu_linears(seq: nn.Module, output_activation: type[nn.Module] | None = None) -> list[nn.Linear] | None:
    """The Linear layers of ``seq`` if it is ``Linear, ReLU, …, Linear`` with float32 parameters, followed
    by an ``output_activation`` module when one is given (the caller applies it); otherwise None."""
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if output_activation is not None:
        if not mods or type(mods[-1]) is not output_activation:
            return None
        mods.pop()
    linears = mods[::2]
    if len(mods) < 3 or len(mods) % 2 == 0 or not all(type(m) is nn.ReLU for m in mods[1::2]):
        return None
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return None
    if any(p.dtype != torch.float32 for m in linears for p in m.parameters()):
        return None
    return linears  # type: ignore[return-value]


def relu_ensemble_linears(ens: nn.Module) -> list[nets.EnsembleLinear] | None:
    """The layers of ``ens`` if it is a relu :class:`nets.EnsembleMLP` with float32 parameters; otherwise None."""
    if not isinstance(ens, nets.EnsembleMLP) or not ens.relu_hidden:
        return None
    if any(p.dtype != torch.float32 for p in ens.parameters()):
        return None
    return list(ens.layers)  # type: ignore[arg-type]


def params(layers: Sequence[nn.Module]) -> list[Tensor]:
    """``[w₀, b₀, w₁, b₁, …]`` of Linear or EnsembleLinear layers."""
    return [p for lin in layers for p in (lin.weight, lin.bias)]  # type: ignore[misc]


def weights(layers: Sequence[nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
    """The layers' weights in ``x @ W`` orientation and their biases, as :mod:`offrl.fast.relu` takes them."""
    ws: list[Tensor] = [lin.weight.t() if isinstance(lin, nn.Linear) else lin.weight for lin in layers]  # type: ignore[misc]
    return ws, [lin.bias for lin in layers]  # type: ignore[misc]


def set_grads(ps: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Make ``grads`` the parameters' ``.grad`` (those written in place already are left as they are)."""
    for p, g in zip(ps, grads, strict=True):
        if p.grad is not g:
            p.grad = g


def run_hand_step(
    grads_fn: GradsFn, layers: Sequence[nn.Linear], *inputs: Any, dtype: torch.dtype, in_place: bool = True
) -> dict[str, Tensor]:
    """Run a hand-written step's gradient function and leave its gradients in the layers' ``.grad``.

    ``grads_fn(*inputs, weights, biases, dtype, out) -> (metrics, grads)`` computes the float32
    gradients ``[w₀, b₀, w₁, b₁, …]`` of the relu MLP ``layers`` (weights in ``x @ W`` orientation,
    hidden layers in ``dtype``) from tensors alone, writing them into ``out`` where given. With
    ``in_place`` they go straight into existing ``.grad`` memory; a compiled ``grads_fn`` returns fresh
    ones instead (writes into its inputs would only be copied back).
    """
    ps = params(layers)
    out = [p.grad for p in ps] if in_place else None
    ws, bs = weights(layers)
    metrics, grads = grads_fn(*inputs, ws, bs, dtype, out)
    set_grads(ps, grads)
    return metrics


def mlp_grads(
    ws: Sequence[Tensor], tape: relu.Tape, grad: Tensor, out: Sequence[Tensor | None] | None
) -> list[Tensor]:
    """Every parameter's float32 gradient of a relu MLP from the gradient w.r.t. its kept rows' outputs."""
    grads, _, _ = relu.backward(tape, grad, out=out)
    return grads  # type: ignore[return-value]
