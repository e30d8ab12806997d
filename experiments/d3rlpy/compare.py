"""offrl beside d3rlpy at equal gradient steps, from the records of a results folder (and, with
--more-d3rlpy, d3rlpy's runs at another budget from folders of their own).

For every d3rlpy record (written by experiments/d3rlpy/bench.py), offrl's run of the same algorithm on
the same dataset and seed is read at its evaluation at d3rlpy's last step: both evaluate at whole passes
of ceil(rows / batch size) steps with the same protocol, so a d3rlpy column trained for fewer steps than
the table (to fit the CPU budget) is compared with the table's own runs at that point, not at their end.
Prints, or writes with --out, a markdown section: the mean over seeds per dataset, and per algorithm the
IQM over (dataset, seed) with its stratified bootstrap 95% CI, over the datasets both sides finished.

    python experiments/d3rlpy/compare.py runs/bench/classic --out experiments/results/classic/d3rlpy.md \
        --same-settings runs/bench/classic-d3rlpy-settings --more-d3rlpy runs/bench/classic-d3rlpy-full
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


def _offrl_runs(results: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (r["cell"]["algo"], r["task"], int(r["seed"])): r for r in _records(results) if not r.get("external")
    }


def _label(rec: dict[str, Any]) -> str:
    """The algorithm with its action type ("cql (discrete)"): discrete and continuous CQL or BC are
    different implementations on both sides, aggregated apart."""
    name = rec["cell_id"].split("__")[0].removeprefix("d3rlpy-")
    discrete = ((rec.get("cell") or {}).get("info") or {}).get("discrete")
    return name if discrete is None else f"{name} ({'discrete' if discrete else 'continuous'})"


def _offrl_name(label: str) -> str:
    name = label.split(" (")[0].split(" at ")[0]
    return OFFRL_NAME.get(name, name)


def pairs(
    results: Path, more: tuple[Path, ...] = ()
) -> dict[tuple[str, str], dict[int, tuple[float, float, int]]]:
    """(algorithm, dataset) -> seed -> (offrl's score, d3rlpy's score, step) at d3rlpy's last step.
    ``more``: other folders of d3rlpy records (another budget, e.g. classic-cql-discrete-full.toml),
    paired with the same offrl runs; their rows are labelled with each record's last step (one row per
    algorithm where all its datasets have the same steps per pass, as the classic suite's do)."""
    offrl = _offrl_runs(results)
    out: dict[tuple[str, str], dict[int, tuple[float, float, int]]] = defaultdict(dict)
    for folder in (results, *more):
        if folder != results and not (folder / "records").is_dir():
            raise SystemExit(f"{folder}: no records folder (run experiments/d3rlpy/bench.py into it first)")
        for rec in _records(folder):
            if rec.get("external") != "d3rlpy":
                continue
            label = _label(rec)
            mine = offrl.get((_offrl_name(label), rec["task"], int(rec["seed"])))
            step = int(rec["final"]["step"])
            if folder != results:
                label = f"{label} at {step:,} steps"
            ours = _score_at(mine, step) if mine is not None else None
            if ours is not None and rec["final"].get("normalized_score") is not None:
                out[(label, rec["task"])][int(rec["seed"])] = (
                    ours,
                    float(rec["final"]["normalized_score"]),
                    step,
                )
    return out


def same_settings(
    got: dict[tuple[str, str], dict[int, tuple[float, float, int]]], folder: Path
) -> dict[tuple[str, str], dict[int, float]]:
    """offrl's runs at d3rlpy's settings (experiments/d3rlpy/offrl-at-d3rlpy-settings.toml), read at the
    step of each pair in ``got``: (algorithm, dataset) -> seed -> score."""
    if not (folder / "records").is_dir():
        raise SystemExit(f"{folder}: no records folder (run offrl-at-d3rlpy-settings.toml into it first)")
    runs = _offrl_runs(folder)
    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (algo, task), seeds in got.items():
        for seed, (_, _, step) in seeds.items():
            rec = runs.get((_offrl_name(algo), task, seed))
            score = _score_at(rec, step) if rec is not None else None
            if score is not None:
                out[(algo, task)][seed] = score
    return out


