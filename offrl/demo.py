"""The README's main job: build two named classic datasets from their committed behaviour
policies, train BC and CQL on each, evaluate both and print a comparison table. A few minutes on
2 CPU cores.

    python -m offrl.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offrl import builtin, suites
from offrl.data.inspect import format_summary, summarize
from offrl.datasets_registry import resolve_dataset
from offrl.train import fit

# (dataset, algorithm, passes, settings): small networks and budgets that fit the time box.
PLAN: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("classic/cartpole-medium-replay", "bc", 10, {"hidden": (64, 64)}),
    (
        "classic/cartpole-medium-replay",
        "cql",
        20,
        {"hidden": (64, 64), "lr": 1e-3, "target_update_interval": 500},
    ),
    ("classic/pendulum-medium-replay", "bc", 10, {"hidden": (64, 64)}),
    ("classic/pendulum-medium-replay", "cql", 10, {"actor_hidden": (64, 64), "critic_hidden": (64, 64)}),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/demo", help="folder for the runs (replaced if it holds a demo)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per run")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every training budget (e.g. 0.1 to try it)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    rows = []
    paths = {}
    for name in dict.fromkeys(d for d, *_ in PLAN):
        paths[name] = resolve_dataset(name)
        about = (
            builtin.RECIPES[name].description
            if name in builtin.RECIPES
            else suites.get_spec(name).description
        )
        print(f"\n== {name}: {about}")
        print(format_summary(summarize(paths[name])).split("\nobservations")[0])
    for dataset, algo, passes, settings in PLAN:
        run_dir = out / f"{dataset.split('/')[-1]}-{algo}-seed{args.seed}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        epochs = max(1, round(passes * args.scale))
        print(f"\n== training {algo} on {dataset} for {epochs} passes -> {run_dir}")
        result = fit(
            algo,
            paths[dataset],
            run_dir,
            epochs=epochs,
            seed=args.seed,
            eval_every=epochs,
            eval_episodes=args.episodes,
            # one thread: these small networks gain nothing from a second one, which only contends
            **{"train.threads": 1, **settings},
        )
        ev = result.final_eval or {}
        rows.append(
            {
                "dataset": dataset,
                "algo": algo,
                "passes": result.passes,
                "steps": result.steps,
                "steps_per_s": round(result.steps_per_second),
                "return_mean": ev.get("mean"),
                "return_std": ev.get("std"),
                "normalized": ev.get("normalized_mean"),
            }
        )
    print(
        "\n== results (final checkpoint, deterministic actions, "
        f"{args.episodes} evaluation episodes; normalised: 0 = random, 100 = expert reference)"
    )
    header = f"{'dataset':<32} {'algo':<5} {'passes':>6} {'steps':>6} {'steps/s':>8} {'return':>18} {'normalised':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ret = f"{r['return_mean']:.1f} ± {r['return_std']:.1f}" if r["return_mean"] is not None else "-"
        norm = f"{r['normalized']:.1f}" if r["normalized"] is not None else "-"
        print(
            f"{r['dataset']:<32} {r['algo']:<5} {r['passes']:>6} {r['steps']:>6} {r['steps_per_s']:>8} {ret:>18} {norm:>10}"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"\nresults: {out / 'results.json'}; runs and tensorboard logs under {out}/ ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
