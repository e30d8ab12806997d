"""offrl beside d3rlpy at equal gradient steps, from the records of one results folder.

For every d3rlpy record (written by experiments/d3rlpy/bench.py), offrl's run of the same algorithm on
the same dataset and seed is read at its evaluation at d3rlpy's last step: both evaluate at whole passes
of ceil(rows / batch size) steps with the same protocol, so a d3rlpy column trained for fewer steps than
the table (to fit the CPU budget) is compared with the table's own runs at that point, not at their end.
Prints, or writes with --out, a markdown section: the mean over seeds per dataset, and per algorithm the
IQM over (dataset, seed) with its stratified bootstrap 95% CI, over the datasets both sides finished.

    python experiments/d3rlpy/compare.py runs/bench/classic --out experiments/results/classic/d3rlpy.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from offrl.bench.stats import stratified_bootstrap_ci
from offrl.utils import atomic_write_text

OFFRL_NAME = {"bc": "bc", "cql": "cql", "iql": "iql", "td3bc": "td3bc", "bcq": "bcq"}  # d3rlpy's -> offrl's


def _records(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((results / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") == "finished":
            out.append(rec)
    return out


def _score_at(rec: dict[str, Any], step: int) -> float | None:
    for ev in rec.get("evaluations", []):
        if int(ev["step"]) == step and ev.get("normalized_score") is not None:
            return float(ev["normalized_score"])
    return None


def pairs(results: Path) -> dict[tuple[str, str], dict[int, tuple[float, float, int]]]:
    """(algorithm, dataset) -> seed -> (offrl's score, d3rlpy's score, step) at d3rlpy's last step."""
    recs = _records(results)
    offrl = {(r["cell"]["algo"], r["task"], int(r["seed"])): r for r in recs if not r.get("external")}
    out: dict[tuple[str, str], dict[int, tuple[float, float, int]]] = defaultdict(dict)
    for rec in recs:
        if rec.get("external") != "d3rlpy":
            continue
        name = rec["cell_id"].split("__")[0].removeprefix("d3rlpy-")
        mine = offrl.get((OFFRL_NAME.get(name, name), rec["task"], int(rec["seed"])))
        step = int(rec["final"]["step"])
        ours = _score_at(mine, step) if mine is not None else None
        if ours is not None and rec["final"].get("normalized_score") is not None:
            out[(name, rec["task"])][int(rec["seed"])] = (ours, float(rec["final"]["normalized_score"]), step)
    return out


def section(results: Path, version: str = "") -> list[str]:
    got = pairs(results)
    if not got:
        return []
    label = f"d3rlpy {version}".strip()
    lines = [
        f"## offrl beside {label} at equal gradient steps",
        "",
        "Normalised score at d3rlpy's last evaluation step, mean over seeds; offrl's runs are the table's, read "
        "at the same step (experiments/d3rlpy/compare.py).",
        "",
        "| dataset | algorithm | step | seeds | offrl | d3rlpy |",
        "|---|---|---|---|---|---|",
    ]
    by_algo: dict[str, list[tuple[list[float], list[float]]]] = defaultdict(list)
    for (algo, task), seeds in sorted(got.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ours = [v[0] for v in seeds.values()]
        theirs = [v[1] for v in seeds.values()]
        step = next(iter(seeds.values()))[2]
        lines.append(
            f"| {task} | {algo} | {step} | {len(seeds)} | {statistics.mean(ours):.1f} | "
            f"{statistics.mean(theirs):.1f} |"
        )
        by_algo[algo].append((ours, theirs))
    lines += [
        "",
        "| algorithm | datasets | offrl IQM [95% CI] | d3rlpy IQM [95% CI] |",
        "|---|---|---|---|",
    ]
    for algo, tasks in by_algo.items():
        ours_ci = stratified_bootstrap_ci([t[0] for t in tasks], "iqm")
        theirs_ci = stratified_bootstrap_ci([t[1] for t in tasks], "iqm")
        lines.append(f"| {algo} | {len(tasks)} | {ours_ci.format()} | {theirs_ci.format()} |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the results folder holding both sides' records")
    parser.add_argument("--out", type=Path, help="write the section to this markdown file")
    args = parser.parse_args()
    versions = {
        r.get("package_versions", {}).get("d3rlpy", "")
        for r in _records(args.results)
        if r.get("external") == "d3rlpy"
    }
    text = "\n".join(section(args.results, ", ".join(sorted(v for v in versions if v))))
    if not text:
        print(f"{args.results}: no d3rlpy record with a matching offrl run")
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
