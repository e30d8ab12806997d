"""Tables and plots from a results directory's records: ``offrl report RESULTS_DIR --out REPORT_DIR``.

The primary number of an offline run is its final checkpoint's evaluation. The best evaluation during
training is shown beside it, labelled, because choosing it uses online rollouts. Across tasks, the
normalised final scores of each algorithm are aggregated with the IQM and the mean, each with a
stratified bootstrap 95% interval (see :mod:`offrl.bench.stats`).

REPORT_DIR/report.md, REPORT_DIR/curves-<dataset>.png, REPORT_DIR/diag-<dataset>.png (where runs
logged ``diag/`` metrics), REPORT_DIR/aggregate.png and, when online records exist,
REPORT_DIR/online-<env>.png; every file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offrl import config as cfgmod
from offrl.bench.diagnose import diagnose_table
from offrl.bench.grid import Cell, slug
from offrl.bench.stats import Interval, mean_std, stratified_bootstrap_ci
from offrl.errors import OfflineRLError
from offrl.utils import atomic_path, atomic_write_text

BEST_LABEL = "best during training (uses online rollouts)"


def load_records(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record under RESULTS_DIR/records, in file-name order."""
    folder = Path(results_dir) / "records"
    if not folder.is_dir():
        raise OfflineRLError(
            f"{results_dir}: no records/ folder (is this an `offrl bench` results directory?)"
        )
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise OfflineRLError(f"{path}: not valid JSON ({exc})") from None
    return records


def _expected_cells(results_dir: Path) -> list[dict[str, Any]]:
    try:
        cells = json.loads((results_dir / "cells.json").read_text()).get("cells", [])
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return cells if isinstance(cells, list) else []


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _score(ev: dict[str, Any] | None, key: str) -> float | None:
    if not ev:
        return None
    v = ev.get(key)
    return float(v) if isinstance(v, (int, float)) else None


