"""The shared RL numerics of ``offrl.losses`` against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from offrl import losses, nets
from offrl.errors import ConfigError
from offrl.losses import (
    advantage_weights,
    critic_loss,
    double_q_target,
    sac_actor_loss,
    sac_alpha_loss,
    soft_td_target,
    td_loss,
    td_target,
    weighted_nll_loss,
)


# -- targets ---------------------------------------------------------------------------------------
def test_td_target_stops_only_at_terminals() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0])
    terminals = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a truncated step arrives with terminal 0: row 3
    next_v = torch.tensor([10.0, 7.0, -4.0, 3.0])
    # 1 + 0.5·10; terminal: 0; 2 + 0.5·(−4); −1 + 0.5·3
    torch.testing.assert_close(td_target(rewards, terminals, next_v, 0.5), torch.tensor([6.0, 0.0, 0.0, 0.5]))


def test_soft_td_target_subtracts_the_entropy_term_from_the_critic_minimum() -> None:
    next_q = torch.tensor([[1.0, 4.0], [3.0, 2.0]])  # (E=2, B=2): minimum [1, 2]
    y = soft_td_target(
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.0, 1.0]),
        next_q,
        torch.tensor([0.5, -1.0]),
        torch.tensor(0.2),
        0.9,
    )
    # row 0: 1 + 0.9·(1 − 0.2·0.5); row 1 terminal
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * (1.0 - 0.1), 1.0]))


def test_double_q_target_uses_online_argmax_target_values_and_masks_terminals() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0])
    terminals = torch.tensor([0.0, 1.0, 0.0, 0.0])
    online = torch.tensor(
        [[1.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.2, 1.0, 0.5]]
    )  # argmax 1, 0, 2, 1
    target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # row 0: 1 + 0.5·20 (the target's own max, 30, is not used); row 1 terminal: 0; row 2: 2 + 0.5·3;
    # row 3: −1 + 0.5·5
    out = double_q_target(rewards, terminals, online, target, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([11.0, 0.0, 3.5, 1.5]))


# -- critic losses ---------------------------------------------------------------------------------
def test_critic_loss_sums_critics_of_batch_means() -> None:
    q = torch.tensor([[2.5, 0.0], [0.5, 2.0], [1.5, 4.0]])  # (E=3, B=2)
    # errors against (2.5, 2): critic 0 (0, −2) → 2; critic 1 (−2, 0) → 2; critic 2 (−1, 2) → 2.5
    assert critic_loss(q, torch.tensor([2.5, 2.0])).item() == pytest.approx(6.5)


def test_td_loss_huber_and_mse() -> None:
    q = torch.tensor([0.0, 1.0, 3.0, -2.0])
    target = torch.tensor([0.5, 1.0, 0.0, 0.0])
    # errors −0.5, 0, 3, −2; huber: 0.125, 0, 2.5, 1.5; squared: 0.25, 0, 9, 4
    assert td_loss(q, target, "huber").item() == pytest.approx(4.125 / 4)
    assert td_loss(q, target, "mse").item() == pytest.approx(13.25 / 4)
    # δ = 2: quadratic up to |error| 2, then 2·(|error| − 1): 0.125, 0, 4, 2
    assert td_loss(q, target, "huber", delta=2.0).item() == pytest.approx(6.125 / 4)
    with pytest.raises(ConfigError):
        td_loss(q, target, "l1")  # type: ignore[arg-type]


# -- SAC -------------------------------------------------------------------------------------------
def test_sac_actor_loss_uses_the_critic_minimum() -> None:
    q_pi = torch.tensor([[1.0, 5.0], [3.0, 2.0]])  # min over critics: (1, 2)
    log_prob = torch.tensor([0.5, -1.0])
    assert sac_actor_loss(q_pi, log_prob, torch.tensor(2.0)).item() == pytest.approx(((1 - 1) + (-2 - 2)) / 2)
    assert sac_actor_loss(q_pi, log_prob, torch.tensor(0.2)).item() == pytest.approx(
        ((0.1 - 1.0) + (-0.2 - 2.0)) / 2
    )


def test_sac_alpha_loss_value_and_direction() -> None:
    log_alpha = torch.tensor(0.5, requires_grad=True)
    log_prob = torch.tensor([-2.0, -4.0], requires_grad=True)
    loss = sac_alpha_loss(log_alpha, log_prob, target_entropy=-3.0)
    assert loss.item() == pytest.approx(-(0.5 * -6.0))
    loss.backward()
    # entropy (3) above target (−3): descent must lower α; no gradient into the policy
    assert log_alpha.grad is not None and log_alpha.grad.item() == pytest.approx(6.0)
    assert log_prob.grad is None


def test_learned_scalar_stores_its_value_under_the_checkpoint_key() -> None:
    s = nets.LearnedScalar(math.log(0.5))
    assert list(s.state_dict()) == ["value"]  # saved policies and checkpoints name it so
    assert s().item() == pytest.approx(math.log(0.5)) and s().requires_grad
    fixed = nets.LearnedScalar(0.0, learn=False)
    assert fixed().item() == 0.0 and not fixed().requires_grad


# -- advantage-weighted regression -----------------------------------------------------------------
def test_advantage_weights_exponentiate_clip_and_carry_no_gradient() -> None:
    adv = torch.tensor([-1.0, 0.0, math.log(2.0), 10.0], requires_grad=True)
    # exp: e⁻¹, 1, 2, e¹⁰ ≈ 22026 → 100
    w = advantage_weights(adv, 100.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(-1.0), 1.0, 2.0, 100.0]))
    assert not w.requires_grad  # constants for the actor
    # β = 3 (IQL's β·A): e⁻³, 1, 8, e³⁰ → clipped at 10
    torch.testing.assert_close(
        advantage_weights(3.0 * adv, 10.0), torch.tensor([math.exp(-3.0), 1.0, 8.0, 10.0])
    )
    # λ = 2 (AWAC's A/λ): e^(−1/2), 1, √2, e⁵ ≈ 148 → 100
    torch.testing.assert_close(
        advantage_weights(adv / 2.0, 100.0), torch.tensor([math.exp(-0.5), 1.0, math.sqrt(2.0), 100.0])
    )
    torch.testing.assert_close(advantage_weights(0.0 * adv, 100.0), torch.ones(4))  # β = 0: plain BC


def test_weighted_nll_loss_hand_computed_and_moves_only_the_log_likelihood() -> None:
    log_prob = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    weights = torch.tensor([2.0, 0.5, 3.0], requires_grad=True)
    loss = weighted_nll_loss(log_prob, weights)
    assert loss.item() == pytest.approx(-(2.0 * -1.0 + 0.5 * -2.0 + 3.0 * 0.5) / 3)
    loss.backward()
    assert log_prob.grad is not None
    torch.testing.assert_close(log_prob.grad, torch.tensor([-2.0, -0.5, -3.0]) / 3)  # −w / B
    assert weights.grad is None


def test_return_to_go_hand_computed() -> None:
    # a terminated episode [1, 2, 3], a truncated one [-2, -4], a truncated single step [5]; γ = 0.5
    rewards = torch.tensor([1.0, 2.0, 3.0, -2.0, -4.0, 5.0])
    terminals = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    ends = torch.tensor([3, 5, 6])
    returns, tail = losses.return_to_go(rewards, terminals, ends, 0.5)
    torch.testing.assert_close(returns, torch.tensor([2.75, 3.5, 3.0, -4.0, -4.0, 5.0]), rtol=0, atol=0)
    # nothing follows a termination; a truncation k rows ahead leaves γ^k untracked
    torch.testing.assert_close(tail, torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 0.5]), rtol=0, atol=0)
    # with the smallest reward as a floor, the tail adds γ^k · r_min / (1 − γ) = γ^k · (−8): lower bounds
    bounded, _ = losses.return_to_go(rewards, terminals, ends, 0.5, reward_floor=-4.0)
    torch.testing.assert_close(bounded, torch.tensor([2.75, 3.5, 3.0, -6.0, -8.0, 1.0]), rtol=0, atol=0)


def test_return_to_go_matches_a_plain_loop_on_ragged_episodes() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (25,), generator=g)
    ends = lengths.cumsum(0)
    rewards = torch.randn(int(ends[-1]), generator=g)
    terminals = torch.zeros(len(rewards))
    terminals[ends[::2] - 1] = 1.0  # every other episode terminates, the rest are truncated
    returns, tail = losses.return_to_go(rewards, terminals, ends, 0.9, reward_floor=-3.0)
    start = 0
    for end in ends.tolist():
        for t in range(start, end):
            k = end - t
            g_t = sum(0.9**j * float(rewards[t + j]) for j in range(k))
            w = 0.0 if terminals[end - 1] else 0.9**k
            assert abs(float(returns[t]) - (g_t + w * -3.0 / 0.1)) < 1e-4
            assert abs(float(tail[t]) - w) < 1e-6
        start = end
