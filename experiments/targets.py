"""The classic table's targets, checked on its results folder, with the diagnostics of every miss.

Targets (means over seeds per dataset; IQM with stratified bootstrap 95% CIs for aggregates):
1. CQL and IQL ≥ BC on every ``medium-replay`` and ``random`` dataset (means less than ``TIE`` = 0.05
   points apart are a tie, which holds, marked ``=``);
2. CQL and IQL ≥ BC on the IQM over the ``medium-expert`` datasets;
3. each offrl algorithm ≥ d3rlpy's implementation of it, on the IQM over the cells both ran, at equal
   gradient steps (experiments/d3rlpy/compare.py pairs the runs).

Where CQL or IQL trails BC on a dataset, the row lists what the report's *Diagnose* section finds on the
trailing algorithm's seeds and on BC's, and each side's best evaluation during training (a run that
peaked above the other side and fell is a different problem from one that never got there).

    python experiments/targets.py runs/bench/classic --out experiments/results/classic/targets.md \
        --same-settings runs/bench/classic-d3rlpy-settings --more-d3rlpy runs/bench/classic-d3rlpy-full
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from offrl.bench.diagnose import diagnose
from offrl.bench.report import ReportData, task_level
from offrl.bench.stats import stratified_bootstrap_ci
from offrl.utils import atomic_write_text

CHALLENGERS = ("cql", "iql")
PER_DATASET_LEVELS = ("medium-replay", "random")
AGGREGATE_LEVEL = "medium-expert"
TIE = (
    0.05  # normalised points: means closer than this are a tie, on any dataset (e.g. two do-nothing policies)
)
TAIL, MOVING = 0.4, 10.0  # a mean curve that moves > 10 points over the run's last 40% has not flattened


def _compare_module() -> Any:
    path = Path(__file__).resolve().parent / "d3rlpy" / "compare.py"
    spec = importlib.util.spec_from_file_location("d3rlpy_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finals(data: ReportData, task: str, algo: str) -> list[float]:
    group = data.offline.get(task, {}).get(algo)
    return group.values("final", "normalized_score") if group else []


def _bests(data: ReportData, task: str, algo: str) -> list[float]:
    group = data.offline.get(task, {}).get(algo)
    return group.values("best_during_training", "normalized_score") if group else []


def _findings(data: ReportData, task: str, algo: str) -> str:
    group = data.offline.get(task, {}).get(algo)
    if group is None:
        return ""
    counts = Counter(f.kind for r in group.ok for f in diagnose(r.get("evaluations", [])))
    return ", ".join(f"{kind} {n}/{len(group.ok)}" for kind, n in counts.items()) or "none"


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f}" if values else "–"


def per_dataset(data: ReportData) -> tuple[list[str], int, int]:
    """Target 1: markdown lines, and how many (dataset, algorithm) comparisons held / were made."""
    lines = [
        "### CQL and IQL against BC on every medium-replay and random dataset",
        "",
        "Final normalised score, mean over seeds (best during training in brackets). Means less than "
        f"{TIE} points apart are a tie (=), which holds; their one-decimal means can print 0.1 apart. A miss "
        "lists the diagnose findings on the trailing algorithm's seeds and on BC's.",
        "",
        "| dataset | bc | cql | iql | held | diagnostics of a miss |",
        "|---|---|---|---|---|---|",
    ]
    held = made = ties = 0
    for task in sorted(data.offline):
        if task_level(task) not in PER_DATASET_LEVELS:
            continue
        bc = _finals(data, task, "bc")
        if not bc:
            continue
        cells, verdicts, notes = [], [], []
        for algo in ("bc", *CHALLENGERS):
            finals = _finals(data, task, algo)
            bests = _bests(data, task, algo)
            cells.append(f"{_mean(finals)} ({_mean(bests)})" if finals else "–")
            if algo == "bc" or not finals:
                continue
            made += 1
            gap = statistics.mean(finals) - statistics.mean(bc)
            ok = gap > -TIE
            held += ok
            ties += abs(gap) < TIE
            verdicts.append(f"{algo} {'=' if abs(gap) < TIE else '✓' if ok else '✗'}")
            if not ok:
                notes.append(f"{algo}: {_findings(data, task, algo)}; bc: {_findings(data, task, 'bc')}")
        lines.append(f"| {task} | {' | '.join(cells)} | {', '.join(verdicts)} | {'; '.join(notes)} |")
    expected = sorted(
        {str(c.get("task")) for c in data.expected if task_level(str(c.get("task"))) in PER_DATASET_LEVELS}
    )
    unrun = [t for t in expected if not all(_complete(data, t, a) for a in ("bc", *CHALLENGERS))]
    tail = f" Not yet complete: {', '.join(unrun)}." if unrun else ""
    tied = f" ({ties} a tie)" if ties == 1 else f" ({ties} ties)" if ties else ""
    return [*lines, "", f"Held: {held} of {made}{tied}.{tail}", ""], held, made


def _complete(data: ReportData, task: str, algo: str) -> bool:
    """Every cell the grid expects of (task, algo) has finished."""
    want = [c for c in data.expected if c.get("task") == task and c.get("algo") == algo]
    return len(_finals(data, task, algo)) >= len(want)


def aggregate_level(data: ReportData, level: str = AGGREGATE_LEVEL) -> list[str]:
    """Target 2: IQM over a level's datasets for BC and each challenger."""
    # the datasets where BC and both challengers have runs, so the IQMs are over the same datasets
    at_level = [t for t in sorted(data.offline) if task_level(t) == level]
    present = [a for a in ("bc", *CHALLENGERS) if any(_finals(data, t, a) for t in at_level)]
    tasks = [t for t in at_level if all(_finals(data, t, a) for a in present)]
    lines = [
        f"### CQL and IQL against BC on the IQM over {level}",
        "",
        "| algorithm | datasets | IQM [95% CI] | held |",
        "|---|---|---|---|",
    ]
    iqms: dict[str, float] = {}
    for algo in ("bc", *CHALLENGERS):
        per_task = [v for v in (_finals(data, t, algo) for t in tasks) if v]
        if not per_task:
            continue
        ci = stratified_bootstrap_ci(per_task, "iqm")
        iqms[algo] = ci.point
        verdict = "" if algo == "bc" or "bc" not in iqms else ("✓" if ci.point >= iqms["bc"] else "✗")
        lines.append(f"| {algo} | {len(per_task)} | {ci.format()} | {verdict} |")
    return [*lines, ""] if iqms else []


