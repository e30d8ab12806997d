"""The report's Diagnose section on hand-built evaluation histories: each finding fires on the shape it
describes and stays quiet on its near misses."""

from __future__ import annotations

import json
from pathlib import Path

from offrl.bench.diagnose import DRIFT, DROP, GAP, ONE_ACTION, diagnose, diagnose_table
from offrl.bench.runner import read_evaluations


def run(q: list[float], g: float, scores: list[float]) -> list[dict[str, float]]:
    return [
        {"step": 1000 * (i + 1), "q_data_mean": qi, "data_return_mean": g, "normalized_score": s}
        for i, (qi, s) in enumerate(zip(q, scores, strict=True))
    ]


def kinds(evs: list[dict[str, float]]) -> list[str]:
    return [f.kind for f in diagnose(evs)]


def test_over_estimation_needs_a_large_and_growing_gap() -> None:
    g = 9.0  # |G| + 1 = 10
    assert kinds(run([9, 10, 12, 14], g, [80, 90, 70, 60])) == ["over-estimation", "collapse"]  # bias +0.5
    # the same Q with a score that holds: a policy better than the data's, whose Q lies above the data's G
    assert kinds(run([9, 10, 12, 14], g, [50] * 4)) == []
    assert kinds(run([13, 13, 13, 13], g, [50] * 4)) == []  # +0.4 but constant: no drift
    assert kinds(run([9, 9.5, 10, 10.5], g, [50] * 4)) == []  # grown, but only to +0.15


def test_under_training_needs_q_below_and_still_rising() -> None:
    g = 49.0  # |G| + 1 = 50
    assert kinds(run([2, 6, 10, 14], g, [50] * 4)) == [
        "under-training"
    ]  # bias −0.7, rising 0.08 over the last third
    assert kinds(run([14, 14, 14, 14.5], g, [50] * 4)) == []  # below, but settled: conservatism
    assert kinds(run([40, 44, 46, 48], g, [50] * 4)) == []  # rising, but close to G


def test_under_training_from_above_where_rewards_are_negative() -> None:
    # classic/acrobot-medium-replay, discrete CQL from the classic preset, seed 0: −1 per step, so Q falls
    # from 0 towards the data's return-to-go (−88.9) and is still falling at 20k steps; never swings up
    q = [-14.02, -26.1, -36.11, -45.14, -52.28, -53.42]
    (finding,) = diagnose(run(q, -88.93, [0.0] * 6))
    assert finding.kind == "under-training"
    assert round(finding.evidence["bias"], 2) == 0.39 and round(finding.evidence["rise"], 2) == -0.09
    # settled above the returns (a policy better than the data's): not flagged
    assert kinds(run([-53.0] * 6, -88.93, [90.0] * 6)) == []


def test_collapse_is_a_drop_while_q_rises_unless_q_is_still_climbing() -> None:
    g = 9.0
    assert kinds(run([9, 9.5, 9.8, 10], g, [90, 95, 60, 60])) == ["collapse"]
    assert kinds(run([9, 9.5, 9.8, 10], g, [90, 95, 80, 76])) == []  # 19 points: within DROP
    assert kinds(run([9, 9.5, 9.8, 9.4], g, [90, 95, 60, 60])) == []  # Q fell with the score
    # Q far below the returns and climbing: under-training, not optimism
    assert kinds(run([1, 5, 9, 13], 49.0, [90, 95, 60, 60])) == ["under-training"]
    assert DROP == 20.0 and GAP == 0.25  # the documented thresholds (docs/training.md)


def pendulum(scores: list[float], gap: list[float], mse: list[float]) -> list[dict[str, float]]:
    """A history without return comparison (Pendulum: no row qualifies), as continuous CQL logs it."""
    q = [-42.4, -70.8, -87.6, -92.2, -82.1, -78.3]
    return [
        {
            "step": 3910 * (i + 1),
            "q_data_mean": qi,
            "q_policy_minus_data": gi,
            "action_mse": mi,
            "normalized_score": s,
        }
        for i, (qi, gi, mi, s) in enumerate(zip(q, gap, mse, scores, strict=True))
    ]


