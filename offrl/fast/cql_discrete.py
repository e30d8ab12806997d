"""Discrete CQL's hand-written step: double DQN + the CQL(H) penalty through explicit passes."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from offrl.algos.cql_discrete import DiscreteCQL
from offrl.fast import hand, relu
from offrl.fast.compile import compiled
from offrl.fast.optim import apply_gradients
from offrl.fast.registry import StepFn, register
from offrl.losses import double_q_target
from offrl.types import Batch


def cql_loss_and_grad(
    q_all: Tensor, actions: Tensor, target: Tensor, kind: Literal["huber", "mse"], alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # (B, A), (B,), (B,) -> 2 scalars, (B,), (B,), (B, A)
    """TD loss, CQL penalty, Q(s, a_data), max_a Q(s, a) and the gradient of ``td + alpha · penalty``
    w.r.t. ``q_all``.

    The penalty's gradient is (softmax(Q) − onehot(a_data))/B; the TD loss's reaches Q(s, a_data) only:
    clamp(δ, −1, 1)/B for Huber (δ = 1), 2δ/B for the squared error. Written out in elementary ops:
    torch's softmax, logsumexp and smooth-L1 kernels cost several times more on a few actions.
    """
    batch = q_all.shape[0]
    idx = actions.unsqueeze(1)
    q_data = q_all.gather(1, idx).squeeze(1)
    delta = q_data - target
    if kind == "huber":
        g_data = delta.clamp(-1.0, 1.0)  # Huber(δ) = c·(δ − c/2) with c = clamp(δ, −1, 1)
        td = torch.dot(g_data, torch.add(delta, g_data, alpha=-0.5)) / batch
    else:
        td = torch.dot(delta, delta) / batch
        g_data = delta.mul_(2.0)
    top = q_all.amax(dim=1, keepdim=True)
    grad = (q_all - top).exp_()
    total = grad.sum(dim=1, keepdim=True)
    grad.div_(total).mul_(alpha / batch)  # alpha · softmax(Q) / B
    penalty = (total.log_().add_(top).squeeze(1) - q_data).mean()  # logsumexp − Q(s, a_data)
    grad.scatter_add_(1, idx, g_data.sub_(alpha).div_(batch).unsqueeze(1))
    return td, penalty, q_data, top.squeeze(1), grad


def discrete_cql_grads(
    obs: Tensor,  # (B, obs_dim)
    next_obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B,) int64
    rewards: Tensor,  # (B,), already scaled
    terminals: Tensor,  # (B,)
    target_weights: list[Tensor],
    target_biases: list[Tensor],
    gamma: float,
    kind: Literal["huber", "mse"],
    alpha: float,
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of ``td + alpha · penalty`` w.r.t. the Q-network's parameters (see
    :func:`hand.run_hand_step`).

    The online network sees s and s′ in one forward (gradient only from the s rows); the target
    network's forward keeps no tape.
    """
    b = obs.shape[0]
    q_both, tape = relu.forward(weights, biases, torch.cat([obs, next_obs]), dtype, b)
    q_all, next_q_online = q_both[:b], q_both[b:]
    next_q_target = relu.forward(target_weights, target_biases, next_obs, dtype, 0)[0]
    target = double_q_target(rewards, terminals, next_q_online, next_q_target, gamma)
    td, penalty, q_data, q_max, grad = cql_loss_and_grad(q_all, actions, target, kind, alpha)
    metrics = {
        "loss": torch.add(td, penalty, alpha=alpha) if alpha != 0 else td,
        "td_loss": td,
        "cql_penalty": penalty,
        "q_data_mean": q_data.mean(),
        "q_max_mean": q_max.mean(),
    }
    return metrics, hand.mlp_grads(weights, tape, grad, out)


@register(DiscreteCQL)
def discrete_cql_step(algo: DiscreteCQL, dtype: torch.dtype) -> StepFn | None:
    """Plain relu Q-networks train through the hand-written passes (same numbers, fewer ops)."""
    layers = hand.relu_linears(algo.q.net)
    target_layers = hand.relu_linears(algo.q_target.net)
    if layers is None or target_layers is None:
        return None
    cfg, mode = algo.config, algo.runtime.compile
    fn = compiled(discrete_cql_grads, mode)

    def fast_step(batch: Batch) -> dict[str, Tensor]:
        rewards = batch.rewards * cfg.reward_scale if cfg.reward_scale != 1.0 else batch.rewards
        target_weights, target_biases = hand.weights(target_layers)
        metrics = hand.run_hand_step(
            fn,
            layers,
            batch.obs,
            batch.next_obs,
            batch.actions,
            rewards,
            batch.terminals,
            target_weights,
            target_biases,
            cfg.gamma,
            cfg.loss,
            cfg.cql_alpha,
            dtype=dtype,
            in_place=mode is None,
        )
        apply_gradients(algo.optimizers["q"], cfg.max_grad_norm)
        algo.soft_update_target()
        return metrics

    return fast_step
