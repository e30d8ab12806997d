"""Behaviour cloning: losses against hand computations, defaults, and that it learns a known mapping."""

from __future__ import annotations

import math
from typing import Literal

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.bc import (
    BC,
    BCConfig,
    DiscreteBC,
    bc_cross_entropy_loss,
    bc_mse_loss,
    bc_nll_loss,
)
from offrl.algos.registry import algorithm_class
from offrl.errors import ConfigError
from offrl.types import Batch

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
UNIT_ACTIONS = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
DISCRETE_ACTIONS = gym.spaces.Discrete(3)


def make_batch(obs: torch.Tensor, actions: torch.Tensor) -> Batch:
    zeros = torch.zeros(obs.shape[0])
    return Batch(obs=obs, actions=actions, rewards=zeros, next_obs=obs, terminals=zeros)


def sampled_batches(obs: torch.Tensor, actions: torch.Tensor, n: int, size: int = 256) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, obs.shape[0], (size,), generator=g) for _ in range(n)]
    return [make_batch(obs[i], actions[i]) for i in idx]


# -- losses ----------------------------------------------------------------------------------------
def test_mse_loss_by_hand() -> None:
    pred = torch.zeros(4, 3)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    # squared errors sum to 1 + 4 + 9 + 3 = 17 over 12 components
    assert bc_mse_loss(pred, target).item() == pytest.approx(17 / 12)
    assert bc_mse_loss(target, target).item() == 0.0


def test_nll_loss_by_hand() -> None:
    assert bc_nll_loss(torch.tensor([-1.0, -2.0, -3.0, -6.0])).item() == pytest.approx(3.0)


def test_cross_entropy_loss_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.0, math.log(2.0), math.log(3.0)],  # p = (1, 2, 3)/6, action 2: −log(1/2) = log 2
            [0.0, 0.0, 0.0],  # uniform, action 1: log 3
            [math.log(4.0), 0.0, 0.0],  # p = (4, 1, 1)/6, action 0: log 1.5
            [5.0, 5.0, 5.0],  # uniform again: log 3
        ]
    )
    actions = torch.tensor([2, 1, 0, 0])
    # (log 2 + log 3 + log 1.5 + log 3) / 4 = log(27) / 4
    assert bc_cross_entropy_loss(logits, actions).item() == pytest.approx(math.log(27.0) / 4)


# -- configuration ---------------------------------------------------------------------------------
def test_defaults_follow_corl_and_lr_depends_on_action_kind() -> None:
    cfg = BCConfig()
    assert (cfg.batch_size, cfg.hidden, cfg.policy, cfg.normalize_obs) == (
        256,
        (256, 256),
        "deterministic",
        True,
    )
    assert BC(cfg, OBS_SPACE, UNIT_ACTIONS).optimizers["actor"].param_groups[0]["lr"] == 3e-4
    assert DiscreteBC(cfg, OBS_SPACE, DISCRETE_ACTIONS).optimizers["actor"].param_groups[0]["lr"] == 1e-3
    group = (
        DiscreteBC(BCConfig(lr=0.01, weight_decay=0.1), OBS_SPACE, DISCRETE_ACTIONS)
        .optimizers["actor"]
        .param_groups[0]
    )
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.1)


def test_policy_kinds_and_registry() -> None:
    assert BC(BCConfig(hidden=(8,)), OBS_SPACE, UNIT_ACTIONS).policy().kind == "deterministic"
    gaussian = BC(BCConfig(hidden=(8,), policy="gaussian"), OBS_SPACE, UNIT_ACTIONS)
    assert gaussian.policy().kind == "tanh_gaussian"
    assert DiscreteBC(BCConfig(hidden=(8,)), OBS_SPACE, DISCRETE_ACTIONS).policy().kind == "categorical"
    assert algorithm_class("bc", UNIT_ACTIONS) is BC
    assert algorithm_class("bc", DISCRETE_ACTIONS) is DiscreteBC


def test_discrete_rejects_gaussian_policy() -> None:
    with pytest.raises(ConfigError, match="continuous actions only"):
        DiscreteBC(BCConfig(policy="gaussian"), OBS_SPACE, DISCRETE_ACTIONS)


# -- updates ---------------------------------------------------------------------------------------
def test_gaussian_likelihood_is_finite_for_actions_on_the_bounds() -> None:
    algo = BC(BCConfig(hidden=(16,), policy="gaussian"), OBS_SPACE, UNIT_ACTIONS)
    actions = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    loss = algo.update(make_batch(torch.randn(4, 4), actions))["loss"]
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in algo.nets["actor"].parameters())


def test_accuracy_counts_argmax_hits_before_the_step() -> None:
    algo = DiscreteBC(BCConfig(hidden=(8,)), OBS_SPACE, DISCRETE_ACTIONS)
    last = algo.nets["actor"].get_submodule("net.2")  # the output layer of the (8,) MLP
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # always predicts action 1
    metrics = algo.update(make_batch(torch.randn(4, 4), torch.tensor([1, 1, 0, 2])))
    assert metrics["accuracy"].item() == 0.5
    assert metrics["accuracy"].dim() == 0


def test_max_grad_norm_limits_the_step() -> None:
    # Adam's first step is ≈ lr·sign(grad) whatever the gradient's scale, unless the gradient is far
    # below Adam's eps (1e-8): clipping to 1e-12 must shrink the step by orders of magnitude.
    batch = make_batch(torch.randn(32, 4), torch.rand(32, 2) * 2 - 1)
    moves = {}
    for clip in (None, 1e-12):
        algo = BC(BCConfig(hidden=(16,), max_grad_norm=clip), OBS_SPACE, UNIT_ACTIONS)
        before = [p.detach().clone() for p in algo.nets["actor"].parameters()]
        algo.update(batch)
        moves[clip] = max((p - b).abs().max().item() for p, b in zip(algo.nets["actor"].parameters(), before))
    assert moves[None] > 1e-4
    assert moves[1e-12] < 1e-6


# -- learning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["deterministic", "gaussian"])
def test_continuous_bc_learns_a_smooth_mapping(policy: Literal["deterministic", "gaussian"]) -> None:
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 4, generator=g)
    obs, held_out = torch.randn(4096, 4, generator=g), torch.randn(512, 4, generator=g)

    def expert(o: torch.Tensor) -> torch.Tensor:
        return torch.tanh(o @ weights.T)

    algo = BC(BCConfig(hidden=(64, 64), lr=1e-3, policy=policy), OBS_SPACE, UNIT_ACTIONS)
    acting = algo.policy()

    def held_out_mse() -> float:
        return ((acting.act_tensor(held_out) - expert(held_out)) ** 2).mean().item()

    assert held_out_mse() > 0.1  # untrained: far from the expert
    for batch in sampled_batches(obs, expert(obs), 200):
        algo.update(batch)
    assert held_out_mse() < 0.01


def test_discrete_bc_learns_a_linearly_separable_labelling() -> None:
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 3, generator=g)
    obs, held_out = torch.randn(4096, 4, generator=g), torch.randn(512, 4, generator=g)
    algo = DiscreteBC(BCConfig(hidden=(64, 64)), OBS_SPACE, DISCRETE_ACTIONS)
    acting = algo.policy()

    def held_out_accuracy() -> float:
        return (acting.act_tensor(held_out) == (held_out @ weights).argmax(-1)).float().mean().item()

    assert held_out_accuracy() < 0.6
    for batch in sampled_batches(obs, (obs @ weights).argmax(-1), 150):
        metrics = algo.update(batch)
    assert held_out_accuracy() > 0.95
    assert metrics["accuracy"].item() > 0.9
