"""Learning diagnostics at pass ends, logged under ``diag/``: do the algorithm's Q-values track the
returns the data actually got, and how far does its policy stray from the data's actions?

- ``diag/q_data_mean``, ``diag/return_mean``, ``diag/q_return_gap``: the Q-value of dataset actions
  against their discounted Monte-Carlo return-to-go, as the normalised absolute gap
  mean |Q − G| / (|G| + 1) (returns can be negative, so no ratio). Only rows whose untracked tail
  weighs under 5% (γ^k < 0.05 before a truncation k rows ahead, or any row of a terminated episode)
  take part, so the check does not lean on the learned value itself. A gap that grows pass after pass
  while evaluation falls is over-estimation; a gap that shrinks slowly is under-training.
- ``diag/q_policy_minus_data``: mean Q(s, π(s)) − Q(s, a_data), the policy's deterministic actions
  against the data's: how much better than the data the critic believes its policy to be.
- ``diag/action_mse`` (Box actions, learning units in [−1, 1]) or ``diag/action_disagreement``
  (Discrete): the policy's distance from the data's actions.

They read a fixed sample of rows (the same every pass) and touch no random stream of the run, so a
run's numbers are the same with or without them. Where no row qualifies for the return comparison (a
task that never terminates and truncates sooner than the tail allows, e.g. Pendulum's 200 steps at
γ = 0.99), the rows are a sample of all rows and the two return metrics are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from offrl import losses
from offrl.data.dataset import TransitionDataset

TAIL_MAX = 0.05  # largest weight γ^k of the untracked tail for a row to take part
SAMPLE_ROWS = 4096


@dataclass(frozen=True)
class DiagnosticRows:
    """A fixed sample of dataset rows with their returns-to-go."""

    raw_obs: Tensor  # (M, *obs_shape) as recorded: the policy normalises them itself
    obs: Tensor  # (M, obs_dim) in learning units, for the critics
    actions: Tensor  # (M, A) in [-1, 1] | (M,) int64
    returns: Tensor | None  # (M,) discounted return-to-go, in the algorithm's reward units; None: no
    # row's return-to-go is free of the untracked tail (e.g. Pendulum: 200-step episodes, never terminal)


def diagnostic_rows(
    dataset: TransitionDataset,
    train_data: TransitionDataset,
    gamma: float,
    *,
    reward_scale: float = 1.0,
    size: int = SAMPLE_ROWS,
    seed: int = 0,
) -> DiagnosticRows | None:
    """Up to ``size`` rows (seeded, sorted) whose return-to-go is nearly free of the untracked tail, with
    their returns; where the dataset has no such row, a sample of all rows without returns (the metrics
    that need no return are still logged); None for an empty dataset. ``train_data`` is ``dataset`` in
    learning units."""
    returns, tail = losses.return_to_go(dataset.rewards, dataset.terminals, dataset.episode_ends, gamma)
    eligible = (tail < TAIL_MAX).nonzero().squeeze(1).cpu()
    with_returns = eligible.numel() > 0
    if not with_returns:
        eligible = torch.arange(len(dataset))
    if eligible.numel() == 0:
        return None
    order = torch.randperm(eligible.numel(), generator=torch.Generator().manual_seed(seed))
    rows = eligible[order[:size]].sort().values.to(dataset.device)
    return DiagnosticRows(
        raw_obs=dataset.observations.index_select(0, rows),
        obs=train_data.observations.index_select(0, rows),
        actions=train_data.actions.index_select(0, rows),
        returns=returns.index_select(0, rows) * reward_scale if with_returns else None,
    )


@torch.no_grad()
def diagnose(algo: Any, rows: DiagnosticRows) -> dict[str, float]:
    """The ``diag/`` metrics (without the prefix) of ``algo`` on ``rows``; empty for an algorithm that
    has no Q-values (``algo.q_values`` returns None)."""
    q = algo.q_values(rows.obs, rows.actions)
    if q is None:
        return {}
    g = rows.returns
    pi = algo.policy().act_tensor(rows.raw_obs, deterministic=True)
    out = {"q_data_mean": q.mean(), "q_policy_minus_data": (algo.q_values(rows.obs, pi) - q).mean()}
    if g is not None:
        out["return_mean"] = g.mean()
        out["q_return_gap"] = ((q - g).abs() / (g.abs() + 1.0)).mean()
    if algo.discrete:
        out["action_disagreement"] = (pi != rows.actions).float().mean()
    else:
        out["action_mse"] = (pi - rows.actions).pow(2).mean()
    return {k: float(v) for k, v in out.items()}  # one host sync per pass
