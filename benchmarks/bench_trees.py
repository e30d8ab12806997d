"""Training speed of two offrl source trees side by side: did a change make updates slower?

    git worktree add ../offrl-old <commit>
    python benchmarks/bench_trees.py --old ../offrl-old [--new .] [--algos bc cql ...] [--rounds 5]
        [--seconds 3] [--threads 1] [--json OUT]

Each tree runs its own ``benchmarks/bench_train.py`` worker (so each speaks its own API) with
``PYTHONPATH`` set to that tree, on the same synthetic data and network sizes. Every round runs each
worker in turn for about ``--seconds``, alternating which tree goes first, so load from other processes
hits both alike; the ratio new/old is taken per round and its median reported, with the range over
rounds. BC, CQL and discrete CQL are measured in float32 and bfloat16, the other algorithms in float32.
Measure with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ALGOS, PRECISION_ALGOS, Worker, machine, start_worker

TREE_WORKER = "benchmarks/bench_train.py"


def start(label: str, tree: Path, argv: list[str]) -> Worker:
    """``tree``'s own training-benchmark worker, importing offrl from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return start_worker(label, sys.executable, argv, env, script=tree / TREE_WORKER)


def measure(old: Path, new: Path, algo: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--worker", "offrl", "--algo", algo, "--threads", str(args.threads), "--precision", precision]
    workers = {"old": start("old", old, argv), "new": start("new", new, argv)}
    try:
        # size a round from a short probe of each worker
        steps = {}
        for key, w in workers.items():
            probe = w.ask({"steps": 5})
            steps[key] = max(5, int(args.seconds * 5 / max(probe["wall"], 1e-6)))
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for key in order:
                reply = workers[key].ask({"steps": steps[key]})
                rates[key].append(steps[key] / reply["wall"])
        ratios = [n / o for n, o in zip(rates["new"], rates["old"], strict=True)]
        return {
            "algo": algo,
            "precision": precision,
            "old_steps_per_s": round(statistics.median(rates["old"]), 1),
            "new_steps_per_s": round(statistics.median(rates["new"]), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        }
    finally:
        for w in workers.values():
            w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the baseline source tree (a git worktree)")
    p.add_argument(
        "--new", type=Path, default=Path(__file__).resolve().parent.parent, help="the tree to check"
    )
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every worker")
    p.add_argument("--rounds", type=int, default=5, help="measurement rounds (median of per-round ratios)")
    p.add_argument("--seconds", type=float, default=3.0, help="wall seconds per worker per round")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    old, new = args.old.resolve(), args.new.resolve()
    info = machine(args.threads)
    print(f"# {info['cpu']}, torch {info['torch']}, {args.threads} thread(s), load {info['load_average']}")
    print(f"# old: {old}\n# new: {new}")
    print(f"{'algorithm':<14}{'precision':<10}{'old /s':>10}{'new /s':>10}{'new/old':>9}  range")
    rows = []
    for algo in args.algos:
        for precision in ("fp32", "bf16") if algo in PRECISION_ALGOS else ("fp32",):
            row = measure(old, new, algo, precision, args)
            rows.append(row)
            print(
                f"{algo:<14}{precision:<10}{row['old_steps_per_s']:>10}{row['new_steps_per_s']:>10}"
                f"{row['ratio']:>9.3f}  {row['ratio_min']:.3f}-{row['ratio_max']:.3f}",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
