"""Shared harness of the learning tests: train on a built-in dataset for several seeds, evaluate."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from offrl.train import fit


def scores(
    algo: str,
    dataset: Path,
    out: Path,
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int,
    episodes: int = 10,
    **settings: Any,
) -> list[float]:
    """Normalised score of the final policy for each seed (``episodes`` evaluation episodes each)."""
    result = []
    for seed in seeds:
        run = fit(
            algo,
            dataset,
            out / f"{algo}-seed{seed}",
            epochs=epochs,
            seed=seed,
            show_progress=False,
            eval_every=epochs,
            eval_episodes=episodes,
            **{"train.threads": 1, **settings},
        )
        assert run.final_eval is not None and run.final_eval["normalized_mean"] is not None
        result.append(float(run.final_eval["normalized_mean"]))
    # shown by `pytest -rP` (the slow suite in CI) so that margins are visible, not only pass/fail
    print(
        f"{algo} on {dataset.name}: normalised scores {[round(x, 1) for x in result]}, median {median(result):.1f}"
    )
    return result


def median(values: list[float]) -> float:
    return float(statistics.median(values))
