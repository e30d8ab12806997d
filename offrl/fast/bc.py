"""BC's hand-written step: the deterministic tanh policy (MSE) and the categorical policy (cross-entropy)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from offrl.algos.bc import BC, DiscreteBC, bc_cross_entropy_loss
from offrl.fast import hand, relu
from offrl.fast.compile import compiled
from offrl.fast.optim import apply_gradients
from offrl.fast.registry import StepFn, register
from offrl.types import Batch


def tanh_mse_loss_and_grad(pre: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:  # (B, A), (B, A)
    """``bc_mse_loss`` of ``tanh(pre)`` and its gradient w.r.t. ``pre``: 2·(a − target)·(1 − a²)/(B·A)."""
    a = torch.tanh(pre)
    diff = a - target
    grad = torch.addcmul(diff, diff, a.square_(), value=-1.0).mul_(2.0 / diff.numel())
    return diff.square_().mean(), grad


def cross_entropy_loss_and_grad(logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:  # (B, N), (B,)
    """``bc_cross_entropy_loss`` and its gradient w.r.t. ``logits``: (softmax − onehot(actions))/B."""
    idx = actions.unsqueeze(1)
    grad = torch.softmax(logits, dim=1)
    grad.scatter_add_(1, idx, torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return bc_cross_entropy_loss(logits, actions), grad.div_(logits.shape[0])


def deterministic_bc_grads(
    obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B, A)
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of ``bc_mse_loss`` of ``tanh(MLP(obs))`` (see :func:`hand.run_hand_step`)."""
    pre, tape = relu.forward(weights, biases, obs, dtype)
    loss, grad = tanh_mse_loss_and_grad(pre, actions)
    return {"loss": loss}, hand.mlp_grads(weights, tape, grad, out)


def categorical_bc_grads(
    obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B,) int64
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of ``bc_cross_entropy_loss`` of the MLP's logits."""
    logits, tape = relu.forward(weights, biases, obs, dtype)  # (B, N)
    loss, grad = cross_entropy_loss_and_grad(logits, actions)
    grads = hand.mlp_grads(weights, tape, grad, out)
    accuracy = (logits.argmax(-1) == actions).float().mean()
    return {"loss": loss, "accuracy": accuracy}, grads


@register(BC, DiscreteBC)
def bc_step(algo: BC | DiscreteBC, dtype: torch.dtype) -> StepFn | None:
    """The deterministic and the categorical policy train through the hand-written passes; the Gaussian
    policy keeps its reference step."""
    net = cast(nn.Module, algo.nets["actor"].net)
    grads_fn: hand.GradsFn
    if algo.discrete:
        layers, grads_fn = hand.relu_linears(net), categorical_bc_grads
    elif algo.config.policy == "deterministic":
        layers, grads_fn = hand.relu_linears(net, nn.Tanh), deterministic_bc_grads
    else:
        return None
    if layers is None:
        return None
    linears = layers
    mode = algo.runtime.compile
    fn = compiled(grads_fn, mode)

    def fast_step(batch: Batch) -> dict[str, Tensor]:
        metrics = hand.run_hand_step(
            fn, linears, batch.obs, batch.actions, dtype=dtype, in_place=mode is None
        )
        apply_gradients(algo.optimizers["actor"], algo.config.max_grad_norm)
        return metrics

    return fast_step
