"""The README's main job: offline RL doing what it is for, in about two minutes on one CPU thread.

classic/pendulum-medium-replay holds rollouts of snapshots of an agent taken while it learned to swing
Pendulum up, from flailing to medium: imitating that mixture (BC) reproduces its average, while a
value-based algorithm (CQL, IQL) learns from the rewards which of its actions were good. Each trains
from the ``classic`` preset (`offrl presets classic`: the settings of the full classic table, chosen on
other datasets) for 10 passes, seed 0, 1 thread, fp32, and is evaluated as the table evaluates. These
are the first evaluation points of the table's seed-0 runs (experiments/results/classic), so the demo
prints the numbers the table's records hold for them; another CPU may differ by run-to-run noise.

    python -m offrl.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from offrl import builtin, suites
from offrl.data.inspect import format_summary, summarize
from offrl.datasets_registry import resolve_dataset
from offrl.train import fit

DATASET = "classic/pendulum-medium-replay"
ALGOS = ("bc", "cql", "iql")
PASSES = 10  # the full classic table's first evaluation point (experiments/classic.toml: eval_every)
# The table's evaluation protocol (experiments/classic.toml) and a pinned runtime (CPU, 1 thread, fp32):
# the numbers do not depend on the machine's core count or on whether it has a GPU.
SETTINGS = {
    "preset": "classic",
    "train.eval_episodes": 10,
    "train.threads": 1,
    "runtime.precision": "fp32",
}
# The full classic table's seed-0 runs at this point (normalised scores at pass 10 in their records;
# experiments/results/classic, grid experiments/classic.toml), computed on x86-64 with torch 2.13.0+cpu.
TABLE: dict[str, float] = {"bc": 23.1, "cql": 19.8, "iql": 100.6}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/demo", help="folder for the runs (each algorithm's run is replaced)"
    )
    parser.add_argument(
        "--passes", type=int, default=PASSES, help="full passes over the data per algorithm (≥ 1)"
    )
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    out = Path(args.out)
    t0 = time.perf_counter()
    path = resolve_dataset(DATASET)
    about = (
        builtin.RECIPES[DATASET].description
        if DATASET in builtin.RECIPES
        else suites.get_spec(DATASET).description
    )
    print(f"== {DATASET}: {about}")
    print(format_summary(summarize(path)).split("\nobservations")[0])
    rows = []
    for algo in ALGOS:
        run_dir = out / f"{algo}-seed0"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"\n== {algo}: {args.passes} passes, preset classic -> {run_dir}")
        started = time.perf_counter()
        result = fit(
            algo,
            path,
            run_dir,
            epochs=args.passes,
            seed=0,
            device="cpu",
            **{**SETTINGS, "train.eval_every": args.passes},
        )
        ev = result.final_eval or {}
        rows.append(
            {
                "algo": algo,
                "passes": result.passes,
                "steps": result.steps,
                "seconds": round(time.perf_counter() - started, 1),
                "return_mean": ev.get("mean"),
                "return_std": ev.get("std"),
                "normalized": ev.get("normalized_mean"),
                "table": TABLE.get(algo) if args.passes == PASSES else None,
            }
        )
    print(
        f"\n== {DATASET}, seed 0, after {args.passes} pass{'es' if args.passes != 1 else ''} (deterministic actions, "
        f"{SETTINGS['train.eval_episodes']} episodes; "
        "normalised: 0 = random, 100 = expert reference)"
    )
    header = f"{'algo':<5} {'steps':>6} {'seconds':>8} {'return':>18} {'normalised':>10} {'table':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ret = f"{r['return_mean']:.1f} ± {r['return_std']:.1f}" if r["return_mean"] is not None else "-"
        norm = f"{r['normalized']:.1f}" if r["normalized"] is not None else "-"
        table = f"{r['table']:.1f}" if r["table"] is not None else "-"
        print(f"{r['algo']:<5} {r['steps']:>6} {r['seconds']:>8} {ret:>18} {norm:>10} {table:>10}")
    print(
        "\ntable: the full classic table's seed-0 runs at this point (experiments/results/classic); "
        "another CPU or torch build may differ by run-to-run noise."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"results: {out / 'results.json'}; runs and tensorboard logs under {out}/ ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