@dataclass
class _Group:
    """The records of one (task, algorithm) pair."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "finished"]

    def values(self, which: str, key: str) -> list[float]:
        out = [_score(r.get(which), key) for r in self.ok]
        return [v for v in out if v is not None]


@dataclass
class ReportData:
    results_dir: Path
    records: list[dict[str, Any]]
    expected: list[dict[str, Any]]
    offline: dict[str, dict[str, _Group]]  # task -> algo -> group
    online: dict[str, dict[str, _Group]]  # env -> algo -> group
    algos: list[str]  # offline algorithm labels in grid order
    task_info: dict[str, dict[str, Any]]  # task -> dataset facts of its cells
    stale: list[str]  # records left out: their cell is no longer in the grid, or its config changed

    @classmethod
    def load(cls, results_dir: str | os.PathLike[str]) -> ReportData:
        root = Path(results_dir)
        records = load_records(root)
        expected = _expected_cells(root)
        stale: list[str] = []
        if expected:  # report the grid as it is now, not records of cells since removed or edited
            hashes = {c.get("cell_id"): Cell.from_dict(c).config_hash() for c in expected}
            # records of other libraries' runs on the same datasets ("external") are not grid cells
            stale = [
                str(r.get("cell_id"))
                for r in records
                if not r.get("external") and hashes.get(r.get("cell_id")) != r.get("config_hash")
            ]
            records = [r for r in records if str(r.get("cell_id")) not in stale]
        order = {c.get("cell_id"): i for i, c in enumerate(expected)}
        records.sort(key=lambda r: (order.get(r.get("cell_id"), len(order)), str(r.get("cell_id"))))
        offline: dict[str, dict[str, _Group]] = {}
        online: dict[str, dict[str, _Group]] = {}
        task_info: dict[str, dict[str, Any]] = {}
        for r in records:
            interacts = r.get("kind") in ("online", "finetune")  # curves against environment steps
            target = online if interacts else offline
            target.setdefault(str(r["task"]), {}).setdefault(str(r["algo"]), _Group()).records.append(r)
            if not interacts:
                cell = r.get("cell", {})
                task_info.setdefault(str(r["task"]), {**cell.get("info", {}), "env_id": cell.get("env_id")})
        algos = _ordered(str(r["algo"]) for r in records if r.get("kind") not in ("online", "finetune"))
        return cls(root, records, expected, offline, online, algos, task_info, stale)


# -- tables --------------------------------------------------------------------------------------------
def _fmt(values: list[float], digits: int = 1) -> str:
    return mean_std(values).format(digits)


def _dataset_table(task: str, groups: dict[str, _Group], info: dict[str, Any]) -> list[str]:
    normalised = any(g.values("final", "normalized_score") for g in groups.values())
    best_key = "normalized_score" if normalised else "return_mean"
    lines = [f"### {task}", ""]
    facts = []
    if info.get("dataset_source"):
        facts.append(f"dataset `{info['dataset_source']}`")
    if info.get("dataset_transitions"):
        facts.append(f"{info['dataset_transitions']} transitions")
    if info.get("env_id"):
        facts.append(f"evaluated in `{info['env_id']}`")
    if info.get("ref_min_return") is not None and info.get("ref_max_return") is not None:
        facts.append(f"score 0 = return {info['ref_min_return']:g}, 100 = return {info['ref_max_return']:g}")
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    best_col = BEST_LABEL + ("" if normalised else ", return")
    lines += [
        f"| algorithm | runs finished | final normalised score | final return | {best_col} |",
        "|---|---|---|---|---|",
    ]
    for algo, g in groups.items():
        n_failed = sum(1 for r in g.records if r.get("status") == "failed")
        runs = f"{len(g.ok)}/{len(g.records)}" + (f" ({n_failed} failed)" if n_failed else "")
        lines.append(
            f"| {algo} | {runs} | {_fmt(g.values('final', 'normalized_score'))} | "
            f"{_fmt(g.values('final', 'return_mean'))} | {_fmt(g.values('best_during_training', best_key))} |"
        )
    lines.append("")
    return lines


def _summary_table(data: ReportData) -> list[str]:
    """Every dataset against every algorithm of the grid in one table: the final normalised score (the
    return where the datasets carry no reference), mean ± std over seeds. The longer of the two lists
    runs down the page, so a sweep's many settings and a suite's many datasets both stay readable."""
    tasks = list(data.offline)
    own = [a for a in data.algos if any(a in g and not _external(g[a]) for g in data.offline.values())]
    if not tasks or not own:
        return []
    normalised = any(
        g.values("final", "normalized_score") for groups in data.offline.values() for g in groups.values()
    )
    key = "normalized_score" if normalised else "return_mean"
    seeds = max(
        (len(g.ok) for groups in data.offline.values() for a, g in groups.items() if a in own), default=0
    )
    if seeds == 0:
        return []

    def cell(task: str, algo: str) -> str:
        group = data.offline[task].get(algo)
        s = mean_std(group.values("final", key) if group else [])
        if s.n == 0:
            return "–"
        text = f"{s.mean:.1f}" if s.n == 1 else f"{s.mean:.1f} ± {s.std:.1f}"
        return text if s.n == seeds else f"{text} (n={s.n})"

    what = "normalised score" if normalised else "return"
    lines = [
        "## Summary",
        "",
        f"Final {what}, mean ± std over {seeds} seed{'s' if seeds != 1 else ''} (n where fewer finished); "
        "– where the pair is not in the grid or has no finished run. Other libraries' runs are in the "
        "per-dataset tables below.",
        "",
    ]
    if len(tasks) >= len(own):
        lines += ["| dataset | " + " | ".join(own) + " |", "|---" * (len(own) + 1) + "|"]
        lines += [f"| {t} | " + " | ".join(cell(t, a) for a in own) + " |" for t in tasks]
    else:
        lines += ["| algorithm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(t, a) for t in tasks) + " |" for a in own]
    return [*lines, ""]


@dataclass
class Aggregate:
    algo: str
    tasks: list[str]
    runs: int
    iqm: Interval
    mean: Interval


def aggregates(
    data: ReportData, *, n_boot: int = 2000, seed: int = 0, tasks_in: Iterable[str] | None = None
) -> list[Aggregate]:
    """Per algorithm: IQM and mean of the final normalised scores over its tasks (those of ``tasks_in``,
    default all), with stratified bootstrap 95% intervals (tasks without normalised scores are left out)."""
    keep = None if tasks_in is None else set(tasks_in)
    out = []
    for algo in data.algos:
        tasks, scores = [], []
        for task, groups in data.offline.items():
            if keep is not None and task not in keep:
                continue
            vals = groups[algo].values("final", "normalized_score") if algo in groups else []
            if vals:
                tasks.append(task)
                scores.append(vals)
        if not scores:
            continue
        iqm = stratified_bootstrap_ci(scores, "iqm", n_boot=n_boot, seed=seed)
        mean = stratified_bootstrap_ci(scores, "mean", n_boot=n_boot, seed=seed)
        out.append(Aggregate(algo, tasks, sum(len(s) for s in scores), iqm, mean))
    return out


def _aggregate_table(aggs: list[Aggregate], all_tasks: list[str], n_boot: int, seed: int) -> list[str]:
    lines = [
        "## Aggregate normalised score across tasks",
        "",
        "Final-checkpoint normalised scores. IQM: mean of the middle 50% of runs (tasks weighted equally, "
        "fractional trimming); mean: mean of the per-task means. Brackets: 95% percentile intervals from "
        f"{n_boot} stratified bootstrap resamples (runs resampled within each task; seed {seed}).",
        "",
    ]
    if not aggs:
        return [
            *lines,
            "No finished run has a normalised score (the datasets carry no reference returns).",
            "",
        ]
    lines += ["| algorithm | tasks | runs | IQM [95% CI] | mean [95% CI] |", "|---|---|---|---|---|"]
    for a in aggs:
        lines.append(
            f"| {a.algo} | {len(a.tasks)}/{len(all_tasks)} | {a.runs} | {a.iqm.format()} | {a.mean.format()} |"
        )
    partial = [a.algo for a in aggs if len(a.tasks) < len(all_tasks)]
    if partial:
        lines += [
            "",
            f"Not comparable across all tasks: {', '.join(partial)} lack(s) finished runs on some tasks.",
        ]
    lines.append("")
    return lines


LEVELS = ("random", "medium-replay", "medium-expert", "medium", "expert")  # suffix order: longest first


def task_level(task: str) -> str | None:
    """The data level a suite dataset's label ends with (classic/…-medium-replay → medium-replay)."""
    return next((lv for lv in LEVELS if task.endswith(f"-{lv}") or task == lv), None)


