"""The report's *Diagnose* section: runs whose ``diag/`` metrics (logged at pass ends, docs/training.md)
explain a poor or unstable score. Each run's evaluations are read in order; five findings:

- **over-estimation**: at the end, the Q-value of the data's actions lies above their discounted
  return-to-go by more than ``GAP`` of (|G| + 1), that gap grew by more than ``GROWTH`` from its
  smallest value during the run, and the final evaluation lies ``DROP`` points or more below the run's
  best: Q drifts away from what the data's actions got while the policy gets worse. Q above the data's
  returns alone is not a fault: after a data action, a policy better than the data's collects more than
  the data's own continuation did, so the Q of a policy that improves on its data lies above G (in the
  classic sweep, runs with that gap scored higher than those without; see below).
- **under-training**: at the end, Q lies more than ``GAP`` from the return-to-go and was still moving
  towards it over the last third of the run by more than ``RISE`` of (|G| + 1): rising from below, or
  falling from above where rewards are negative and Q starts above the returns (−1 per step from Q ≈ 0).
  The values had not settled (too few steps, or a target network copied too rarely), so the policy was
  read from a Q that had not converged. Q settled below the returns is the conservatism CQL is built
  for, not flagged.
- **collapse**: the final evaluation lies ``DROP`` normalised points or more below the run's best,
  while Q of the data's actions kept rising after that best evaluation, and Q is not still far below
  the returns (that rise is under-training's climb): the policy got worse as the critic got more
  optimistic.
- **off-data drift**: the final evaluation lies ``DROP`` points or more below the run's best, and after
  that best the policy moved away from the data's actions (their distance, ``action_mse`` or
  ``action_disagreement``, grew by more than ``DRIFT`` of itself) while the critic rated the policy's
  actions ever higher than the data's (``q_policy_minus_data`` grew): the policy found actions the data
  does not hold and the critic over-values. It needs no return comparison, so it also reads tasks where
  no row qualifies for one (Pendulum).
- **one action** (discrete actions): ``ONE_ACTION`` or more of the final evaluation's steps took the
  same action, whatever the state: a greedy policy reading the argmax off a Q (or logits) nearly flat
  in the action, where a near-tie resolves the same way everywhere. It reads the evaluation, not the
  ``diag/`` metrics, which cannot see it: on the data's states such a policy still varies its action.

The bias uses the means over the diagnostic rows: (mean Q − mean G) / (|mean G| + 1). The thresholds
were read off the classic-small CQL runs (cartpole: under-trained runs end at bias −0.6 to −0.75 while
still rising 0.07–0.09 per third; the settled random-data runs at −0.1); ``DRIFT`` off continuous CQL on
classic/pendulum-medium-expert (cql_alpha 10: the distance grew 68% as the score fell from 96 to 6;
cql_alpha 100: within 3%, score kept). Checked on the classic sweep's 148 runs
(experiments/results/classic-sweep): the runs flagged under-training end at a mean score of 37 (drop from
their best 17), collapse at 34 (drop 52), over-estimation at 36 (drop 40), the unflagged at 55 (drop 11);
without the drop condition, over-estimation flagged 37 runs whose mean final score was *higher* than the
unflagged runs' on the same datasets (cartpole-medium-replay 95.5 against 65.7), which is why it has one.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GAP = 0.25  # |bias| at the end beyond which Q is off the returns
GROWTH = 0.10  # growth of the bias from its best (smallest |bias|) to the end, for over-estimation
RISE = 0.05  # rise of Q over the last third of the run, per (|G| + 1), that counts as still rising
DROP = 20.0  # normalised points below the run's best evaluation that count as a collapse
DRIFT = 0.25  # relative growth of the policy's distance from the data's actions after the best evaluation
ONE_ACTION = 0.95  # share of the final evaluation's steps taken with one action (discrete actions)

KINDS = ("over-estimation", "under-training", "collapse", "off-data drift", "one action")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    evidence: dict[str, float]  # the numbers behind it, for the report's table


def data_return(ev: dict[str, Any]) -> float | None:
    """The mean return-to-go of the diagnostic rows at an evaluation, where the run logged it. Records
    written before it had its own key carry it as ``return_mean`` (over the evaluation's return), and
    only where ``q_return_gap`` was logged too; elsewhere ``return_mean`` is the evaluation's."""
    if ev.get("data_return_mean") is not None:
        return float(ev["data_return_mean"])
    if ev.get("q_return_gap") is not None and ev.get("return_mean") is not None:
        return float(ev["return_mean"])
    return None


def _bias(ev: dict[str, Any]) -> float | None:
    q, g = ev.get("q_data_mean"), data_return(ev)
    if q is None or g is None:
        return None
    return (float(q) - g) / (abs(g) + 1.0)


def diagnose(evaluations: Sequence[dict[str, Any]]) -> list[Finding]:
    """The findings of one run from its evaluations (step order; rows with ``q_data_mean``,
    ``data_return_mean`` and ``normalized_score`` as in a bench record)."""
    rows = [e for e in evaluations if _bias(e) is not None]
    findings: list[Finding] = []
    if len(rows) >= 3:
        biases = [b for b in (_bias(e) for e in rows) if b is not None]
        end = biases[-1]
        scale = abs(data_return(rows[-1]) or 0.0) + 1.0
        third = rows[max(0, len(rows) - 1 - max(1, len(rows) // 3))]
        rise = (float(rows[-1]["q_data_mean"]) - float(third["q_data_mean"])) / scale
        growth = end - min(biases, key=abs)
        if end > GAP and growth > GROWTH and _drop(evaluations) >= DROP:
            findings.append(Finding("over-estimation", {"bias": end, "growth": growth}))
        elif abs(end) > GAP and rise * (-1.0 if end > 0 else 1.0) > RISE:
            # still moving towards the returns: up from below, or down from above where rewards are
            # negative and Q starts above them (Acrobot, Pendulum, MountainCar: −1 per step from Q ≈ 0)
            findings.append(Finding("under-training", {"bias": end, "rise": rise}))
    scored = [e for e in evaluations if e.get("normalized_score") is not None]
    if len(scored) >= 2:
        best_i = max(range(len(scored)), key=lambda i: float(scored[i]["normalized_score"]))
        best, final = scored[best_i], scored[-1]
        drop = _drop(evaluations)
        q_best, q_end = best.get("q_data_mean"), final.get("q_data_mean")
        end_bias = _bias(final)
        climbing = end_bias is not None and end_bias < -GAP  # Q still far below the returns: not optimism
        if (
            drop >= DROP
            and q_best is not None
            and q_end is not None
            and float(q_end) > float(q_best)
            and not climbing
        ):
            scale = abs(data_return(final) or 0.0) + 1.0
            findings.append(
                Finding("collapse", {"drop": drop, "q_rise": (float(q_end) - float(q_best)) / scale})
            )
        drift = _drift(best, final)
        if drop >= DROP and drift is not None:
            findings.append(Finding("off-data drift", {"drop": drop, **drift}))
    if evaluations and (share := evaluations[-1].get("action_top_share")) is not None and share >= ONE_ACTION:
        findings.append(Finding("one action", {"share": float(share)}))
    return findings


def _drop(evaluations: Sequence[dict[str, Any]]) -> float:
    """Normalised points from the run's best evaluation to its last (0 without two scored ones)."""
    scores = [float(e["normalized_score"]) for e in evaluations if e.get("normalized_score") is not None]
    return max(scores) - scores[-1] if len(scores) >= 2 else 0.0


def _drift(best: dict[str, Any], final: dict[str, Any]) -> dict[str, float] | None:
    """How far the policy left the data between two evaluations, if it did (see ``DRIFT``)."""
    key = "action_mse" if best.get("action_mse") is not None else "action_disagreement"
    d_best, d_end = best.get(key), final.get(key)
    g_best, g_end = best.get("q_policy_minus_data"), final.get("q_policy_minus_data")
    if d_best is None or d_end is None or g_best is None or g_end is None:
        return None
    growth = float(d_end) / max(float(d_best), 1e-8) - 1.0
    if growth <= DRIFT or float(g_end) <= float(g_best):
        return None
    return {"distance_growth": growth, "gap_rise": float(g_end) - float(g_best)}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def diagnose_table(groups: dict[tuple[str, str], list[list[dict[str, Any]]]]) -> list[str]:
    """Markdown lines: one row per (dataset, algorithm, finding) with the seeds it holds for and the
    median of its evidence. ``groups``: (dataset, algorithm) -> each seed's evaluations."""
    rows = []
    for (task, algo), runs in groups.items():
        per_seed = [diagnose(evs) for evs in runs]
        for kind in KINDS:
            hits = [f for fs in per_seed for f in fs if f.kind == kind]
            if not hits:
                continue
            evidence = ", ".join(
                f"{k} {_median([h.evidence[k] for h in hits]):+.2f}"
                if k != "drop"
                else f"drop {_median([h.evidence[k] for h in hits]):.1f} points"
                for k in hits[0].evidence
            )
            rows.append(f"| {task} | {algo} | {kind} | {len(hits)}/{len(runs)} | {evidence} |")
    if not rows:
        return []
    return [
        "## Diagnose",
        "",
        "Runs whose `diag/` metrics explain a poor or unstable score (docs/training.md, *Diagnostics*). "
        f"bias: (Q − G) / (|G| + 1) at the end, Q of the data's actions against their return-to-go; "
        f"over-estimation: bias > {GAP} and grown by > {GROWTH} while the score fell ≥ {DROP:.0f} points "
        f"from its best; under-training: |bias| > {GAP} and Q "
        f"still moving towards G by > {RISE} over the last third; collapse: final ≥ {DROP:.0f} points below the "
        "best evaluation while Q rose after it; off-data drift: final ≥ "
        f"{DROP:.0f} points below the best while the policy's distance from the data's actions grew by "
        f"> {DRIFT:.0%} and Q(s, π(s)) − Q(s, a_data) rose; one action: ≥ {ONE_ACTION:.0%} of the final "
        "evaluation's steps took the same (discrete) action. Medians over the flagged seeds.",
        "",
        "| dataset | algorithm | finding | seeds | evidence |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