def against_d3rlpy(results: Path, same: Path | None = None, more: tuple[Path, ...] = ()) -> list[str]:
    """Target 3: per algorithm, the IQM of the paired runs on each side, and where ``same`` holds offrl's
    runs at d3rlpy's settings, theirs too (an implementation gap against a settings gap). ``more``:
    folders of d3rlpy runs at another budget, as rows of their own."""
    compare = _compare_module()
    got = compare.pairs(results, more)
    if not got:
        return []
    alike = compare.same_settings(got, same) if same is not None else {}
    by_algo: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for (algo, task), seeds in sorted(got.items()):
        by_algo.setdefault(algo, []).append(
            (task, [v[0] for v in seeds.values()], [v[1] for v in seeds.values()])
        )
    lines = [
        "### offrl against d3rlpy at equal gradient steps",
        "",
        "IQM over the (dataset, seed) runs both sides finished; the per-dataset pairs are in d3rlpy.md. "
        "offrl runs its `classic` preset, d3rlpy its defaults"
        + ("; the last column is offrl at d3rlpy's settings, where run." if alike else "."),
        "",
        "| algorithm | datasets | offrl IQM [95% CI] | d3rlpy IQM [95% CI] | held |"
        + (" offrl at d3rlpy's settings | held |" if alike else ""),
        "|---|---|---|---|---|" + ("---|---|" if alike else ""),
    ]
    for algo, tasks in by_algo.items():
        ours = stratified_bootstrap_ci([t[1] for t in tasks], "iqm")
        theirs = stratified_bootstrap_ci([t[2] for t in tasks], "iqm")
        verdict = "✓" if ours.point >= theirs.point else "✗"
        row = f"| {algo} | {len(tasks)} | {ours.format()} | {theirs.format()} | {verdict} |"
        if alike:
            mine = [list(alike.get((algo, t[0]), {}).values()) for t in tasks]
            if all(len(m) == len(t[1]) for m, t in zip(mine, tasks, strict=True)):  # same datasets and seeds
                same_ci = stratified_bootstrap_ci(mine, "iqm")
                row += f" {same_ci.format()} | {'✓' if same_ci.point >= theirs.point else '✗'} |"
            else:
                row += "  |  |"
        lines.append(row)
    return [*lines, ""]