def report_groups(data: ReportData) -> dict[str, list[str]]:
    """Named groups of tasks to aggregate apart: by data level where the labels name one, and the
    grid's ``[report] groups`` (dataset labels; ``rest = NAME`` collects the others), e.g. the datasets a
    preset was chosen on and the held-out rest."""
    tasks = list(data.offline)
    groups: dict[str, list[str]] = {}
    for level in ("random", "medium-replay", "medium", "medium-expert", "expert"):
        members = [t for t in tasks if task_level(t) == level]
        if members and len(members) < len(tasks):
            groups[f"level: {level}"] = members
    try:
        doc = cfgmod.read_toml(data.results_dir / "grid.toml").get("report", {})
    except (OSError, OfflineRLError):
        doc = {}
    named = doc.get("groups", {}) if isinstance(doc, dict) else {}
    taken: set[str] = set()
    for name, labels in named.items():
        members = [t for t in tasks if t in {slug(str(x).split("/")[-1]) for x in labels}]
        if members:
            groups[str(name)] = members
            taken.update(members)
    rest = doc.get("rest") if isinstance(doc, dict) else None
    if rest and named:
        others = [t for t in tasks if t not in taken]
        if others:
            groups[str(rest)] = others
    return groups


def _grouped_table(data: ReportData, n_boot: int, seed: int) -> list[str]:
    groups = report_groups(data)
    if not groups:
        return []
    lines = [
        "## Aggregates by group",
        "",
        "IQM of final normalised scores [95% stratified bootstrap CI] over each group's tasks; the number "
        "of tasks with finished runs in parentheses.",
        "",
        "| algorithm | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    per_group = {
        g: {a.algo: a for a in aggregates(data, n_boot=n_boot, seed=seed, tasks_in=t)}
        for g, t in groups.items()
    }
    for algo in data.algos:
        cells = []
        for g in groups:
            a = per_group[g].get(algo)
            cells.append(f"{a.iqm.format()} ({len(a.tasks)})" if a else "")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _online_table(data: ReportData) -> list[str]:
    lines = [
        "## Online runs",
        "",
        "Final evaluation return of online baselines after their environment-step budget; offline rows "
        "repeat the final return of offline runs evaluated in the same environment, trained on a dataset "
        "of the size shown (not counting the samples spent training the behaviour policy).",
        "",
        "| environment | run | samples | final return |",
        "|---|---|---|---|",
    ]
    for env, groups in data.online.items():
        for algo, g in groups.items():
            steps = sorted({int(r.get("steps", 0)) for r in g.ok})
            samples = ", ".join(f"{s} env steps" for s in steps) or "—"
            lines.append(f"| {env} | {algo} | {samples} | {_fmt(g.values('final', 'return_mean'))} |")
        for task, groups_off in data.offline.items():
            info = data.task_info.get(task, {})
            if info.get("env_id") != env:
                continue
            for algo, g in groups_off.items():
                if not g.ok:
                    continue
                samples = f"{info.get('dataset_transitions', '?')} dataset transitions"
                lines.append(
                    f"| {env} | {algo} on {task} (offline) | {samples} | {_fmt(g.values('final', 'return_mean'))} |"
                )
    lines.append("")
    return lines


