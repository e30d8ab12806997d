"""IQL (continuous and discrete): losses against hand computations, wiring of the three regressions,
and learning on the built-in mixed datasets."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from offrl.algos.iql import (
    IQL,
    IQLConfig,
    expectile_loss,
    iql_q_loss,
)
from offrl.algos.iql_discrete import DiscreteIQL, gather_actions
from offrl.errors import ConfigError
from offrl.types import Batch
from tests.learning import median, scores

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
SMALL = IQLConfig(hidden=(16, 16), batch_size=8)


def make(discrete: bool, seed: int = 0) -> IQL:
    if discrete:
        return DiscreteIQL(SMALL, OBS_SPACE, gym.spaces.Discrete(2), seed=seed)
    return IQL(SMALL, OBS_SPACE, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), seed=seed)


def batch(discrete: bool, n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    actions = (
        torch.randint(0, 2, (n,), generator=g) if discrete else torch.rand(n, 2, generator=g) * 1.8 - 0.9
    )
    return Batch(
        obs=torch.randn(n, 3, generator=g),
        actions=actions,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, 3, generator=g),
        terminals=torch.tensor([0.0, 1.0] * (n // 2)),
    )


# -- pure losses ---------------------------------------------------------------------------------
def test_expectile_loss_hand_computed() -> None:
    # τ = 0.7: positive diffs weigh 0.7, negative 0.3
    # 0.7·4 + 0.3·1 + 0.7·0.25 + 0.3·9 = 2.8 + 0.3 + 0.175 + 2.7 = 5.975, mean over 4 = 1.49375
    got = expectile_loss(torch.tensor([2.0, -1.0, 0.5, -3.0]), 0.7)
    assert got.item() == pytest.approx(1.49375)
    # τ = 0.5 is half the mean squared error: 0.5·(4 + 1)/2
    assert expectile_loss(torch.tensor([2.0, -1.0]), 0.5).item() == pytest.approx(1.25)


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_minimiser_is_the_expectile(tau: float) -> None:
    # for targets {0, 1} and v in (0, 1): d/dv [ (1−τ)·v² + τ·(1 − v)² ] / 2 = 0 at v = τ
    targets = torch.tensor([0.0, 1.0])
    grid = torch.linspace(0.0, 1.0, 201)
    losses = torch.stack([expectile_loss(targets - v, tau) for v in grid])
    assert grid[losses.argmin()].item() == pytest.approx(tau, abs=1e-6)


def test_q_loss_averages_over_critics_and_batch() -> None:
    # errors² against (6, 2): critic 0 → (0, 4), critic 1 → (1, 4); mean 9/4
    loss = iql_q_loss(torch.tensor([[6.0, 0.0], [5.0, 4.0]]), torch.tensor([6.0, 2.0]))
    assert loss.item() == pytest.approx(2.25)


def test_gather_actions_picks_each_rows_action_in_every_member() -> None:
    values = torch.arange(12.0).view(2, 2, 3)  # (E=2, B=2, A=3)
    torch.testing.assert_close(
        gather_actions(values, torch.tensor([2, 0])), torch.tensor([[2.0, 3.0], [8.0, 9.0]])
    )
    torch.testing.assert_close(gather_actions(values[0], torch.tensor([1, 1])), torch.tensor([1.0, 4.0]))


def test_config_rejects_bad_values() -> None:
    for bad in ({"expectile": 1.0}, {"expectile": 0.0}, {"beta": -1.0}, {"tau": 0.0}, {"max_weight": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            IQLConfig(**bad)  # type: ignore[arg-type]


# -- wiring ----------------------------------------------------------------------------------------
def _pick_first_feature(in_dim: int) -> nn.Linear:
    """A stand-in value net V(s) = s[0]."""
    lin = nn.Linear(in_dim, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 1.0
        lin.bias.zero_()
    return lin


@pytest.mark.parametrize("discrete", [False, True])
def test_critic_regresses_on_value_of_next_state(discrete: bool) -> None:
    algo = make(discrete)
    algo.nets["value"] = _pick_first_feature(3)
    b = batch(discrete)
    with torch.no_grad():
        q = algo.q_data(algo.critic, b.obs, b.actions)  # (E, B)
    # target r + γ(1 − terminal)·s′[0]: odd rows are terminal and take the reward alone
    target = b.rewards + 0.99 * (1.0 - b.terminals) * b.next_obs[:, 0]
    assert torch.equal(target[1::2], b.rewards[1::2])
    expect = ((q - target) ** 2).mean()
    got = algo.loss_terms(b)["critic"]
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("discrete", [False, True])
def test_value_regresses_on_target_critics_minimum(discrete: bool) -> None:
    algo = make(discrete)
    b = batch(discrete)
    with torch.no_grad():
        q_t = algo.q_data(algo.critic_target, b.obs, b.actions)  # (E, B)
        v = algo.value(b.obs).squeeze(-1)
        for p in algo.critic.parameters():  # the online critic must not enter the value loss
            p.add_(1.0)
    diff = torch.minimum(q_t[0], q_t[1]) - v
    expect = (torch.where(diff < 0, 0.3, 0.7) * diff**2).mean()
    assert algo.loss_terms(b)["value"].item() == pytest.approx(expect.item(), rel=1e-5)


def test_discrete_actor_loss_is_weighted_log_softmax_of_data_action() -> None:
    algo = make(discrete=True)
    head = algo.actor.net[-1]  # type: ignore[index]
    with torch.no_grad():  # logits (0, ln 3) everywhere: π = (1/4, 3/4)
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    obs, actions = torch.randn(2, 3), torch.tensor([1, 0])
    torch.testing.assert_close(algo.log_prob(obs, actions), torch.tensor([math.log(0.75), math.log(0.25)]))


def test_continuous_actor_likelihood_accepts_actions_on_the_bounds() -> None:
    algo = make(discrete=False)
    log_prob = algo.log_prob(torch.randn(3, 3), torch.tensor([[1.0, -1.0], [0.0, 0.5], [-1.0, 1.0]]))
    assert torch.isfinite(log_prob).all() and log_prob.requires_grad


# -- learning ----------------------------------------------------------------------------------------
# Measured (64×64 nets, critic/value lr 1e-3, 1 thread): pendulum-mixed 40 passes → 100.2, 99.0, 100.1
# (β = 0, i.e. likelihood BC through the same code: 60.2, 40.5, 50.9; plain BC ≈ 26);
# cartpole-mixed 30 passes → 87.9, 87.2, 88.4 (β = 0: −2.5, −2.6, −2.6; plain BC ≈ 18).
@pytest.mark.slow
def test_iql_learns_mixed_pendulum(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/pendulum-mixed")
    got = scores("iql", data, tmp_path, epochs=40, hidden=(64, 64), critic_lr=1e-3, value_lr=1e-3)
    assert median(got) >= 80, got


@pytest.mark.slow
def test_discrete_iql_learns_mixed_cartpole(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/cartpole-mixed")
    got = scores("iql", data, tmp_path, epochs=30, hidden=(64, 64), critic_lr=1e-3, value_lr=1e-3)
    assert median(got) >= 60, got
