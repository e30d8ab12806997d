"""experiments/targets.py on hand-made records: verdicts per dataset and per level, and the diagnostics
listed for a miss."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("classic_targets", ROOT / "experiments" / "targets.py")
assert spec is not None and spec.loader is not None
targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(targets)


def _record(
    folder: Path, algo: str, task: str, seed: int, scores: list[float], q: list[float] | None = None
) -> None:
    evaluations: list[dict[str, float]] = [
        {"step": 100 * (i + 1), "normalized_score": s} for i, s in enumerate(scores)
    ]
    for ev, value in zip(evaluations, q or [], strict=False):
        ev["q_data_mean"] = value
    rec = {
        "status": "finished",
        "kind": "offline",
        "cell_id": f"{algo}__{task}__s{seed}",
        "cell": {"algo": algo},
        "algo": algo,
        "task": task,
        "seed": seed,
        "evaluations": evaluations,
        "final": evaluations[-1],
        "best_during_training": max(evaluations, key=lambda e: e["normalized_score"]),
    }
    (folder / "records").mkdir(parents=True, exist_ok=True)
    (folder / "records" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))


def test_a_miss_is_named_with_its_diagnostics(tmp_path: Path) -> None:
    for seed in range(2):
        _record(tmp_path, "bc", "env-medium-replay", seed, [30.0, 40.0])
        _record(tmp_path, "iql", "env-medium-replay", seed, [50.0, 60.0])
        # CQL peaks and falls while Q of the data's actions climbs above their returns: a collapse
        _record(tmp_path, "cql", "env-medium-replay", seed, [80.0, 10.0], q=[1.0, 5.0 + seed])
        _record(tmp_path, "bc", "env-expert", seed, [90.0])  # a level no target reads per dataset
    data = targets.ReportData.load(tmp_path)
    lines, held, made = targets.per_dataset(data)
    text = "\n".join(lines)
    assert (held, made) == (1, 2)
    assert "| env-medium-replay | 40.0 (40.0) | 10.0 (80.0) | 60.0 (60.0) | cql ✗, iql ✓ |" in text
    assert "cql: collapse 2/2; bc: none" in text
    assert "env-expert" not in text


def test_medium_expert_iqm_verdicts(tmp_path: Path) -> None:
    for task, bc, cql in (("a-medium-expert", 50.0, 40.0), ("b-medium-expert", 60.0, 45.0)):
        for seed in range(3):
            _record(tmp_path, "bc", task, seed, [bc + seed])
            _record(tmp_path, "cql", task, seed, [cql + seed])
    text = "\n".join(targets.aggregate_level(targets.ReportData.load(tmp_path)))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["bc"].endswith("|  |")
    assert rows["cql"].endswith("| ✗ |")
    assert "iql" not in rows


def test_still_moving_lists_curves_that_have_not_flattened(tmp_path: Path) -> None:
    for seed in range(2):
        # evaluations at steps 100..500: 60% of the run is step 300
        _record(tmp_path, "iql", "env-random", seed, [0.0, 10.0, 20.0, 40.0, 60.0 + seed])
        _record(tmp_path, "bc", "env-random", seed, [0.0, 30.0, 50.0, 55.0, 58.0])
        # one seed up 40, the other down 20: the mean moves +10.5 but the seeds disagree
        _record(tmp_path, "cql", "env-random", seed, [0.0, 10.0, 50.0, 40.0, [90.0, 31.0][seed]])
    text = "\n".join(targets.still_moving(targets.ReportData.load(tmp_path)))
    assert "| env-random | iql | 20.0 | 60.5 | +40.5 | rising: 2 of 2 seeds up |" in text
    assert "| env-random | cql | 50.0 | 60.5 | +10.5 | mixed: 1 up, 1 down |" in text
    assert "| env-random | bc |" not in text  # 50 → 58: within 10 points
    assert "1 rose with no seed falling" in text and "0 fell" in text and "1 moved with seeds going" in text


def test_seed_agreement_labels() -> None:
    assert targets._direction([-12.0, -3.0, -40.0]) == ("falling", "falling: 3 of 3 seeds down")
    # a seed pinned at the score's ceiling stays unchanged: the others still say the curve rises
    assert targets._direction([5.0, 0.0, 9.0]) == ("rising", "rising: 2 of 3 seeds up, 1 unchanged")
    assert targets._direction([5.0, -1.0, 9.0]) == ("mixed", "mixed: 2 up, 1 down")
    assert targets._direction([30.0])[0] == "one seed"


def test_means_equal_at_the_tables_precision_are_a_tie_that_holds(tmp_path: Path) -> None:
    """Two policies that both do nothing differ by a few thousandths of a point: a tie, which holds, though
    their one-decimal means print 0.1 apart here."""
    _record(tmp_path, "bc", "env-random", 0, [26.350])
    _record(tmp_path, "iql", "env-random", 0, [26.347])
    _record(tmp_path, "cql", "env-random", 0, [26.2])
    lines, held, made = targets.per_dataset(targets.ReportData.load(tmp_path))
    assert (held, made) == (1, 2)
    assert "| env-random | 26.4 (26.4) | 26.2 (26.2) | 26.3 (26.3) | cql ✗, iql = |" in "\n".join(lines)
    assert "Held: 1 of 2 (1 a tie)." in lines
