"""TD3+BC: losses against hand computations, smoothing noise, delayed updates, λ normalisation, learning."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.td3bc import (
    TD3BC,
    TD3BCConfig,
    smoothing_noise,
    td3bc_actor_loss,
    td3bc_lambda,
)
from offrl.errors import ConfigError
from offrl.types import Batch
from tests.batches import random_batch
from tests.learning import median, scores

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
SMALL: dict[str, Any] = {"actor_hidden": (32, 32), "critic_hidden": (32, 32), "batch_size": 64}


def make(act_dim: int = 1, seed: int = 0, **overrides: Any) -> TD3BC:
    act_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
    return TD3BC(TD3BCConfig(**{**SMALL, **overrides}), OBS_SPACE, act_space, seed=seed)


# -- pure losses ---------------------------------------------------------------------------------
def test_actor_loss_hand_computed() -> None:
    q_pi = torch.tensor([2.0, -4.0], requires_grad=True)  # mean |Q| = 3, mean Q = −1
    pi = torch.tensor([[0.5], [0.0]], requires_grad=True)
    data = torch.tensor([[0.0], [0.5]])
    loss = td3bc_actor_loss(q_pi, pi, data, alpha=2.5)
    # −(2.5 / 3)·(−1) + ((0.5)² + (−0.5)²) / 2
    assert loss.item() == pytest.approx(2.5 / 3 + 0.25, abs=1e-6)
    loss.backward()
    # λ is a constant: ∂/∂Q_i = −λ / B, not the derivative of α·mean Q / mean|Q|
    assert q_pi.grad is not None and pi.grad is not None
    torch.testing.assert_close(q_pi.grad, torch.full((2,), -2.5 / 3 / 2))
    torch.testing.assert_close(pi.grad, torch.tensor([[0.5], [-0.5]]))  # 2(π − a)/(B·A)


def test_lambda_is_detached_and_normalises_the_q_scale() -> None:
    q = torch.tensor([1.0, 3.0], requires_grad=True)
    lam = td3bc_lambda(q, alpha=2.5)
    assert lam.item() == pytest.approx(2.5 / 2.0)
    assert not lam.requires_grad
    # with positive Q, α·mean Q / mean|Q| = α is flat in Q: only a detached λ leaves a gradient
    pi = torch.zeros(2, 1)
    td3bc_actor_loss(q, pi, pi, 2.5).backward()
    assert q.grad is not None and torch.all(q.grad < -0.1)


@pytest.mark.parametrize("scale", [0.01, 1.0, 1000.0])
def test_actor_gradient_does_not_depend_on_the_reward_scale(scale: float) -> None:
    """Q scaled by c: λ scales by 1/c, so the gradient the actor sees is the same."""
    w = torch.tensor([[1.0, -2.0]])
    data = torch.tensor([[0.1, 0.2], [-0.3, 0.4], [0.0, -0.5]])

    def grad(c: float) -> torch.Tensor:
        pi = torch.tensor([[0.2, 0.1], [0.5, -0.5], [-0.1, 0.3]], requires_grad=True)
        q_pi = c * ((pi * w).sum(-1) - 3.0)  # a critic linear in the action, all values negative
        td3bc_actor_loss(q_pi, pi, data, alpha=2.5).backward()
        assert pi.grad is not None
        return pi.grad

    torch.testing.assert_close(grad(scale), grad(1.0))


def test_smoothing_noise_is_clipped_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    noise = smoothing_noise((100_000,), std=0.2, clip=0.5, generator=g)
    assert noise.abs().max().item() == pytest.approx(0.5)  # clipped, and the clip is reached
    # P(|N(0, 0.2²)| > 0.5) = P(|z| > 2.5) ≈ 1.24%: these sit exactly on the bounds
    assert (noise.abs() == 0.5).float().mean().item() == pytest.approx(0.0124, abs=0.002)
    # unclipped draws: N(0, 0.2²) truncated at ±2.5σ, std 0.2·sqrt(1 − 2·2.5·φ(2.5)/P(|z| < 2.5))
    phi = math.exp(-(2.5**2) / 2) / math.sqrt(2 * math.pi)
    truncated_std = 0.2 * math.sqrt(1 - 5 * phi / math.erf(2.5 / math.sqrt(2)))  # ≈ 0.1909
    inside = noise[noise.abs() < 0.5]
    assert inside.std().item() == pytest.approx(truncated_std, rel=0.01)
    assert abs(noise.mean().item()) < 0.003
    # same generator state, same noise
    again = smoothing_noise((100_000,), 0.2, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, again)


def test_target_actions_stay_within_clip_of_the_target_policy_and_the_box() -> None:
    algo = make(act_dim=3, policy_noise=10.0, noise_clip=0.3)
    next_obs = torch.randn(512, 2)
    got = algo.target_actions(next_obs)
    with torch.no_grad():
        pi = algo.actor_target(next_obs)
    assert got.abs().max() <= 1.0
    deviation = got - pi
    # huge σ: nearly every draw lands on ±clip, unless the [−1, 1] box cuts it shorter
    inside_box = (pi + 0.3 <= 1.0) & (pi - 0.3 >= -1.0)
    assert deviation.abs().max() <= 0.3 + 1e-6
    assert (deviation[inside_box].abs() > 0.3 - 1e-6).float().mean() > 0.95
    assert (deviation > 0).any() and (deviation < 0).any()
    assert not got.requires_grad


def test_target_uses_smoothed_actions_of_the_target_networks() -> None:
    algo = make(act_dim=2, n_critics=3)
    batch = random_batch(8, act_dim=2)
    state = algo.generator.get_state()
    got = algo.target(batch)
    algo.generator.set_state(state)
    actions = algo.target_actions(batch.next_obs)  # the same noise draw
    with torch.no_grad():
        q = torch.stack([algo.critic_target(batch.next_obs, actions)[e] for e in range(3)]).min(0).values
    torch.testing.assert_close(got, batch.rewards + 0.99 * (1 - batch.terminals) * q)


# -- the algorithm -------------------------------------------------------------------------------
def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("policy_freq", [1, 2, 3])
def test_actor_and_targets_move_every_policy_freq_updates(policy_freq: int) -> None:
    algo = make(policy_freq=policy_freq)
    batches = [random_batch(seed=i) for i in range(6)]
    for i, batch in enumerate(batches):
        before = {n: _params(m) for n, m in algo.nets.items()}
        algo.update(batch)
        after = {n: _params(m) for n, m in algo.nets.items()}
        actor_step = i % policy_freq == 0  # counted from 0: the first update trains the actor
        assert not _same(before["critic"], after["critic"]), i
        for name in ("actor", "actor_target", "critic_target"):
            assert _same(before[name], after[name]) != actor_step, (name, i)
    assert algo.num_updates == 6


def test_actor_loss_reads_the_first_critic_only() -> None:
    algo = make(n_critics=3)
    batch = random_batch(16)
    loss = algo.loss_terms(batch)["actor"]
    with torch.no_grad():
        pi = algo.actor(batch.obs)
        expect = td3bc_actor_loss(algo.critic(batch.obs, pi)[0], pi, batch.actions, 2.5)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_metrics_keep_their_keys_between_actor_steps() -> None:
    algo = make()
    first, second, third = (algo.update(random_batch(seed=i)) for i in range(3))
    assert (
        set(first)
        == set(second)
        == set(third)
        == {"critic_loss", "q_mean", "actor_loss", "bc_loss", "lambda"}
    )
    # the critic-only update repeats the last actor step's values
    for k in ("actor_loss", "bc_loss", "lambda"):
        assert torch.equal(second[k], first[k]), k
    assert not torch.equal(third["actor_loss"], first["actor_loss"])
    assert not torch.equal(second["critic_loss"], first["critic_loss"])


def test_update_is_deterministic_per_seed() -> None:
    batch = random_batch()
    runs = []
    for _ in range(2):
        algo = make(seed=3)
        runs.append([algo.update(batch) for _ in range(3)][-1])
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k


def _bandit_action(alpha: float) -> float:
    """Mean policy action after training on one-step data: a = +0.5 pays 1, a = −0.5 pays 0."""
    algo = make(alpha=alpha, actor_lr=1e-3, critic_lr=1e-3, policy_freq=1, seed=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        good = torch.rand(64, generator=g) < 0.5
        actions = torch.where(good, 0.5, -0.5).unsqueeze(1)
        batch = Batch(
            torch.randn(64, 2, generator=g), actions, good.float(), torch.zeros(64, 2), torch.ones(64)
        )
        algo.update(batch)
    with torch.no_grad():
        return algo.actor(torch.randn(256, 2, generator=g)).mean().item()


def test_q_term_pulls_the_policy_off_the_behaviour_mean_towards_the_better_action() -> None:
    pure_bc, td3bc = _bandit_action(0.0), _bandit_action(2.5)
    assert abs(pure_bc) < 0.1  # α = 0 is BC: the mean of ±0.5
    assert td3bc > 0.3


@pytest.mark.parametrize("bad", [{"policy_freq": 0}, {"noise_clip": -0.1}, {"alpha": -1.0}])
def test_invalid_config_is_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        make(**bad)


# -- learning ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_td3bc_learns_on_mixed_pendulum(builtin_dataset: Callable[[str], Path], tmp_path: Path) -> None:
    """Default settings (α = 2.5, policy_freq 2), 64×64 nets, 80 passes (6,240 updates, 3,120 actor steps).

    Measured: seeds 0, 1, 2 → 54.8, 44.8, 45.6 (100 passes: 58.3, 65.3, 52.1); BC (20 passes) ≈ 26.
    """
    data = builtin_dataset("builtin/pendulum-mixed")
    result = scores("td3bc", data, tmp_path, epochs=80, actor_hidden=(64, 64), critic_hidden=(64, 64))
    assert median(result) >= 38, result
