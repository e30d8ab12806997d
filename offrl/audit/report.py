"""The audit as text (terminal), and as a report folder: ``audit.md`` plus one PNG per section."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from offrl.audit.core import Audit

PNG = {
    "anomalies": "anomalies.png",
    "flags": "flags.png",
    "states": "coverage_states.png",
    "actions": "coverage_actions.png",
    "policies": "returns_by_policy.png",
    "consistency": "consistency.png",
}


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def sections(result: Audit) -> list[tuple[str, list[str]]]:
    """(title, markdown lines) per section; the terminal shows the same tables."""
    rep = result.report
    an, fl, dup, cov, con = (rep[k] for k in ("anomalies", "flags", "duplicates", "coverage", "consistency"))
    out: list[tuple[str, list[str]]] = []
    m = rep["model"]
    q = an["score_quantiles"]
    lines = [
        f"Model: {m['kind']}, {m['members']} folds, hidden {m['hidden']}, {m['steps']} steps "
        f"({m['fit_seconds']:.1f} s). Score: {m['score']}.",
        f"Transition score quantiles: median {q['0.5']:.3g}, 90% {q['0.9']:.3g}, 99% {q['0.99']:.3g}, 99.9% {q['0.999']:.3g}.",
        "",
        f"Top {len(an['top_episodes'])} episodes (mean transition score; `median` high = the whole episode is off):",
        "",
        *_table(
            ["episode", "rows", "score", "median", "worst row", "length", "return"],
            [
                [
                    e["episode"],
                    f"{e['rows'][0]}..{e['rows'][1] - 1}",
                    _g(e["score"]),
                    _g(e["median"]),
                    _g(e["worst_transition"]),
                    e["length"],
                    _g(e["return"]),
                ]
                for e in an["top_episodes"]
            ],
        ),
        "",
        "Top transitions (score; its reward part r z² and dynamics part s′−s mean z²):",
        "",
        *_table(
            ["row", "episode", "score", "reward z²", "dynamics", "reward"],
            [
                [
                    t["row"],
                    t["episode"],
                    _g(t["score"]),
                    _g(t["reward_z2"]),
                    _g(t["dynamics_score"]),
                    _g(t["reward"]),
                ]
                for t in an["top_transitions"]
            ],
        ),
        "",
        "Top rows by reward residual: " + ", ".join(str(t["row"]) for t in an["top_reward_residuals"]),
        "Top rows by dynamics residual: " + ", ".join(str(t["row"]) for t in an["top_dynamics_residuals"]),
        "Top episodes by median score: " + ", ".join(str(e["episode"]) for e in an["top_episodes_by_median"]),
    ]
    out.append(("Anomaly scores", lines))

    ro, oj, os_ = fl["reward_outliers"], fl["observation_jumps"], fl["outside_observation_space"]
    lines = [
        f"- Reward outliers (robust z > {ro['threshold_z']:g} around the median {ro['median']:.4g}): {ro['count']}"
        + (
            ": " + ", ".join(f"row {r['row']} (ep {r['episode']}, r={r['reward']:.4g})" for r in ro["rows"])
            if ro["rows"]
            else ""
        ),
        f"- Observation jumps inside an episode (a step change with robust z > {oj['threshold_z']:g} against the dataset's steps): {oj['count']}"
        + (
            ": "
            + ", ".join(
                f"row {r['row']} (ep {r['episode']}, dim {r['dim']}, Δ={r['change']:.3g})" for r in oj["rows"]
            )
            if oj["rows"]
            else ""
        ),
        f"- Observations outside the declared observation space: {os_['count']} rows"
        + (": " + ", ".join(f"row {r['row']} dims {r['dims']}" for r in os_["rows"]) if os_["rows"] else ""),
    ]
    out.append(("Extreme values", lines))

    lines = [f"{dup['count']} duplicate pair(s) (every value within {dup['tolerance']:g} std of its twin)."]
    if dup["closest"]:
        lines += ["", "Closest episode pairs of equal length:", ""]
        lines += _table(
            ["episodes", "max |diff| (std)", "duplicate", "exact"],
            [
                [f"{p['episodes'][0]}, {p['episodes'][1]}", _g(p["max_abs_diff"]), p["duplicate"], p["exact"]]
                for p in dup["closest"]
            ],
        )
    out.append(("Duplicates", lines))

    acts = cov["actions"]
    lines = [f"State ranges per dimension (see `{PNG['states']}`):", ""]
    lines += _table(
        ["dim", "min", "p1", "mean", "p99", "max"],
        [
            [s["dim"], _g(s["min"]), _g(s["p01"]), _g(s["mean"]), _g(s["p99"]), _g(s["max"])]
            for s in cov["states"]
        ],
    )
    lines += ["", f"Actions (see `{PNG['actions']}`):", ""]
    if acts["kind"] == "discrete":
        lines += _table(
            ["action", "count", "share"],
            [[i, c, f"{s:.1%}"] for i, (c, s) in enumerate(zip(acts["counts"], acts["share"]))],
        )
        if acts["unused"]:
            lines.append(f"Unused actions: {acts['unused']}")
    else:
        lines += _table(
            ["dim", "low", "high", f"bins used (of {acts['bins']})", "at low bound", "at high bound"],
            [
                [
                    d["dim"],
                    _g(d["low"]),
                    _g(d["high"]),
                    f"{d['used_share']:.0%}" if "used_share" in d else "-",
                    f"{d['at_low']:.1%}" if "at_low" in d else "-",
                    f"{d['at_high']:.1%}" if "at_high" in d else "-",
                ]
                for d in acts["dims"]
            ],
        )
    if cov["by_policy"]:
        lines += ["", f"Returns and lengths per behaviour policy (see `{PNG['policies']}`):", ""]
        lines += _table(
            ["id", "policy", "episodes", "return mean ± std", "return min..max", "length mean (min..max)"],
            [
                [
                    p["policy_id"],
                    p["policy"][:60],
                    p["episodes"],
                    f"{p['return_mean']:.4g} ± {p['return_std']:.3g}",
                    f"{p['return_min']:.4g}..{p['return_max']:.4g}",
                    f"{p['length_mean']:.1f} ({p['length_min']}..{p['length_max']})",
                ]
                for p in cov["by_policy"]
            ],
        )
    out.append(("Coverage", lines))

    lines = [
        "Held-out R² of a one-step model (1: s′−s and r are a function of (s, a); near 0: unpredictable — "
        "partial observability, noise or mixed sources):",
        "",
        *_table(
            ["target", "R²"], [[k, "constant" if v is None else f"{v:.3f}"] for k, v in con["r2"].items()]
        ),
    ]
    out.append(("Transition consistency", lines))

    ro_ = rep.get("policy_rollout")
    if ro_:
        lines = [
            f"Policy {ro_['policy']} in {ro_['env']}: {ro_['episodes']} episodes, {ro_['states']:,} visited states, "
            f"return {ro_['return_mean']:.4g}.",
            f"Monitor: {ro_['monitor']}.",
            f"{ro_['ood_fraction']:.1%} of visited states score above the threshold {ro_['threshold']:.4g} "
            f"(dataset states: about {100 * (1 - ro_['quantile']):.0f}% by construction); mean score per episode "
            + ", ".join(f"{v:.3g}" for v in ro_["episode_mean_scores"])
            + ".",
            "Share of visited states outside the dataset's range, per state dim: "
            + ", ".join(f"{v:.1%}" for v in ro_["outside_range_share"])
            + f" (see `{PNG['states']}`).",
        ]
        out.append(("Where the policy leaves the data", lines))
    return out


def format_text(result: Audit) -> str:
    rep = result.report
    head = f"{rep['dataset']}: {rep['transitions']:,} transitions, {rep['episodes']:,} episodes" + (
        f" ({rep['env_id']})" if rep["env_id"] else ""
    )
    parts = [head]
    for title, lines in sections(result):
        parts += ["", f"== {title}", *lines]
    t = rep["timing"]
    parts += ["", f"audit took {t['total_seconds']:.1f} s (model {t['model_seconds']:.1f} s)"]
    return "\n".join(parts)


def write_report(result: Audit, folder: str | os.PathLike[str]) -> Path:
    """``folder/audit.md`` plus one PNG per section; returns the markdown path."""
    from offrl.utils import atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pngs = draw(result, out)
    rep = result.report
    md = [
        f"# Audit of `{Path(rep['dataset']).name}`",
        "",
        f"{rep['transitions']:,} transitions, {rep['episodes']:,} episodes"
        + (f", environment {rep['env_id']}" if rep["env_id"] else "")
        + f". Written by `offrl audit` in {rep['timing']['total_seconds']:.0f} s. Rows and episodes are 0-based indices into the file.",
    ]
    picture = {
        "Anomaly scores": "anomalies",
        "Extreme values": "flags",
        "Coverage": "states",
        "Transition consistency": "consistency",
        "Where the policy leaves the data": "states",
    }
    for title, lines in sections(result):
        md += ["", f"## {title}", "", *lines]
        key = picture.get(title)
        if key in pngs and title != "Where the policy leaves the data":
            md += ["", f"![{title}]({PNG[key]})"]
        if title == "Coverage":
            for k in ("actions", "policies"):
                if k in pngs:
                    md += ["", f"![{k}]({PNG[k]})"]
    path = out / "audit.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def draw(result: Audit, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, raw = result.report, result.raw
    made: dict[str, Path] = {}

    def save(fig: Any, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out / PNG[key], dpi=80)
        plt.close(fig)
        made[key] = out / PNG[key]

    # anomaly scores: transition score along the file, episode scores
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    s = result.model.score
    stride = max(1, s.shape[0] // 20000)
    ax[0].plot(
        np.arange(0, s.shape[0], stride), np.maximum.reduceat(s, np.arange(0, s.shape[0], stride)), lw=0.6
    )
    ax[0].set_yscale("log")
    ax[0].set_xlabel("row")
    ax[0].set_ylabel("transition score (max per bin)")
    for t in rep["anomalies"]["top_transitions"][:5]:
        ax[0].annotate(str(t["row"]), (t["row"], t["score"]), fontsize=7)
    ax[1].hist(np.log10(np.maximum(result.episode_score, 1e-6)), bins=50)
    ax[1].set_xlabel("log10 episode score (mean transition score)")
    ax[1].set_ylabel("episodes")
    save(fig, "anomalies")

    # extreme values: reward distribution with outliers, worst step change z
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    ax[0].hist(raw.rewards, bins=60, log=True)
    for r in rep["flags"]["reward_outliers"]["rows"]:
        ax[0].axvline(r["reward"], color="r", lw=0.5)
    ax[0].set_xlabel("reward (red: flagged)")
    j = result.jump_score[np.isfinite(result.jump_score)]
    ax[1].hist(np.log10(np.maximum(j, 1e-3)), bins=60, log=True)
    ax[1].axvline(np.log10(rep["flags"]["observation_jumps"]["threshold_z"]), color="r")
    ax[1].set_xlabel("log10 worst robust z of a step change s′−s (red: threshold)")
    save(fig, "flags")

    # coverage: state histograms (+ visited states of a policy)
    n = raw.num_transitions
    obs = raw.observations.reshape(n, -1)
    dims = min(obs.shape[1], 24)
    cols = min(dims, 4)
    rows = (dims + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    visited = result.rollout["states"] if result.rollout else None
    for d in range(rows * cols):
        a = axes[d // cols][d % cols]
        if d >= dims:
            a.axis("off")
            continue
        v = obs[:, d]
        lo, hi = float(v.min()), float(v.max())
        if visited is not None:
            lo, hi = min(lo, float(visited[:, d].min())), max(hi, float(visited[:, d].max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        a.hist(v, bins=bins, density=True, alpha=0.7, label="dataset")
        if visited is not None:
            a.hist(visited[:, d], bins=bins, density=True, alpha=0.6, color="C3", label="policy")
            a.axvspan(float(v.min()), float(v.max()), color="0.9", zorder=-1)
        a.set_title(f"state dim {d}", fontsize=8)
        a.tick_params(labelsize=6)
    if visited is not None:
        axes[0][0].legend(fontsize=6)
    save(fig, "states")

    # actions
    acts = rep["coverage"]["actions"]
    if acts["kind"] == "discrete":
        fig, a = plt.subplots(figsize=(5, 3))
        a.bar(np.arange(len(acts["counts"])), acts["counts"])
        a.set_xlabel("action index")
        a.set_ylabel("count")
    else:
        av = raw.actions.reshape(n, -1)
        k = min(av.shape[1], 12)
        fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.4), squeeze=False)
        for d in range(k):
            info = acts["dims"][d]
            lo = info["low"] if info["low"] is not None else float(av[:, d].min())
            hi = info["high"] if info["high"] is not None else float(av[:, d].max())
            axes[0][d].hist(av[:, d], bins=np.linspace(lo, hi if hi > lo else lo + 1e-6, acts["bins"] + 1))
            axes[0][d].set_title(f"action dim {d}", fontsize=8)
            axes[0][d].tick_params(labelsize=6)
    save(fig, "actions")

    pols = rep["coverage"]["by_policy"]
    if pols:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
        labels = [str(p["policy_id"]) for p in pols]
        ax[0].boxplot([p["returns"] for p in pols])
        ax[0].set_xticks(range(1, len(pols) + 1), labels)
        ax[0].set_xlabel("behaviour policy id")
        ax[0].set_ylabel("episode return")
        ax[1].boxplot([p["lengths"] for p in pols])
        ax[1].set_xticks(range(1, len(pols) + 1), labels)
        ax[1].set_xlabel("behaviour policy id")
        ax[1].set_ylabel("episode length")
        save(fig, "policies")

    fig, a = plt.subplots(figsize=(max(4, 0.4 * len(rep["consistency"]["r2"])), 3))
    names = list(rep["consistency"]["r2"])
    r2 = [rep["consistency"]["r2"][k] for k in names]
    a.bar(range(len(names)), [0.0 if v is None else v for v in r2])
    a.set_xticks(
        range(len(names)),
        [f"{k} (constant)" if v is None else k for k, v in zip(names, r2)],
        rotation=60,
        fontsize=7,
    )
    a.set_ylim(min([0.0] + [v for v in r2 if v is not None]), 1.0)
    a.set_ylabel("held-out R²")
    save(fig, "consistency")
    return made
