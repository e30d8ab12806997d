"""The diag/ metrics: their values on a hand-built case, and that they leave a run's numbers alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offrl.algos.registry import variants
from offrl.data.writer import DatasetWriter
from offrl.diagnostics import DiagnosticRows, diagnose
from offrl.train import fit
from tests.test_contract import make, raw_obs


def test_diagnose_on_a_hand_built_case() -> None:
    rows = DiagnosticRows(
        raw_obs=torch.zeros(4, 2),
        obs=torch.zeros(4, 2),
        actions=torch.tensor([[0.5], [-0.5], [0.0], [1.0]]),
        returns=torch.tensor([1.0, -3.0, 0.0, 4.0]),
    )
    q_data = torch.tensor([2.0, -3.0, 1.0, 4.0])
    policy_actions = torch.tensor([[0.5], [0.5], [0.0], [0.0]])

    def q_values(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:  # the data's Q, +1 off-data
        return q_data + (actions != rows.actions).float().squeeze(1)

    policy = SimpleNamespace(act_tensor=lambda obs, deterministic: policy_actions)
    algo: Any = SimpleNamespace(q_values=q_values, policy=lambda: policy, discrete=False)
    out = diagnose(algo, rows)
    # |Q − G| / (|G| + 1): 1/2, 0/4, 1/1, 0/5
    assert out["q_return_gap"] == (0.5 + 0.0 + 1.0 + 0.0) / 4
    assert out["q_data_mean"] == 1.0 and out["return_mean"] == 0.5
    assert out["q_policy_minus_data"] == 2 / 4  # two of four policy actions differ, each +1
    assert out["action_mse"] == (0.0 + 1.0 + 0.0 + 1.0) / 4
    no_q: Any = SimpleNamespace(q_values=lambda obs, actions: None)
    assert diagnose(no_q, rows) == {}


def _dataset(path: Path) -> Path:
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    with DatasetWriter(path, obs_space, gym.spaces.Discrete(2)) as w:
        for i in range(6):
            o = rng.normal(size=(31, 3)).astype(np.float32)
            w.add_episode(o[:-1], rng.integers(0, 2, size=30), rng.normal(size=30), o[1:], i % 2 == 0)
    return path


def test_diagnostics_are_logged_and_change_no_number(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d.h5")
    small = {"hidden": "16,16", "batch_size": 32, "train.eval_every": 0, "runtime.threads": 1}
    states = {}
    for on in (True, False):
        out = tmp_path / f"cql-{on}"
        fit(
            "cql", data, out, epochs=2, show_progress=False, **small, **{"train.diagnostics": str(on).lower()}
        )
        states[on] = load_file(str(sorted((out / "checkpoints").glob("pass_*"))[-1] / "state.safetensors"))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        diag = [r for r in rows if any(k.startswith("diag/") for k in r)]
        assert len(diag) == (2 if on else 0)  # one row per pass
        if on:
            assert {"diag/q_return_gap", "diag/q_policy_minus_data", "diag/action_disagreement"} <= set(
                diag[0]
            )
    assert states[True].keys() == states[False].keys()
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[True])
    fit("bc", data, tmp_path / "bc", epochs=1, show_progress=False, **small)  # BC has no Q: nothing logged
    assert "diag/" not in (tmp_path / "bc" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("cls", [cls for _, _, cls in variants()], ids=[f"{n}-{v}" for n, v, _ in variants()])
def test_every_algorithm_gives_finite_diagnostics_or_none(cls: Any) -> None:
    algo = make(cls, {})
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(8, 4, generator=g)
    actions = (
        torch.randint(0, 3, (8,), generator=g) if cls.discrete else torch.rand(8, 2, generator=g) * 2 - 1
    )
    rows = DiagnosticRows(
        raw_obs=raw_obs_tensor(8), obs=obs, actions=actions, returns=torch.randn(8, generator=g)
    )
    q = algo.q_values(obs, actions)
    if q is None:
        assert diagnose(algo, rows) == {}
        return
    assert q.shape == (8,)
    out = diagnose(algo, rows)
    assert out and all(np.isfinite(v) for v in out.values())
    assert ("action_disagreement" in out) == cls.discrete


def raw_obs_tensor(n: int) -> torch.Tensor:
    return torch.from_numpy(raw_obs(n))


def test_without_qualifying_rows_the_return_metrics_are_left_out(tmp_path: Path) -> None:
    """Episodes that never terminate and are truncated within the tail's horizon (Pendulum's shape):
    no row qualifies for the return comparison, the other metrics are still computed."""
    from offrl.algos.registry import algorithm_class
    from offrl.data.dataset import TransitionDataset
    from offrl.diagnostics import diagnostic_rows

    rng = np.random.default_rng(0)
    path = tmp_path / "t.h5"
    box = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    with DatasetWriter(path, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), box) as w:
        for _ in range(4):
            o = rng.normal(size=(21, 3)).astype(np.float32)
            w.add_episode(o[:-1], rng.uniform(-1, 1, (20, 1)), rng.normal(size=20), o[1:], False)
    data = TransitionDataset.load(path)
    rows = diagnostic_rows(data, data, gamma=0.99, size=16)
    assert rows is not None and rows.returns is None and rows.obs.shape == (16, 3)
    cls = algorithm_class("td3bc", box)
    algo = cls(cls.Config(actor_hidden=(8,), critic_hidden=(8,)), data.observation_space, box)
    out = diagnose(algo, rows)
    assert set(out) == {"q_data_mean", "q_policy_minus_data", "action_mse"}
