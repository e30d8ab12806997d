"""Learning tests: each algorithm must beat a numeric threshold that a broken one misses.

Medians over 3 seeds, 10 evaluation episodes each, on the built-in datasets (offrl/builtin.py).
Normalised scores: 0 = uniform random policy, 100 = the scripted expert.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.learning import median, scores


def test_bc_matches_expert_on_cartpole(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/cartpole-expert")
    bc = scores("bc", data, tmp_path, epochs=10, hidden=(64, 64))
    # the controller balances for the full 500 steps: BC must reach ≥ 95% of its return
    assert median(bc) >= 100 * (0.95 * 500 - 22) / (500 - 22), bc


@pytest.mark.slow
def test_discrete_cql_beats_bc_on_mixed_cartpole(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/cartpole-mixed")
    bc = scores("bc", data, tmp_path, epochs=20, hidden=(64, 64))
    cql = scores("cql", data, tmp_path, epochs=80, hidden=(64, 64), lr=1e-3, target_update_interval=500)
    assert median(cql) >= median(bc) + 10, (cql, bc)


@pytest.mark.slow
def test_cql_beats_bc_on_mixed_pendulum(builtin_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/pendulum-mixed")
    bc = scores("bc", data, tmp_path, epochs=20, hidden=(64, 64))
    cql = scores("cql", data, tmp_path, epochs=40, actor_hidden=(64, 64), critic_hidden=(64, 64))
    assert median(cql) >= median(bc) + 10, (cql, bc)