def test_off_data_drift_is_a_drop_while_the_policy_leaves_the_data() -> None:
    # classic/pendulum-medium-expert, continuous CQL, 64×64, seed 0: cql_alpha = 10 peaks at 95.8 and
    # ends at 6.2 while its actions leave the data's (+68%) and the critic rates them ever higher
    gap = [0.43, 0.64, 1.18, 1.94, 2.90, 3.13]
    mse = [0.145, 0.158, 0.188, 0.221, 0.257, 0.265]
    findings = diagnose(pendulum([95.4, 95.8, 44.4, 21.3, 7.2, 6.2], gap, mse))
    assert [f.kind for f in findings] == ["off-data drift"]  # Q of the data fell: no "collapse"
    assert round(findings[0].evidence["distance_growth"], 2) == 0.68
    # cql_alpha = 100 on the same data stays near it and keeps its score: nothing to flag
    assert (
        diagnose(
            pendulum(
                [94.0, 96.8, 97.9, 97.8, 98.9, 100.2],
                [0.41, 0.5, 0.56, 0.56, 0.6, 0.59],
                [0.129, 0.125, 0.128, 0.128, 0.129, 0.129],
            )
        )
        == []
    )
    # near misses: the same drop with the distance grown by less than DRIFT, or with the gap shrinking
    assert (
        kinds(
            pendulum(
                [95.4, 95.8, 44.4, 21.3, 7.2, 6.2], gap, [0.145, 0.158, 0.16, 0.17, 0.18, 0.158 * (1 + DRIFT)]
            )
        )
        == []
    )
    assert kinds(pendulum([95.4, 95.8, 44.4, 21.3, 7.2, 6.2], gap[::-1], mse)) == []


def test_one_action_reads_the_final_evaluation() -> None:
    """A discrete policy that took one action in nearly every step of its final evaluation; earlier
    evaluations and continuous runs (no share) do not count."""
    steady = [{"step": 1, "normalized_score": 0.0}, {"step": 2, "normalized_score": 0.0}]
    assert kinds([{**steady[0], "action_top_share": 1.0}, {**steady[1], "action_top_share": 0.6}]) == []
    assert kinds([steady[0], {**steady[1], "action_top_share": ONE_ACTION - 0.01}]) == []
    assert kinds([steady[0], {**steady[1], "action_top_share": 1.0}]) == ["one action"]
    assert kinds(steady) == []
    table = diagnose_table({("d", "cql"): [[steady[0], {**steady[1], "action_top_share": 1.0}], steady]})
    assert "| d | cql | one action | 1/2 | share +1.00 |" in table


def test_read_evaluations_keeps_the_action_share(tmp_path: Path) -> None:
    rows = [
        {"step": 10, "eval/return_mean": -500.0, "eval/normalized_score": 0.0, "eval/action_top_share": 1.0}
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (ev,) = read_evaluations(tmp_path)
    assert ev["action_top_share"] == 1.0


def test_the_data_return_is_never_the_evaluation_return() -> None:
    over = run([9, 10, 12, 14], 9.0, [80, 90, 70, 60])
    assert kinds(over) == ["over-estimation", "collapse"]
    # records written before `data_return_mean` carry the data's return as `return_mean`, with q_return_gap
    old = [
        {**{k: v for k, v in e.items() if k != "data_return_mean"}, "return_mean": 9.0, "q_return_gap": 0.5}
        for e in over
    ]
    assert kinds(old) == ["over-estimation", "collapse"]
    # without q_return_gap (Pendulum: no row qualifies), `return_mean` is the evaluation's: no bias at all
    evaluation_only = [{**e, "return_mean": 9.0, "q_return_gap": None} for e in old]
    assert kinds(evaluation_only) == ["collapse"]  # the score fell while Q rose; no bias to read


def test_read_evaluations_keeps_the_evaluation_return_apart(tmp_path: Path) -> None:
    rows = [
        {"step": 10, "diag/q_data_mean": -5.0, "diag/return_mean": -7.0, "diag/q_return_gap": 0.3},
        {"step": 10, "eval/return_mean": -150.0, "eval/normalized_score": 90.0, "eval/pass": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (ev,) = read_evaluations(tmp_path)
    assert ev["return_mean"] == -150.0 and ev["data_return_mean"] == -7.0 and ev["q_data_mean"] == -5.0


def test_runs_without_diagnostics_give_no_section() -> None:
    plain = [{"step": 1, "normalized_score": 10.0}, {"step": 2, "normalized_score": 80.0}]
    assert diagnose(plain) == []
    assert diagnose_table({("d", "bc"): [plain, plain]}) == []
    table = diagnose_table(
        {("d", "cql"): [run([2, 6, 10, 14], 49.0, [50] * 4), run([14] * 4, 49.0, [50] * 4)]}
    )
    assert table[0] == "## Diagnose"
    assert "| d | cql | under-training | 1/2 | bias -0.70, rise +0.08 |" in table
