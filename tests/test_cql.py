"""Continuous CQL: loss functions against hand computations, sampling, batching, updates."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.cql import (
    CQL,
    CQLConfig,
    alpha_prime_loss,
    cql_penalty,
    sample_n,
)
from offrl.errors import ConfigError
from offrl.types import Batch
from tests.batches import random_batch

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
SMALL = {"actor_hidden": (32, 32), "critic_hidden": (32, 32), "batch_size": 64, "n_actions": 4}


def make(act_dim: int = 1, seed: int = 0, **overrides: object) -> CQL:
    act_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
    return CQL(CQLConfig(**{**SMALL, **overrides}), OBS_SPACE, act_space, seed=seed)  # type: ignore[arg-type]


# -- pure losses ---------------------------------------------------------------------------------
def test_cql_penalty_hand_computed() -> None:
    ln3 = math.log(3.0)
    q_data = torch.tensor([[1.0]])
    # logsumexp(ln 3, 0) = ln(3 + 1) = ln 4
    got = cql_penalty(q_data, torch.tensor([[[ln3, 0.0]]]), torch.zeros(1, 2), 1.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(math.log(4.0) - 1.0, abs=1e-6)
    # importance weighting subtracts the log density: Q = 0 with density 1/3 weighs like Q = ln 3
    got = cql_penalty(q_data, torch.zeros(1, 1, 2), torch.tensor([[-ln3, 0.0]]), 1.0)
    assert got.item() == pytest.approx(math.log(4.0) - 1.0, abs=1e-6)
    # temperature 2: 2·logsumexp((2 ln 3, 0)/2) = 2 ln 4
    got = cql_penalty(torch.zeros(1, 1), torch.tensor([[[2 * ln3, 0.0]]]), torch.zeros(1, 2), 2.0)
    assert got.item() == pytest.approx(2 * math.log(4.0), abs=1e-6)


def test_cql_penalty_per_critic_mean_over_batch() -> None:
    # E=2, B=2, M=1: logsumexp of one value is that value
    q_sampled = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]]])
    log_density = torch.tensor([[0.0], [-1.0]])
    q_data = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    # critic 0: (1 − 0, 4 − 2) → 1.5; critic 1: (2 − 0, 3 − 0) → 2.5
    got = cql_penalty(q_data, q_sampled, log_density, 1.0)
    torch.testing.assert_close(got, torch.tensor([1.5, 2.5]))


def test_alpha_prime_loss_value_and_direction() -> None:
    log_ap = torch.tensor(0.0, requires_grad=True)
    penalty = torch.tensor([2.0, 4.0], requires_grad=True)
    loss = alpha_prime_loss(log_ap.exp(), penalty, cql_alpha=5.0, target_gap=10.0)
    assert loss.item() == pytest.approx(-(5.0 * (2 - 10) + 5.0 * (4 - 10)))
    loss.backward()
    assert log_ap.grad is not None and log_ap.grad.item() > 0  # gap below target → α' decreases
    assert penalty.grad is None


# -- sampling and batching -----------------------------------------------------------------------
def test_uniform_proposals_span_the_box_and_policy_logprobs_are_detached() -> None:
    algo = make(act_dim=3, n_actions=10)
    batch = random_batch(256, act_dim=3)
    actions, log_density, next_actions, next_log_prob = algo.penalty_actions(batch.obs, batch.next_obs)
    assert actions.shape == (256, 30, 3) and log_density.shape == (256, 30)
    assert next_actions.shape == (256, 10, 3) and next_log_prob.shape == (256, 10)
    uniform = actions[:, :10]
    assert uniform.min() < -0.9 and uniform.max() > 0.9
    assert uniform.abs().max() <= 1.0
    assert abs(uniform.mean().item()) < 0.05 and abs(uniform.var().item() - 1 / 3) < 0.03
    torch.testing.assert_close(log_density[:, :10], torch.full((256, 10), -3 * math.log(2.0)))
    assert not actions.requires_grad and not log_density.requires_grad
    # the target reuses exactly the π(s′) draws of the penalty
    torch.testing.assert_close(actions[:, 20:], next_actions)
    torch.testing.assert_close(log_density[:, 20:], next_log_prob)


def test_policy_proposals_come_from_their_own_rows() -> None:
    algo = make(act_dim=2, n_actions=3)
    last = algo.actor.net[-1]
    with torch.no_grad():  # log_std → clamp minimum, so samples sit on tanh(mean)
        last.weight[2:].zero_()
        last.bias[2:].fill_(-20.0)
    batch = random_batch(8, act_dim=2)
    next_obs = -3.0 * batch.obs
    actions, log_density, _, _ = algo.penalty_actions(batch.obs, next_obs)
    mode_s, mode_next = algo.actor.mode(batch.obs), algo.actor.mode(next_obs)
    assert (mode_s - mode_next).abs().max() > 0.2  # the check below can tell s from s′
    torch.testing.assert_close(actions[:, 3:6], mode_s.unsqueeze(1).expand(-1, 3, -1), atol=0.05, rtol=0)
    torch.testing.assert_close(actions[:, 6:9], mode_next.unsqueeze(1).expand(-1, 3, -1), atol=0.05, rtol=0)
    with torch.no_grad():
        expect = algo.actor.log_prob(batch.obs.unsqueeze(1).expand(-1, 3, -1), actions[:, 3:6])
    torch.testing.assert_close(log_density[:, 3:6], expect, atol=0.05, rtol=1e-3)


def test_sample_n_draws_like_the_actor_on_repeated_rows() -> None:
    algo = make(act_dim=2)
    obs = torch.randn(5, 2)
    got = sample_n(algo.actor, obs, 4, torch.Generator().manual_seed(9))
    expect = algo.actor.sample(obs.unsqueeze(1).expand(-1, 4, -1), torch.Generator().manual_seed(9))
    assert got[0].shape == (5, 4, 2) and got[1].shape == (5, 4)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e.detach())
    assert got[0].std(1).min() > 0  # distinct draws per row, not one draw repeated


def test_critic_values_match_one_by_one_evaluation() -> None:
    algo = make(act_dim=2, n_critics=3)
    batch = random_batch(5, act_dim=2)
    sampled = torch.rand(5, 4, 2) * 2 - 1
    q_data, q_sampled = algo.critic_values(batch.obs, batch.actions, sampled)
    assert q_data.shape == (3, 5) and q_sampled.shape == (3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(q_data, algo.critic(batch.obs, batch.actions))
        for m in range(4):
            torch.testing.assert_close(q_sampled[:, :, m], algo.critic(batch.obs, sampled[:, m]))


# -- the algorithm -------------------------------------------------------------------------------


def test_update_metrics_are_detached_scalars_and_deterministic() -> None:
    batch = random_batch()
    runs = []
    for _ in range(2):
        algo = make(lagrange=True, seed=3)
        with torch.autograd.set_detect_anomaly(False):
            metrics = [algo.update(batch) for _ in range(3)]
        runs.append(metrics[-1])
        assert algo.num_updates == 3
    expected = {
        "critic_loss", "td_loss", "cql_penalty", "actor_loss", "alpha", "alpha_loss", "q_data_mean",
        "q_sampled_logsumexp_mean", "alpha_prime",
    }  # fmt: skip
    assert expected <= set(runs[0])
    for k, v in runs[0].items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
        assert torch.equal(v, runs[1][k]), k


@pytest.mark.parametrize("target_gap, direction", [(10.0, -1), (-10.0, 1)])
def test_lagrange_alpha_prime_moves_towards_the_target_gap(target_gap: float, direction: int) -> None:
    algo = make(lagrange=True, target_action_gap=target_gap, alpha_prime_lr=1e-2)
    batch = random_batch()
    metrics = [algo.update(batch) for _ in range(5)]
    gap = metrics[0]["cql_penalty"].item()
    assert -10.0 < gap < 10.0  # the initial gap lies between the two targets
    alpha_prime = metrics[-1]["alpha_prime"].item()
    assert (alpha_prime - 1.0) * direction > 0.02


def _likelihood_gain(bc_steps: int) -> float:
    algo = make(bc_steps=bc_steps, actor_lr=1e-3)
    batch = random_batch()
    batch = Batch(
        batch.obs, torch.full_like(batch.actions, 0.6), batch.rewards, batch.next_obs, batch.terminals
    )
    with torch.no_grad():
        before = algo.actor.log_prob(batch.obs, batch.actions).mean().item()
    for _ in range(30):
        algo.update(batch)
    with torch.no_grad():
        return algo.actor.log_prob(batch.obs, batch.actions).mean().item() - before


def test_bc_warmup_maximises_data_likelihood() -> None:
    gain_bc, gain_sac = _likelihood_gain(100), _likelihood_gain(0)
    assert gain_bc > 0.4
    assert gain_bc > gain_sac + 0.3


def _ood_gap(cql_alpha: float) -> float:
    """Mean Q(s, a_data) − Q(s, a_ood) after training on data whose actions all lie near +0.5."""
    algo = make(cql_alpha=cql_alpha, gamma=0.9, critic_lr=1e-3, actor_lr=1e-3, seed=1)
    g = torch.Generator().manual_seed(0)
    n = 512
    obs = torch.randn(n, 2, generator=g)
    data = Batch(
        obs=obs,
        actions=0.5 + 0.05 * torch.randn(n, 1, generator=g),
        rewards=obs[:, 0].clone(),
        next_obs=torch.randn(n, 2, generator=g),
        terminals=torch.zeros(n),
    )
    for _ in range(150):
        idx = torch.randint(0, n, (64,), generator=g)
        algo.update(
            Batch(*(t[idx] for t in (data.obs, data.actions, data.rewards, data.next_obs, data.terminals)))
        )
    with torch.no_grad():
        q_data = algo.critic(obs, torch.full((n, 1), 0.5)).min(0).values
        q_ood = algo.critic(obs, torch.full((n, 1), -0.8)).min(0).values
    return (q_data - q_ood).mean().item()


def test_penalty_pushes_out_of_distribution_actions_down() -> None:
    with_penalty, without = _ood_gap(5.0), _ood_gap(0.0)
    assert with_penalty > 1.0
    assert with_penalty > without + 1.0


@pytest.mark.parametrize("max_q_backup", [False, True])
@pytest.mark.parametrize("backup_entropy", [False, True])
def test_soft_target_matches_per_draw_evaluation(max_q_backup: bool, backup_entropy: bool) -> None:
    algo = make(
        act_dim=2, n_critics=3, max_q_backup=max_q_backup, backup_entropy=backup_entropy, init_alpha=0.5
    )
    batch = random_batch(6, act_dim=2)
    next_actions = torch.rand(6, 4, 2) * 2 - 1
    next_log_prob = torch.randn(6, 4)
    got = algo.soft_target(batch, next_actions, next_log_prob)
    with torch.no_grad():  # (N, B): each draw's minimum over the three target critics
        per_draw = torch.stack(
            [algo.critic_target(batch.next_obs, next_actions[:, j]).min(0).values for j in range(4)]
        )
    pick = per_draw.argmax(0) if max_q_backup else torch.zeros(6, dtype=torch.long)
    rows = torch.arange(6)
    v = per_draw[pick, rows] - (0.5 * next_log_prob[rows, pick] if backup_entropy else 0.0)
    torch.testing.assert_close(got, batch.rewards + 0.99 * (1 - batch.terminals) * v)


@pytest.mark.parametrize("bad", [{"init_alpha": 0.0}, {"n_actions": 0}, {"cql_temperature": -1.0}])
def test_invalid_config_is_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        make(**bad)
