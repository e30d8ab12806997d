"""The report's Diagnose section on hand-built evaluation histories: each finding fires on the shape it
describes and stays quiet on its near misses."""

from __future__ import annotations

from offrl.bench.diagnose import DROP, GAP, diagnose, diagnose_table


def run(q: list[float], g: float, scores: list[float]) -> list[dict[str, float]]:
    return [
        {"step": 1000 * (i + 1), "q_data_mean": qi, "return_mean": g, "normalized_score": s}
        for i, (qi, s) in enumerate(zip(q, scores, strict=True))
    ]


def kinds(evs: list[dict[str, float]]) -> list[str]:
    return [f.kind for f in diagnose(evs)]


def test_over_estimation_needs_a_large_and_growing_gap() -> None:
    g = 9.0  # |G| + 1 = 10
    assert kinds(run([9, 10, 12, 14], g, [50] * 4)) == ["over-estimation"]  # bias +0.5, grown from 0
    assert kinds(run([13, 13, 13, 13], g, [50] * 4)) == []  # +0.4 but constant: no drift
    assert kinds(run([9, 9.5, 10, 10.5], g, [50] * 4)) == []  # grown, but only to +0.15


def test_under_training_needs_q_below_and_still_rising() -> None:
    g = 49.0  # |G| + 1 = 50
    assert kinds(run([2, 6, 10, 14], g, [50] * 4)) == [
        "under-training"
    ]  # bias −0.7, rising 0.08 over the last third
    assert kinds(run([14, 14, 14, 14.5], g, [50] * 4)) == []  # below, but settled: conservatism
    assert kinds(run([40, 44, 46, 48], g, [50] * 4)) == []  # rising, but close to G


def test_collapse_is_a_drop_while_q_rises_unless_q_is_still_climbing() -> None:
    g = 9.0
    assert kinds(run([9, 9.5, 9.8, 10], g, [90, 95, 60, 60])) == ["collapse"]
    assert kinds(run([9, 9.5, 9.8, 10], g, [90, 95, 80, 76])) == []  # 19 points: within DROP
    assert kinds(run([9, 9.5, 9.8, 9.4], g, [90, 95, 60, 60])) == []  # Q fell with the score
    # Q far below the returns and climbing: under-training, not optimism
    assert kinds(run([1, 5, 9, 13], 49.0, [90, 95, 60, 60])) == ["under-training"]
    assert DROP == 20.0 and GAP == 0.25  # the documented thresholds (docs/training.md)


def test_runs_without_diagnostics_give_no_section() -> None:
    plain = [{"step": 1, "normalized_score": 10.0}, {"step": 2, "normalized_score": 80.0}]
    assert diagnose(plain) == []
    assert diagnose_table({("d", "bc"): [plain, plain]}) == []
    table = diagnose_table(
        {("d", "cql"): [run([2, 6, 10, 14], 49.0, [50] * 4), run([14] * 4, 49.0, [50] * 4)]}
    )
    assert table[0] == "## Diagnose"
    assert "| d | cql | under-training | 1/2 | bias -0.70, rise +0.08 |" in table