def seed_curves(data: ReportData, task: str, algo: str) -> list[dict[int, float]]:
    """Each finished seed's {step: normalised score}, restricted to the steps every seed has."""
    group = data.offline.get(task, {}).get(algo)
    runs = [
        {
            int(e["step"]): float(e["normalized_score"])
            for e in r.get("evaluations", [])
            if e.get("normalized_score") is not None
        }
        for r in (group.ok if group else [])
    ]
    if not runs:
        return []
    steps = set.intersection(*(set(run) for run in runs))
    return [{s: run[s] for s in sorted(steps)} for run in runs]


def _direction(changes: list[float]) -> tuple[str, str]:
    """(kind, text): "rising" when no seed fell and some rose (a seed pinned at the score's ceiling
    stays unchanged), "falling" the reverse, "mixed" when seeds went both ways, "one seed" alone."""
    up, down = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
    flat = len(changes) - up - down
    if len(changes) < 2:
        return "one seed", "one seed: no agreement to read"
    unchanged = f", {flat} unchanged" if flat else ""
    if down == 0:
        return "rising", f"rising: {up} of {len(changes)} seeds up{unchanged}"
    if up == 0:
        return "falling", f"falling: {down} of {len(changes)} seeds down{unchanged}"
    return "mixed", f"mixed: {up} up, {down} down{unchanged}"


def still_moving(data: ReportData, tail: float = TAIL, points: float = MOVING) -> list[str]:
    """Is the budget enough? The (dataset, algorithm) pairs whose mean curve moved by more than ``points``
    over the last ``tail`` of the run (from the last evaluation at or before (1 − tail) of the final step),
    each with whether its seeds moved the same way: a curve rising on every seed wants a longer run, one
    whose seeds disagree is moving by evaluation noise or an unstable policy, not by training time."""
    rows = []
    pairs = 0
    kinds: Counter[str] = Counter()
    for task in sorted(data.offline):
        for algo, group in data.offline[task].items():
            if any(r.get("external") for r in group.records):  # another library's runs, on their own budget
                continue
            pairs += 1
            runs = seed_curves(data, task, algo)
            if not runs or len(runs[0]) < 2:
                continue
            steps = list(runs[0])
            end_step = steps[-1]
            start_steps = [s for s in steps if s <= (1.0 - tail) * end_step]
            if not start_steps:
                continue
            start_step = start_steps[-1]
            start = statistics.mean(run[start_step] for run in runs)
            end = statistics.mean(run[end_step] for run in runs)
            if abs(end - start) > points:
                kind, direction = _direction([run[end_step] - run[start_step] for run in runs])
                kinds[kind] += 1
                rows.append(
                    f"| {task} | {algo} | {start:.1f} | {end:.1f} | {end - start:+.1f} | {direction} |"
                )
    return [
        "### Have the curves flattened?",
        "",
        f"Mean curves (over seeds) that moved by more than {points:.0f} points over the last {tail:.0%} of "
        f"the run, of {pairs} (dataset, algorithm) pairs of the table; the curves are in report.md. "
        f"{kinds['rising']} rose with no seed falling (the budget is short for them), {kinds['falling']} "
        f"fell with no seed rising, {kinds['mixed']} moved with seeds going both ways (evaluation noise or "
        "an unstable policy, which a longer run would not settle)"
        + (f", {kinds['one seed']} from one seed only" if kinds["one seed"] else "")
        + ".",
        "",
        f"| dataset | algorithm | at {1.0 - tail:.0%} | final | change | seeds |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def section(results: Path, same: Path | None = None, more: tuple[Path, ...] = ()) -> list[str]:
    data = ReportData.load(results)
    first, _, _ = per_dataset(data)
    return [
        "## Targets",
        "",
        *first,
        *aggregate_level(data),
        *against_d3rlpy(results, same, more),
        *still_moving(data),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the classic table's results folder")
    parser.add_argument("--out", type=Path, help="write the section to this markdown file")
    _compare_module().add_d3rlpy_options(parser)
    args = parser.parse_args()
    if not (args.results / "records").is_dir():
        print(f"{args.results}: no records folder (run `offrl bench experiments/classic.toml` first)")
        return 1
    text = "\n".join(section(args.results, args.same_settings, tuple(args.more_d3rlpy)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