def section(
    results: Path, version: str = "", same: Path | None = None, more: tuple[Path, ...] = ()
) -> list[str]:
    got = pairs(results, more)
    if not got:
        return []
    alike = same_settings(got, same) if same is not None else {}
    label = f"d3rlpy {version}".strip()
    extra = " offrl at d3rlpy's settings |" if alike else ""
    lines = [
        f"## offrl beside {label} at equal gradient steps",
        "",
        "Normalised score at d3rlpy's last evaluation step, mean over seeds; offrl's runs are the table's, read "
        "at the same step (experiments/d3rlpy/compare.py)."
        + (
            " The last column, where present: offrl's run of the same algorithm with d3rlpy's default "
            "settings (experiments/d3rlpy/offrl-at-d3rlpy-settings.toml), read at the same step, once "
            "the same seeds have finished."
            if alike
            else ""
        ),
        "",
        f"| dataset | algorithm | step | seeds | offrl | d3rlpy |{extra}",
        "|---|---|---|---|---|---|" + ("---|" if alike else ""),
    ]
    by_algo: dict[str, list[tuple[list[float], list[float], list[float]]]] = defaultdict(list)
    for (algo, task), seeds in sorted(got.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ours = [v[0] for v in seeds.values()]
        theirs = [v[1] for v in seeds.values()]
        got_alike = alike.get((algo, task), {})
        # only where the same seeds finished on the third side too, so the columns compare like with like
        mine_alike = [got_alike[k] for k in seeds] if set(got_alike) >= set(seeds) else []
        step = next(iter(seeds.values()))[2]
        cell = f" {statistics.mean(mine_alike):.1f} |" if mine_alike else (" |" if alike else "")
        lines.append(
            f"| {task} | {algo} | {step} | {len(seeds)} | {statistics.mean(ours):.1f} | "
            f"{statistics.mean(theirs):.1f} |{cell}"
        )
        by_algo[algo].append((ours, theirs, mine_alike))
    lines += [
        "",
        f"| algorithm | datasets | offrl IQM [95% CI] | d3rlpy IQM [95% CI] |{extra}",
        "|---|---|---|---|" + ("---|" if alike else ""),
    ]
    for algo, tasks in by_algo.items():
        ours_ci = stratified_bootstrap_ci([t[0] for t in tasks], "iqm")
        theirs_ci = stratified_bootstrap_ci([t[1] for t in tasks], "iqm")
        cell = " |" if alike else ""
        if alike and all(t[2] for t in tasks):  # only over the same datasets and seeds as the other two
            cell = f" {stratified_bootstrap_ci([t[2] for t in tasks], 'iqm').format()} |"
        lines.append(f"| {algo} | {len(tasks)} | {ours_ci.format()} | {theirs_ci.format()} |{cell}")
    return [*lines, ""]


def add_d3rlpy_options(parser: argparse.ArgumentParser) -> None:
    """--same-settings and --more-d3rlpy, shared with experiments/targets.py."""
    parser.add_argument(
        "--same-settings",
        type=Path,
        metavar="DIR",
        help="results folder of experiments/d3rlpy/offrl-at-d3rlpy-settings.toml: adds a column of offrl at "
        "d3rlpy's settings",
    )
    parser.add_argument(
        "--more-d3rlpy",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of d3rlpy records at another budget (experiments/d3rlpy/"
        "classic-cql-discrete-full.toml): adds its rows, labelled with their step count (repeatable)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the results folder holding both sides' records")
    parser.add_argument("--out", type=Path, help="write the section to this markdown file")
    add_d3rlpy_options(parser)
    args = parser.parse_args()
    versions = {
        r.get("package_versions", {}).get("d3rlpy", "")
        for folder in (args.results, *args.more_d3rlpy)
        if (folder / "records").is_dir()
        for r in _records(folder)
        if r.get("external") == "d3rlpy"
    }
    version = ", ".join(sorted(v for v in versions if v))
    text = "\n".join(section(args.results, version, args.same_settings, tuple(args.more_d3rlpy)))
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
