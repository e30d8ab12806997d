"""Choose the `classic` preset from the sweep's records (experiments/presets/classic-sweep.toml).

Per algorithm and action type, the swept setting with the highest mean final normalised score over the
sweep's datasets and seeds wins (ties: the first in the grid's order). Prints the table of every swept
setting and, with --write, writes the preset file with that table in its header.

    python experiments/presets/choose.py runs/bench/classic-sweep --write offrl/presets/classic.toml
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from offrl import config as cfgmod
from offrl.bench import grid as gridmod

HERE = Path(__file__).parent
GRID = HERE / "classic-sweep.toml"


def scores(results: Path) -> dict[str, dict[str, list[float]]]:
    """label -> dataset -> final normalised scores of the finished seeds."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((results / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") == "finished" and rec.get("kind") == "offline":
            out[rec["cell"]["algo"]][rec["task"]].append(float(rec["final"]["normalized_score"]))
    return out


def choose(results: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    grid = gridmod.load_grid(GRID)
    got = scores(results)
    table: list[str] = []
    preset: dict[str, dict[str, Any]] = {}
    for variant in ("continuous", "discrete"):
        discrete = variant == "discrete"
        datasets = [
            d.label for d in grid.datasets if gridmod.dataset_facts(d.source, None).discrete == discrete
        ]
        table += ["", "| algorithm | actions | setting | " + " | ".join(datasets) + " | mean |"]
        table.append("|" + "---|" * (len(datasets) + 4))
        by_algo: dict[str, list[gridmod.AlgoSpec]] = defaultdict(list)
        for spec in grid.algos:
            if spec.only in (None, variant) and gridmod._has_variant(spec.algo, discrete):
                by_algo[spec.algo].append(spec)
        for algo, specs in by_algo.items():
            rows: list[tuple[gridmod.AlgoSpec, str, str, float | None]] = []
            for spec in specs:
                per = [statistics.mean(got[spec.label][d]) if got[spec.label][d] else None for d in datasets]
                mean = None if None in per else statistics.mean(p for p in per if p is not None)
                cols = " | ".join("–" if p is None else f"{p:.1f}" for p in per)
                shown = ", ".join(f"{k}={v}" for k, v in spec.swept.items()) or "(defaults)"
                rows.append((spec, shown, cols, mean))
            complete = [r for r in rows if r[3] is not None]
            best = max(complete, key=lambda r: r[3] or 0.0)[0] if complete else None
            for spec, shown, cols, mean in rows:
                mean_text = "(incomplete)" if mean is None else f"{mean:.1f}"
                if spec is best:
                    shown, mean_text = f"**{shown}**", f"**{mean_text}**"
                table.append(f"| {algo} | {variant} | {shown} | {cols} | {mean_text} |")
            if best is not None:
                entry = preset.setdefault(algo, {k: v for k, v in best.settings.items() if k != "preset"})
                entry[variant] = {**best.variant_settings[variant], **best.swept}
    budget = grid.budget
    for entry in preset.values():
        entry["train"] = {f"{k}": v for k, v in budget.items()}
    return preset, table


def preset_toml(preset: dict[str, dict[str, Any]], table: list[str]) -> str:
    head = [
        "The classic preset: settings for the classic suite (offrl/suites), chosen without per-dataset tuning.",
        "Chosen by the sweep experiments/presets/classic-sweep.toml on four datasets named before any run",
        "(pendulum-medium-expert, lunarlander-continuous-medium-replay, cartpole-medium-replay,",
        "lunarlander-medium-expert; 2 seeds, 20k gradient steps, 64x64 networks): per algorithm and action",
        "type, the swept setting with the highest mean final normalised score (python",
        "experiments/presets/choose.py). Validated on the other 26 classic datasets: experiments/classic.toml.",
        "Final normalised scores of the sweep (mean of the seeds; the chosen setting in bold):",
        "",
        *table,
    ]
    # one TOML table per algorithm and per sub-table of it: [cql], [cql.continuous], [cql.train], ...
    sections: dict[str, dict[str, Any]] = {}
    for algo, entry in preset.items():
        sections[algo] = {k: v for k, v in entry.items() if not isinstance(v, dict)}
        for sub, values in entry.items():
            if isinstance(values, dict):
                sections[f"{algo}.{sub}"] = values
    body = cfgmod.dumps_toml({name: values for name, values in sections.items() if values})
    return "\n".join(f"# {line}".rstrip() for line in head) + "\n" + body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the sweep's results directory (offrl bench --out)")
    parser.add_argument("--write", type=Path, help="write the preset file here")
    args = parser.parse_args()
    preset, table = choose(args.results)
    print("\n".join(table))
    if args.write:
        args.write.write_text(preset_toml(preset, table))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