def _finetune_table(data: ReportData) -> list[str]:
    """Offline → online scores of fine-tuning runs (mean ± std over seeds), with their dips and regret."""
    rows = []
    for env, groups in data.online.items():
        for algo, g in groups.items():
            measures = [r.get("finetune") or {} for r in g.ok if r.get("kind") == "finetune"]
            if not measures:
                continue

            def cell(key: str, ms: list[dict[str, Any]] = measures) -> str:
                vals = [float(m[key]) for m in ms if m.get(key) is not None]
                return _fmt(vals)

            rows.append(
                f"| {env} | {algo} | {cell('score_start')} | {cell('score_end')} | {cell('dip')} | "
                f"{cell('auc')} | {cell('regret')} |"
            )
    if not rows:
        return []
    return [
        "## Fine-tuning",
        "",
        "Normalised scores of the offline policy (step 0) and after fine-tuning; the dip is the lowest score "
        "in the first 10% of fine-tuning minus the step-0 score; regret is 1 − the mean score during "
        "fine-tuning / 100 (CORL's). Mean ± std over seeds.",
        "",
        "| environment | run | offline (step 0) | fine-tuned | dip | area under curve | regret |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _method_of(data: ReportData, r: dict[str, Any]) -> str:
    """The fine-tuning table's row of a record: its grid's ``method``, else its label."""
    cell_id = r.get("cell_id")
    for c in data.expected:
        if c.get("cell_id") == cell_id and c.get("info", {}).get("method"):
            return str(c["info"]["method"])
    method = r.get("cell", {}).get("info", {}).get("method")
    if method:
        return str(method)
    return str(r.get("algo", "?")).removesuffix(" (fine-tuned)").removesuffix(" (online)")


def _env_refs(data: ReportData) -> dict[str, tuple[float, float]]:
    """Per environment, the reference returns of the datasets its fine-tuning runs started from, to put
    online baselines on the same normalised scale."""
    refs: dict[str, tuple[float, float]] = {}
    for env, groups in data.online.items():
        for g in groups.values():
            for r in g.ok:
                info = r.get("cell", {}).get("info", {})
                lo, hi = info.get("ref_min_return"), info.get("ref_max_return")
                if r.get("kind") == "finetune" and lo is not None and hi is not None and hi != lo:
                    refs.setdefault(env, (float(lo), float(hi)))
    return refs


def _finetune_summary(data: ReportData, n_boot: int, seed: int) -> list[str]:
    """CORL's form: per method, offline → fine-tuned normalised score in each environment (means over
    seeds), then its IQM final score and regret over environments with stratified bootstrap 95% CIs.
    Baselines from scratch have no offline score; they are normalised with the datasets' references."""
    refs = _env_refs(data)
    if not refs:
        return []
    # method -> env -> per-seed (start, end, regret)
    table: dict[str, dict[str, list[tuple[float | None, float, float]]]] = {}
    for env, groups in data.online.items():
        if env not in refs:
            continue
        lo, hi = refs[env]
        for g in groups.values():
            for r in g.ok:
                ft = r.get("finetune") or {}
                if r.get("kind") == "finetune" and ft.get("score_end") is not None:
                    row = (ft.get("score_start"), float(ft["score_end"]), float(ft.get("regret") or 0.0))
                else:
                    evs = [e for e in r.get("evaluations", []) if e.get("return_mean") is not None]
                    if not evs:
                        continue
                    norm = [100.0 * (float(e["return_mean"]) - lo) / (hi - lo) for e in evs]
                    row = (None, norm[-1], 1.0 - float(np.mean(norm)) / 100.0)
                table.setdefault(_method_of(data, r), {}).setdefault(env, []).append(row)
    envs = [e for e in data.online if e in refs]
    lines = [
        "## Fine-tuning summary",
        "",
        "Normalised score offline (step 0) → after fine-tuning, mean over seeds; baselines from scratch "
        "show only the end, normalised with the same datasets' references. IQM over every (environment, "
        "seed) of a method, with stratified bootstrap 95% intervals (strata: environments); regret is "
        "CORL's, 1 − mean score during fine-tuning / 100 (lower is better).",
        "",
        "| method | " + " | ".join(envs) + " | IQM final | IQM regret |",
        "|---|" + "---|" * (len(envs) + 2),
    ]
    for method, per_env in table.items():
        cols = []
        for env in envs:
            rows = per_env.get(env)
            if not rows:
                cols.append("")
                continue
            end = float(np.mean([x[1] for x in rows]))
            starts = [x[0] for x in rows if x[0] is not None]
            cols.append(f"{float(np.mean(starts)):.1f} → {end:.1f}" if starts else f"{end:.1f}")
        finals = [[x[1] for x in per_env[e]] for e in envs if e in per_env]
        regrets = [[x[2] for x in per_env[e]] for e in envs if e in per_env]
        final = stratified_bootstrap_ci(finals, "iqm", n_boot=n_boot, seed=seed)
        regret = stratified_bootstrap_ci(regrets, "iqm", n_boot=n_boot, seed=seed)
        lines.append(
            f"| {method} | "
            + " | ".join(cols)
            + f" | {final.point:.1f} [{final.low:.1f}, {final.high:.1f}] | "
            f"{regret.point:.2f} [{regret.low:.2f}, {regret.high:.2f}] |"
        )
    lines.append("")
    return lines


def _failures(data: ReportData) -> list[str]:
    failed = [r for r in data.records if r.get("status") != "finished"]
    recorded = {r.get("cell_id") for r in data.records}
    missing = [c.get("cell_id") for c in data.expected if c.get("cell_id") not in recorded]
    if not failed and not missing and not data.stale:
        return []
    lines = ["## Failed and missing runs", ""]
    for r in failed:
        err = str(r.get("error") or "").strip().splitlines()
        lines.append(
            f"- `{r.get('cell_id')}`: failed after {r.get('attempts')} attempt(s): {err[0] if err else '?'}"
        )
    if missing:
        lines.append(f"- not run (yet): {len(missing)} of {len(data.expected)} cells")
        lines += [f"  - {task}: {algos}" for task, algos in _missing_by_task(data, missing)]
    if data.stale:
        lines.append(
            f"- left out, recorded for a cell no longer in the grid or since edited: "
            f"{', '.join(f'`{m}`' for m in data.stale)}"
        )
    lines.append("")
    return lines


def _missing_by_task(data: ReportData, missing: list[Any]) -> list[tuple[str, str]]:
    """The grid's unrun cells per task, as "bc (seeds 0, 1, 2), cql (seed 1)": a partial grid of
    hundreds of cells reads by dataset, not as a list of ids."""
    seeds: dict[str, dict[str, list[int]]] = {}
    wanted = set(missing)
    for c in data.expected:
        if c.get("cell_id") in wanted:
            per_algo = seeds.setdefault(str(c.get("task")), {})
            per_algo.setdefault(str(c.get("algo")), []).append(int(c.get("seed") or 0))
    out = []
    for task, per_algo in seeds.items():
        parts = [
            f"{algo} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, sorted(ss)))})"
            for algo, ss in per_algo.items()
        ]
        out.append((task, ", ".join(parts)))
    return out


def _timing(data: ReportData) -> list[str]:
    rows = []
    for kind, table in (("offline", data.offline), ("online", data.online)):
        for task, groups in table.items():
            for algo, g in groups.items():
                whole = [r for r in g.ok if not r.get("resumed")]  # a resumed run timed only its tail
                sps = [float(r["steps_per_second"]) for r in whole if r.get("steps_per_second")]
                wall = [float(r["wall_time_s"]) for r in whole if r.get("wall_time_s")]
                threads = sorted({int(r.get("threads", 1)) for r in whole})
                if sps:
                    unit = "gradient" if kind == "offline" else "env"
                    rows.append(
                        f"| {task} | {algo} | {np.mean(sps):.0f} {unit} steps/s | {np.mean(wall):.0f} s | "
                        f"{', '.join(map(str, threads))} |"
                    )
    if not rows:
        return []
    head = [
        "## Speed",
        "",
        "Training steps per second (evaluation excluded) and wall time of runs that were not resumed.",
        "",
        "| task | algorithm | steps/s (mean) | wall time per run | threads |",
        "|---|---|---|---|---|",
    ]
    return [*head, *rows, "", *_cost(data)]


def _cost(data: ReportData) -> list[str]:
    """What each algorithm's column cost: the sum of its runs' wall times (evaluation included)."""
    total: dict[str, list[float]] = {}
    resumed: dict[str, int] = {}
    for table in (data.offline, data.online):
        for groups in table.values():
            for algo, g in groups.items():
                for r in g.ok:
                    if r.get("wall_time_s"):
                        total.setdefault(algo, []).append(float(r["wall_time_s"]))
                        resumed[algo] = resumed.get(algo, 0) + bool(r.get("resumed"))
    if not total:
        return []
    lines = [
        "Cost per algorithm: the sum of its finished runs' wall times (worker-hours; a resumed run counts "
        "only the part after its resume). *all* sums every row, other libraries' runs included.",
        "",
        "| algorithm | runs | worker-hours | resumed runs |",
        "|---|---|---|---|",
    ]
    for algo, walls in total.items():
        lines.append(f"| {algo} | {len(walls)} | {sum(walls) / 3600:.2f} | {resumed[algo]} |")
    everything = [w for walls in total.values() for w in walls]
    lines.append(f"| all | {len(everything)} | {sum(everything) / 3600:.2f} | {sum(resumed.values())} |")
    return [*lines, ""]


# -- plots ---------------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> None:
    """The figure as a 256-colour PNG: line plots on a white ground lose nothing visible, and the
    file is about a third of a true-colour one, which matters for reports kept in git."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path, suffix=".png") as tmp:
        palette.save(tmp, format="PNG", optimize=True)


def _curve(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds at each evaluated step (seeds evaluated at different steps each count
    where they were evaluated)."""
    by_step: dict[int, list[float]] = {}
    for r in records:
        for ev in r.get("evaluations", []):
            v = _score(ev, key)
            if v is not None:
                by_step.setdefault(int(ev["step"]), []).append(v)
    steps = np.array(sorted(by_step), dtype=np.float64)
    means = np.array([np.mean(by_step[int(s)]) for s in steps])
    stds = np.array([np.std(by_step[int(s)], ddof=1) if len(by_step[int(s)]) > 1 else 0.0 for s in steps])
    return steps, means, stds


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def line_styles(groups: dict[str, _Group], order: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Matplotlib line settings per algorithm label: a colour each, and another library's runs of an
    algorithm (records with ``external``, labelled ``LIB-ALGO (…)``) in that algorithm's colour, dashed
    with square markers, so the two implementations read as a pair. ``order``: the grid's algorithm
    labels, which take the first colours in that order, so an algorithm keeps its colour on every task.
    Up to 10 labels get matplotlib's default colours; a sweep with more gets 20 colours, then dotted and
    dash-dotted lines, counting only the labels on this plot so that its own lines stay distinct."""
    own = [a for a, g in groups.items() if not _external(g)]
    bases = {a: a.removeprefix(f"{_external(g)}-").split(" (")[0] for a, g in groups.items() if _external(g)}
    labels = list(dict.fromkeys([*order, *own, *bases.values()]))
    if len(labels) > 10:  # many labels: index only those drawn here, in the grid's order
        drawn = {*own, *bases.values()}
        labels = [a for a in labels if a in drawn]
    look = {a: _look(i, len(labels)) for i, a in enumerate(labels)}
    styles: dict[str, dict[str, Any]] = {}
    for algo in own:
        colour, dash = look[algo]
        styles[algo] = {"color": colour, "linestyle": dash, "marker": "o"}
    for algo, base in bases.items():
        styles[algo] = {"color": look[base][0], "linestyle": "--", "marker": "s"}
    return styles


def _look(index: int, count: int) -> tuple[Any, str]:
    """Colour and line style of the ``index``-th of ``count`` labels ('--' is kept for other libraries)."""
    if count <= 10:
        return f"C{index}", "-"
    from matplotlib import colormaps

    return colormaps["tab20"](index % 20), ("-", ":", "-.")[(index // 20) % 3]


def _external(group: _Group) -> str:
    """The other library that produced a group's runs ('' for offrl's own)."""
    return next((str(r["external"]) for r in group.records if r.get("external")), "")


def _legend_outside(ax: Any, handles: dict[str, Any] | None = None) -> None:
    """The legend to the right of the axes, where it hides no curve; ``handles``: label -> line, for a
    legend that also lists other panels' lines."""
    entries = () if handles is None else (list(handles.values()), list(handles))
    ax.legend(*entries, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _height_for_legend(entries: int, base: float = 4.2) -> float:
    """A figure tall enough for a legend of ``entries`` lines beside the axes (about 0.2 inch each)."""
    return max(base, 0.8 + 0.2 * entries)


def plot_learning_curves(
    task: str, groups: dict[str, _Group], out: Path, order: Sequence[str] = ()
) -> Path | None:
    normalised = any(g.values("final", "normalized_score") for g in groups.values())
    key = "normalized_score" if normalised else "return_mean"
    styles = line_styles(groups, order)
    fig = _figure(9.0, _height_for_legend(len(groups)))
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for algo, g in groups.items():
        steps, means, stds = _curve(g.ok, key)
        if steps.size == 0:
            continue
        n = len(g.ok)
        ax.plot(steps, means, markersize=3, label=f"{algo} (n={n})", **styles[algo])
        ax.fill_between(
            steps, means - stds, means + stds, color=styles[algo]["color"], alpha=0.15, linewidth=0
        )
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("normalised score" if normalised else "return")
    ax.set_title(f"{task}\nevaluation during training, mean ± std over seeds", fontsize="medium")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"curves-{slug(task)}.png"
    _save(fig, path)
    return path


DIAGNOSTICS = (
    ("q_return_gap", "|Q − G| / (|G| + 1)", "Q of the data's actions vs their return-to-go"),
    ("q_policy_minus_data", "Q(s, π(s)) − Q(s, a_data)", "the policy's actions vs the data's, by the critic"),
)


def plot_diagnostics(
    task: str, groups: dict[str, _Group], out: Path, order: Sequence[str] = ()
) -> Path | None:
    """The ``diag/`` curves of each algorithm on ``task`` (docs/training.md), beside its learning curves;
    None where no run logged any. ``order``: as for :func:`line_styles`."""
    styles = line_styles(groups, order)
    curves = {(key, algo): _curve(g.ok, key) for key, _, _ in DIAGNOSTICS for algo, g in groups.items()}
    logged = {algo for (_, algo), (steps, _, _) in curves.items() if steps.size}
    fig = _figure(12.0, _height_for_legend(len(logged)))
    handles: dict[str, Any] = {}  # one legend for both panels: the colours are shared
    axes = []
    for i, (key, ylabel, title) in enumerate(DIAGNOSTICS):
        ax = fig.add_subplot(1, len(DIAGNOSTICS), i + 1)
        for algo, g in groups.items():
            steps, means, stds = curves[key, algo]
            if steps.size == 0:
                continue
            label = f"{algo} (n={len(g.ok)})"
            (line,) = ax.plot(steps, means, markersize=3, label=label, **styles[algo])
            ax.fill_between(
                steps, means - stds, means + stds, color=styles[algo]["color"], alpha=0.15, linewidth=0
            )
            handles.setdefault(label, line)
        if not ax.lines:
            ax.text(
                0.5,
                0.5,
                "no run logged it\n(docs/training.md, Diagnostics)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                alpha=0.6,
            )
        ax.set_xlabel("gradient steps")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
        axes.append(ax)
    if not handles:
        return None
    _legend_outside(axes[-1], handles)
    fig.suptitle(f"{task}: diagnostics at pass ends (mean ± std over seeds)")
    fig.tight_layout()
    path = out / f"diag-{slug(task)}.png"
    _save(fig, path)
    return path


def plot_aggregates(
    aggs: list[Aggregate], out: Path, styles: dict[str, dict[str, Any]] | None = None
) -> Path | None:
    """IQM and mean intervals per algorithm; ``styles`` (:func:`line_styles`) gives each algorithm the
    colour of its learning curves."""
    if not aggs:
        return None
    fig = _figure(8.0, 1.2 + 0.45 * len(aggs))
    y = np.arange(len(aggs))[::-1]
    # aggregates over different task sets are not comparable: where the sets differ, each names its count
    same_tasks = len({frozenset(a.tasks) for a in aggs}) == 1
    names = [
        a.algo if same_tasks else f"{a.algo}, {len(a.tasks)} task{'s' if len(a.tasks) != 1 else ''}"
        for a in aggs
    ]
    for i, (name, pick) in enumerate((("IQM", "iqm"), ("mean", "mean"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for yy, a in zip(y, aggs):
            iv: Interval = getattr(a, pick)
            colour = (styles or {}).get(a.algo, {}).get("color")
            ax.plot([iv.low, iv.high], [yy, yy], linewidth=6, alpha=0.5, solid_capstyle="butt", color=colour)
            ax.plot([iv.point], [yy], marker="|", color="black", markersize=14)
        ax.set_yticks(y)
        ax.set_yticklabels(names if i == 0 else [])
        ax.set_xlabel(f"{name} normalised score")
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(aggs) - 0.3)
    fig.suptitle("final normalised score across tasks, stratified bootstrap 95% CIs", fontsize="medium")
    fig.tight_layout()
    path = out / "aggregate.png"
    _save(fig, path)
    return path


def plot_online_offline(env: str, data: ReportData, out: Path) -> Path | None:
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for algo, g in data.online.get(env, {}).items():
        steps, means, stds = _curve(g.ok, "return_mean")
        if steps.size == 0:
            continue
        (line,) = ax.plot(steps, means, label=f"{algo} (n={len(g.ok)})")
        ax.fill_between(steps, means - stds, means + stds, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    markers = iter("sD^vo<>phX" * 10)  # offline points often coincide: distinct hollow markers
    for task, groups in data.offline.items():
        info = data.task_info.get(task, {})
        if info.get("env_id") != env or not info.get("dataset_transitions"):
            continue
        for algo, g in groups.items():
            vals = g.values("final", "return_mean")
            if not vals:
                continue
            s = mean_std(vals)
            err = 0.0 if s.n < 2 else s.std
            ax.errorbar(
                [float(info["dataset_transitions"])],
                [s.mean],
                yerr=[[err], [err]],
                fmt=next(markers),
                fillstyle="none",
                markersize=8,
                capsize=3,
                label=f"{algo} on {task}, offline final (n={s.n})",
            )
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("environment samples (offline: dataset size)")
    ax.set_ylabel("return")
    ax.set_title(f"{env}: online vs offline")
    ax.text(
        0.01,
        0.01,
        "offline points exclude the samples spent training the behaviour policy",
        transform=ax.transAxes,
        fontsize="x-small",
        alpha=0.8,
    )
    ax.legend(loc="best", fontsize="x-small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"online-{slug(env)}.png"
    _save(fig, path)
    return path


# -- the report ----------------------------------------------------------------------------------------
def write_report(
    results_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, n_boot: int = 2000, seed: int = 0
) -> Path:
    """Write REPORT_DIR/report.md and its plots from the records in ``results_dir``; return the report path."""
    data = ReportData.load(results_dir)
    if not data.records:
        raise OfflineRLError(f"{results_dir}: no records yet (run `offrl bench` first)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    aggs = aggregates(data, n_boot=n_boot, seed=seed)
    tasks = list(data.offline)

    plots: list[Path] = []
    lines = [
        f"# Benchmark report: {data.results_dir.name}",
        "",
        f"{len(data.records)} records from `{data.results_dir}`. Primary numbers are the **final checkpoint**'s "
        "evaluation (mean ± std over seeds, sample std). The best evaluation during training is shown "
        "separately: picking it uses online rollouts, so it is not an offline result.",
        "",
    ]
    if tasks:
        lines += _summary_table(data)
        lines += ["## Per-dataset results", ""]
        for task in tasks:
            lines += _dataset_table(task, data.offline[task], data.task_info.get(task, {}))
            p = plot_learning_curves(task, data.offline[task], out_dir, data.algos)
            if p is not None:
                plots.append(p)
                lines += [f"![learning curves on {task}]({p.name})", ""]
            p = plot_diagnostics(task, data.offline[task], out_dir, data.algos)
            if p is not None:
                plots.append(p)
                lines += [f"![diagnostics on {task}]({p.name})", ""]
        lines += _aggregate_table(aggs, tasks, n_boot, seed)
        lines += _grouped_table(data, n_boot, seed)
        lines += diagnose_table(
            {
                (task, algo): [r.get("evaluations", []) for r in g.ok]
                for task in tasks
                for algo, g in data.offline[task].items()
            }
        )
        every_group = {algo: g for groups in data.offline.values() for algo, g in groups.items()}
        p = plot_aggregates(aggs, out_dir, line_styles(every_group, data.algos))
        if p is not None:
            plots.append(p)
            lines += [f"![aggregate intervals]({p.name})", ""]
    if data.online:
        lines += _online_table(data)
        lines += _finetune_table(data)
        lines += _finetune_summary(data, n_boot, seed)
        for env in data.online:
            p = plot_online_offline(env, data, out_dir)
            if p is not None:
                plots.append(p)
                lines += [f"![online vs offline in {env}]({p.name})", ""]
    lines += _timing(data)
    lines += _failures(data)
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
