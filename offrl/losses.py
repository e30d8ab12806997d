"""RL numerics shared by several algorithms, written once with one argument order each.

Pure functions of tensors, shapes in their docstrings (E critics, B rows, A actions). What belongs to
one algorithm (the CQL penalty, IQL's expectile loss, TD3+BC's actor loss, BCQ's VAE loss) stays in
that algorithm's file.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from offrl.errors import ConfigError


# -- targets ---------------------------------------------------------------------------------------
def td_target(rewards: Tensor, terminals: Tensor, next_v: Tensor, gamma: float) -> Tensor:
    """r + γ(1 − terminal)·V(s′): (B,), (B,), (B,) -> (B,).

    Every bootstrapped target goes through here. Only a true termination stops bootstrapping: a
    time-limit truncation never reaches a batch as a terminal (datasets and buffers keep the two
    apart), so targets bootstrap through timeouts.
    """
    return rewards + gamma * (1.0 - terminals) * next_v


def soft_td_target(
    rewards: Tensor, terminals: Tensor, next_q: Tensor, next_log_prob: Tensor, alpha: Tensor, gamma: float
) -> Tensor:
    """SAC's target, :func:`td_target` of the soft value min_e Q′_e(s′, a′) − α log π(a′|s′), a′ ~ π(·|s′):
    (B,), (B,), (E,B), (B,), () -> (B,)."""
    return td_target(rewards, terminals, next_q.min(0).values - alpha * next_log_prob, gamma)


def double_q_target(
    rewards: Tensor, terminals: Tensor, next_q_online: Tensor, next_q_target: Tensor, gamma: float
) -> Tensor:
    """:func:`td_target` of Q_target(s′, argmax_a′ Q_online(s′, a′)) (van Hasselt et al. 2016):
    (B,), (B,), (B,A), (B,A) -> (B,). Mask ``next_q_online`` to restrict the argmax (discrete BCQ)."""
    next_action = next_q_online.argmax(dim=1, keepdim=True)  # (B, 1)
    return td_target(rewards, terminals, next_q_target.gather(1, next_action).squeeze(1), gamma)


# -- critic losses ---------------------------------------------------------------------------------
def critic_loss(q: Tensor, target: Tensor) -> Tensor:
    """Squared TD error of a Q-ensemble, mean over the batch per critic, summed over critics (as TD3,
    SAC, CORL and BCQ's code): (E,B), (B,) -> ()."""
    return (q - target).pow(2).mean(-1).sum()


def td_loss(q: Tensor, target: Tensor, kind: Literal["huber", "mse"], delta: float = 1.0) -> Tensor:
    """Huber (quadratic within ±δ; δ = 1 as DQN) or squared TD error, mean over the batch: (B,), (B,) -> ()."""
    if kind == "huber":
        return F.huber_loss(q, target, delta=delta)
    if kind == "mse":
        return F.mse_loss(q, target)
    raise ConfigError(f"'loss' must be 'huber' or 'mse', got {kind!r}")


# -- SAC -------------------------------------------------------------------------------------------
def sac_actor_loss(q_pi: Tensor, log_prob: Tensor, alpha: Tensor) -> Tensor:
    """E[α log π(a|s) − min_e Q_e(s, a)], a ~ π(·|s): (E,B), (B,), () -> ()."""
    return (alpha * log_prob - q_pi.min(0).values).mean()


def sac_alpha_loss(log_alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """Temperature loss −E[log α·(log π + H̄)]; its gradient raises α while the entropy is below the
    target H̄: (), (B,) -> ()."""
    return -(log_alpha * (log_prob + target_entropy).detach()).mean()


# -- advantage-weighted regression -----------------------------------------------------------------
def advantage_weights(scaled_adv: Tensor, max_weight: float) -> Tensor:
    """exp(β·A) clipped above at ``max_weight``, constants for the actor: (B,) -> (B,).

    Takes β·A as the caller writes it (AWAC's A/λ, IQL's β·A), so each keeps its paper's rounding.
    """
    return torch.exp(scaled_adv.detach()).clamp(max=max_weight)


def weighted_nll_loss(log_prob: Tensor, weights: Tensor) -> Tensor:
    """Weighted negative log-likelihood of the dataset actions, weights constant: (B,), (B,) -> ()."""
    return -(weights.detach() * log_prob).mean()


# -- Monte-Carlo returns ---------------------------------------------------------------------------
def return_to_go(
    rewards: Tensor, terminals: Tensor, episode_ends: Tensor, gamma: float, reward_floor: float | None = None
) -> tuple[Tensor, Tensor]:
    """Discounted return-to-go of every row of a dataset's episodes, and the discount ``γ^k`` of what
    the episode leaves untracked: rewards (N,), terminals (N,), episode_ends (E,) exclusive row ends ->
    returns (N,), tail weight (N,), both float32.

    A row k steps before its episode's end sums γ^j·r over the k rows left. An episode whose last row
    is a termination has nothing after it (tail weight 0); a truncated one does, weighing γ^k. With
    ``reward_floor`` (e.g. the dataset's smallest reward) that tail is bounded below by
    γ^k·reward_floor/(1 − γ), so the returns stay lower bounds of the true value where rewards can be
    negative (Cal-QL's reference value); without it the tail counts as 0. Rows whose tail weight is
    small (γ^k < 0.05) have returns nearly free of that choice.
    """
    ends = episode_ends.to(torch.int64).cpu()
    lengths = ends - torch.cat([ends.new_zeros(1), ends[:-1]])  # (E,)
    n, width = int(ends[-1]), int(lengths.max())
    # every episode as a row of an (E, L) grid, right-aligned: column L - 1 holds each episode's last step
    episode = torch.repeat_interleave(torch.arange(len(ends)), lengths)  # (N,)
    column = torch.arange(n) - (ends - lengths)[episode] + (width - lengths)[episode]  # (N,)
    grid = torch.zeros(len(ends), width, dtype=torch.float64)
    grid[episode, column] = rewards.detach().cpu().to(torch.float64)
    returns = torch.zeros_like(grid)
    running = torch.zeros(len(ends), dtype=torch.float64)
    for k in range(width - 1, -1, -1):  # one vectorised step per column: L steps, not N
        running = grid[:, k] + gamma * running
        returns[:, k] = running
    truncated = terminals.detach().cpu()[ends - 1] == 0  # (E,): the last row is no termination
    steps_left = (width - column).to(torch.float64)  # (N,) rows from this one to the episode's end
    tail = torch.where(truncated[episode], gamma**steps_left, torch.zeros((), dtype=torch.float64))
    out = returns[episode, column]
    if reward_floor is not None:
        out = out + tail * (reward_floor / (1.0 - gamma))
    return out.float().to(rewards.device), tail.float().to(rewards.device)
