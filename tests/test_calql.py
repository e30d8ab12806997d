"""Cal-QL: the calibration rule on hand tensors, its reference values on a hand-built file, and that it is
CQL exactly where the reference never binds."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.calql import CalQL, CalQLConfig, calibrated
from offrl.algos.cql import CQL, CQLConfig
from offrl.data.arrays import from_arrays
from offrl.data.dataset import TransitionDataset
from offrl.errors import ConfigError
from offrl.types import Batch

GAMMA = 0.5


def test_calibrated_bounds_only_the_policy_samples() -> None:
    # E=1, B=2, M=4: two uniform samples, then two policy samples
    q = torch.tensor([[[1.0, -5.0, -3.0, 4.0], [0.0, 0.0, -1.0, -2.0]]])
    reference = torch.tensor([2.0, -1.5])
    out = calibrated(q, reference, n_uniform=2)
    expected = torch.tensor([[[1.0, -5.0, 2.0, 4.0], [0.0, 0.0, -1.0, -1.5]]])
    assert torch.equal(out, expected)


def _hand_file(tmp_path: Path) -> Path:
    """Two episodes of 1-d observations: a terminated one (rewards 1, -2, 3) and one truncated by a time
    limit (rewards -1, -4)."""
    rewards = np.array([1.0, -2.0, 3.0, -1.0, -4.0], np.float32)
    path = tmp_path / "hand.h5"
    from_arrays(
        path,
        observations=np.arange(5, dtype=np.float32)[:, None],
        actions=np.zeros((5, 1), np.float32),
        rewards=rewards,
        action_space=gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
        terminals=np.array([0, 0, 1, 0, 0], bool),
        timeouts=np.array([0, 0, 0, 0, 1], bool),
        next_observations=np.arange(1, 6, dtype=np.float32)[:, None],
        quiet=True,
    )
    return path


def test_reference_values_are_lower_bounds_on_a_hand_built_file(tmp_path: Path) -> None:
    data = TransitionDataset.load(_hand_file(tmp_path))
    algo = CalQL(
        CalQLConfig(gamma=GAMMA, actor_hidden=(8,), critic_hidden=(8,)),
        data.observation_space,
        data.action_space,
    )
    returns = algo.prepare_dataset(data).returns
    assert returns is not None
    r_min = -4.0
    tail = r_min / (1 - GAMMA)  # the truncated episode's untracked future, bounded below: -8
    expected = [
        1.0 + GAMMA * (-2.0 + GAMMA * 3.0),  # terminated: nothing after the last row
        -2.0 + GAMMA * 3.0,
        3.0,
        -1.0 + GAMMA * (-4.0) + GAMMA**2 * tail,  # truncated: the floor covers what the log misses
        -4.0 + GAMMA * tail,
    ]
    torch.testing.assert_close(returns, torch.tensor(expected))
    # a lower bound: the truncated episode continued with any rewards >= r_min is worth at least this
    for future in ([-4.0] * 30, [0.0] * 30, [-4.0, 5.0] * 15):
        disc = sum(GAMMA**i * r for i, r in enumerate(future))
        assert float(returns[4]) <= -4.0 + GAMMA * disc + 1e-6
    # the batches carry them, through the packed row gather and the plain one alike
    batch = algo.prepare_dataset(data).batch(torch.tensor([4, 0]))
    torch.testing.assert_close(batch.returns, torch.tensor([expected[4], expected[0]]))


def _batches(n: int, returns: float) -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    return [
        Batch(
            obs=torch.randn(16, 3, generator=g),
            actions=torch.rand(16, 2, generator=g) * 2 - 1,
            rewards=torch.randn(16, generator=g),
            next_obs=torch.randn(16, 3, generator=g),
            terminals=torch.zeros(16),
            returns=torch.full((16,), returns),
        )
        for _ in range(n)
    ]


def _pair() -> tuple[CQL, CalQL]:
    space_obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    space_act = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    small = {"actor_hidden": (16,), "critic_hidden": (16,), "batch_size": 16}
    return (
        CQL(CQLConfig(**small), space_obs, space_act, seed=5),
        CalQL(CalQLConfig(**small), space_obs, space_act, seed=5),
    )


def test_calql_is_cql_where_the_reference_never_binds() -> None:
    cql, calql = _pair()
    for b in _batches(3, returns=-1e9):
        m_cql, m_calql = cql.update(b), calql.update(b)
        assert torch.equal(m_cql["cql_penalty"], m_calql["cql_penalty"])
    for (name, p), q in zip(cql.nets.named_parameters(), calql.nets.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_binding_reference_raises_the_penalised_values() -> None:
    """With V_ref far above every Q, the logsumexp sees it for the policy samples: the penalty grows by
    about V_ref (the data's Q is unchanged), and the updates differ from CQL's."""
    cql, calql = _pair()
    b = _batches(1, returns=50.0)[0]
    m_cql, m_calql = cql.update(b), calql.update(b)
    assert float(m_calql["cql_penalty"]) > float(m_cql["cql_penalty"]) + 40.0
    assert any(
        not torch.equal(p, q) for p, q in zip(cql.nets.parameters(), calql.nets.parameters(), strict=True)
    )


def test_batches_without_returns_are_refused() -> None:
    _, calql = _pair()
    b = _batches(1, returns=0.0)[0]
    with pytest.raises(ConfigError, match="returns-to-go"):
        calql.update(Batch(b.obs, b.actions, b.rewards, b.next_obs, b.terminals))


def test_calql_trains_through_the_offline_trainer(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from offrl.train import fit

    result = fit(
        "calql",
        builtin_dataset("builtin/pendulum-mixed"),
        tmp_path / "run",
        epochs=1,
        show_progress=False,
        actor_hidden=(32, 32),
        critic_hidden=(32, 32),
        **{"train.eval_episodes": 2},
    )
    assert result.final_eval is not None and result.passes == 1


@pytest.mark.slow
def test_calql_beats_bc_on_mixed_pendulum(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CQL's learning test, with Cal-QL: its calibration must not cost what CQL learns offline."""
    from statistics import median

    from tests.learning import scores

    data = builtin_dataset("builtin/pendulum-mixed")
    bc = scores("bc", data, tmp_path, epochs=20, hidden=(64, 64))
    calql = scores("calql", data, tmp_path, epochs=40, actor_hidden=(64, 64), critic_hidden=(64, 64))
    assert median(calql) >= median(bc) + 10, (calql, bc)
