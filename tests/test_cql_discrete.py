"""Discrete CQL: losses against hand computations, target-network handling, and conservatism on a
bandit whose dataset never shows some actions."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.cql_discrete import (
    DiscreteCQL,
    DiscreteCQLConfig,
    discrete_cql_penalty,
)
from offrl.algos.registry import algorithm_class
from offrl.errors import ConfigError
from offrl.types import Batch

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)


def make_batch(n: int, n_actions: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(n, 4, generator=g),
        actions=torch.randint(0, n_actions, (n,), generator=g),
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, 4, generator=g),
        terminals=(torch.rand(n, generator=g) < 0.2).float(),
    )


def make_algo(n_actions: int = 3, **overrides: object) -> DiscreteCQL:
    cfg = DiscreteCQLConfig(**{"hidden": (16, 16), "batch_size": 8, **overrides})  # type: ignore[arg-type]
    return DiscreteCQL(cfg, OBS_SPACE, gym.spaces.Discrete(n_actions), seed=0)


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- pure losses ---------------------------------------------------------------------------------
def test_cql_penalty_matches_hand_computation() -> None:
    q = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # lse = ln 3, data Q 0           → ln 3
            [1.0, 1.0, 1.0],  # lse = 1 + ln 3, data Q 1       → ln 3
            [0.0, math.log(2), math.log(3)],  # lse = ln 6, data Q ln 3 → ln 2
            [2.0, 0.0, 0.0],  # lse = ln(e² + 2), data Q 2    → ln(1 + 2e⁻²)
        ]
    )
    actions = torch.tensor([1, 0, 2, 0])
    expected = (math.log(3) + math.log(3) + math.log(2) + math.log(1 + 2 * math.exp(-2))) / 4
    assert discrete_cql_penalty(q, actions).item() == pytest.approx(expected, rel=1e-6)


def test_cql_penalty_is_zero_only_when_one_action_dominates() -> None:
    q = torch.tensor([[50.0, -50.0, -50.0]])
    assert discrete_cql_penalty(q, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    assert discrete_cql_penalty(q, torch.tensor([1])).item() == pytest.approx(100.0, rel=1e-6)


# -- config and registry -------------------------------------------------------------------------
def test_registered_as_discrete_cql() -> None:
    assert algorithm_class("cql", gym.spaces.Discrete(2)) is DiscreteCQL


@pytest.mark.parametrize(
    "bad",
    [
        {"target_update_interval": 0},
        {"cql_alpha": -1.0},
        {"tau": 0.0},
        {"target_update": "slow"},
        {"loss": "l1"},
    ],
)
def test_invalid_config_names_the_key(bad: dict[str, object]) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        DiscreteCQLConfig(**bad)  # type: ignore[arg-type]


def test_continuous_action_space_is_rejected() -> None:
    with pytest.raises(ConfigError, match="continuous"):
        DiscreteCQL(DiscreteCQLConfig(), OBS_SPACE, gym.spaces.Box(-1, 1, (2,)))


# -- algorithm -----------------------------------------------------------------------------------
def test_update_returns_detached_scalars_and_loss_combines_terms() -> None:
    algo = make_algo(cql_alpha=2.0)
    batch = make_batch(8, 3)
    terms = algo.loss_terms(batch)
    assert set(terms) == {"td_loss", "cql_penalty"}
    expected = (terms["td_loss"] + 2.0 * terms["cql_penalty"]).item()
    metrics = algo.update(batch)
    assert set(metrics) == {"loss", "td_loss", "cql_penalty", "q_data_mean", "q_max_mean"}
    for v in metrics.values():
        assert v.dim() == 0 and not v.requires_grad
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["q_max_mean"].item() >= metrics["q_data_mean"].item()
    assert algo.num_updates == 1


def test_hard_target_copies_only_every_interval() -> None:
    algo = make_algo(target_update_interval=3, lr=1e-2)
    initial = params(algo.q_target)
    for i in range(1, 7):
        algo.update(make_batch(8, 3, seed=i))
        for p in algo.q_target.parameters():
            assert p.grad is None
        if i % 3:
            assert not same(params(algo.q), params(algo.q_target)), i
            assert same(params(algo.q_target), initial), i
        else:
            assert same(params(algo.q), params(algo.q_target)), i
            initial = params(algo.q_target)


def test_soft_target_moves_by_tau_every_step() -> None:
    algo = make_algo(target_update="soft", tau=0.25, lr=1e-2)
    before = params(algo.q_target)
    algo.update(make_batch(8, 3))
    for old, new, online in zip(before, params(algo.q_target), params(algo.q), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)


def test_policy_is_greedy_on_q() -> None:
    algo = make_algo()
    policy = algo.policy()
    assert policy.kind == "q_greedy" and not policy.is_stochastic
    obs = make_batch(8, 3).obs
    with torch.no_grad():
        greedy = algo.q(obs).argmax(-1).numpy()
    np.testing.assert_array_equal(policy.act(obs.numpy()), greedy)


# -- conservatism --------------------------------------------------------------------------------
def _train_on_bandit(cql_alpha: float) -> torch.Tensor:
    """One-step bandit: 16 states, 4 actions; the data shows action 0 (reward 1) and action 1
    (reward 0), never 2 or 3. The Q-net starts optimistic about the unseen actions (their output
    rows zero, bias 3), as extrapolation error would make it. Returns Q (16, 4) on the states."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(16, 4, generator=g)
    obs = states.repeat(2, 1)
    actions = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    batch = Batch(obs, actions, (actions == 0).float(), obs, torch.ones(32))
    algo = make_algo(4, cql_alpha=cql_alpha, lr=3e-3, hidden=(32, 32), batch_size=32)
    with torch.no_grad():
        last = algo.q.net[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight[2:].zero_()
        last.bias[2:].fill_(3.0)
    for _ in range(300):
        algo.update(batch)
    with torch.no_grad():
        return algo.q(states)


def test_cql_keeps_unseen_actions_below_the_data_action_where_dqn_does_not() -> None:
    q_cql = _train_on_bandit(cql_alpha=1.0)
    q_dqn = _train_on_bandit(cql_alpha=0.0)
    # DQN fits the seen actions: Q(s, 0) ≈ 1, Q(s, 1) ≈ 0.
    torch.testing.assert_close(q_dqn[:, :2], torch.tensor([[1.0, 0.0]]).expand(16, 2), atol=0.05, rtol=0)
    # CQL keeps their order but shrinks the gap and underestimates: at its fixed point
    # d = Q(s,0) − Q(s,1) solves d = 3 − 4σ(d) ≈ 0.51, with Q(s, 0) = 2 − 2σ(d) ≈ 0.76.
    assert (q_cql[:, 0] > q_cql[:, 1] + 0.3).all()
    assert (q_cql[:, 0] < 0.9).all()
    # DQN never sees actions 2, 3: their optimistic values survive and the greedy action is unseen.
    assert (q_dqn[:, 2:].amax(1) > q_dqn[:, 0] + 1.0).all()
    assert (q_dqn.argmax(1) >= 2).all()
    # CQL pushes them below the data action in every state, so acting greedily picks action 0.
    assert (q_cql[:, 2:].amax(1) < q_cql[:, 0] - 0.5).all()
    assert (q_cql.argmax(1) == 0).all()
