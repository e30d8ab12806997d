"""Packed training against solo runs: aggregate member-steps/s of one packed process (K members, one
torch thread) over the steps/s of one solo process (one thread), per algorithm and K, in fp32; and the
packed process's peak RSS against K solo processes' summed peak RSS.

Every figure comes from its own fresh worker process, run one after another (never two at a time), on
synthetic batches in learning units: continuous algorithms on 11-dimensional observations and 3-dimensional
actions (Hopper's sizes), discrete ones on 8 and 4 (LunarLander's). Solo workers run ``algo.update`` as a
training run does (the speed layer's fast paths included); packed workers run ``PackedStep.update``.

    .venv/bin/python benchmarks/bench_packed.py                       # every algorithm, K = 1 2 4 8 16
    .venv/bin/python benchmarks/bench_packed.py --algos bc cql --ks 1 8 --sizes 64 --json out.json

Nothing here asserts a timing; measure with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = [
    ("bc", "continuous"),
    ("bc", "discrete"),
    ("cql", "continuous"),
    ("cql", "discrete"),
    ("iql", "continuous"),
    ("iql", "discrete"),
    ("td3bc", "continuous"),
    ("awac", "continuous"),
    ("bcq", "continuous"),
    ("bcq", "discrete"),
]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the algorithm (or a pack of it), warm up, then time updates for at least ``seconds``."""
    import dataclasses

    import gymnasium as gym
    import numpy as np
    import torch

    from offrl.algos import registry
    from offrl.fast.packing import PackedStep
    from offrl.runtime import Runtime
    from offrl.types import Batch

    runtime = Runtime(threads=1)
    runtime.apply()
    discrete = spec["variant"] == "discrete"
    obs_dim, act_dim, batch_size = (8, 4, 256) if discrete else (11, 3, 256)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    act_space = (
        gym.spaces.Discrete(act_dim) if discrete else gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
    )
    cls = registry.algorithm_class(spec["algo"], act_space)
    sizes = {}
    if spec["hidden"]:
        for f in dataclasses.fields(cls.Config):
            if f.name == "hidden" or f.name.endswith("_hidden"):
                sizes[f.name] = (spec["hidden"], spec["hidden"])
    cfg = cls.Config(**sizes)
    k = spec["members"]
    g = torch.Generator().manual_seed(0)

    def batch(lead: tuple[int, ...]) -> Batch:
        actions = (
            torch.randint(0, act_dim, (*lead, batch_size), generator=g)
            if discrete
            else torch.rand(*lead, batch_size, act_dim, generator=g) * 2 - 1
        )
        return Batch(
            obs=torch.randn(*lead, batch_size, obs_dim, generator=g),
            actions=actions,
            rewards=torch.randn(*lead, batch_size, generator=g),
            next_obs=torch.randn(*lead, batch_size, obs_dim, generator=g),
            terminals=(torch.rand(*lead, batch_size, generator=g) < 0.01).float(),
        )

    batches = [batch((k,) if spec["packed"] else ()) for _ in range(4)]
    if spec["packed"]:
        pack = PackedStep([cls(cfg, obs_space, act_space, seed=s, runtime=runtime) for s in range(k)])
        update = pack.update
    else:
        algo = cls(cfg, obs_space, act_space, seed=0, runtime=runtime)
        update = algo.update
    for i in range(3):
        update(batches[i % 4])
    steps, start = 0, time.perf_counter()
    while True:
        update(batches[steps % 4])
        steps += 1
        elapsed = time.perf_counter() - start
        if (elapsed >= spec["seconds"] and steps >= 3) or steps >= 5000:
            break
    return {
        "steps_per_second": steps / elapsed,
        "member_steps_per_second": steps * (k if spec["packed"] else 1) / elapsed,
        "steps": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
        }
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="*", help="algorithm names (default: all)")
    ap.add_argument("--ks", nargs="*", type=int, default=[1, 2, 4, 8, 16], help="pack sizes")
    ap.add_argument(
        "--sizes", nargs="*", type=int, default=[0, 64], help="hidden widths (0: the algorithm's defaults)"
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per figure")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    rows = []
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, fp32, batch 256"
    )
    print(
        f"{'algo':<18} {'hidden':>6} {'K':>3} {'solo st/s':>10} {'packed member-st/s':>19} {'ratio':>6} {'RSS ratio':>9}"
    )
    for algo, variant in VARIANTS:
        if args.algos and algo not in args.algos:
            continue
        for hidden in args.sizes:
            base = {"algo": algo, "variant": variant, "hidden": hidden, "seconds": args.seconds}
            solo = measure({**base, "packed": False, "members": 1})
            for k in args.ks:
                packed = measure({**base, "packed": True, "members": k})
                row = {**base, "members": k, "solo": solo, "packed": packed}
                if "error" not in solo and "error" not in packed:
                    row["speed_ratio"] = packed["member_steps_per_second"] / solo["steps_per_second"]
                    row["rss_ratio"] = packed["peak_rss_mb"] / (k * solo["peak_rss_mb"])
                    print(
                        f"{algo + '/' + variant:<18} {hidden or 'dflt':>6} {k:>3} {solo['steps_per_second']:>10.1f} "
                        f"{packed['member_steps_per_second']:>19.1f} {row['speed_ratio']:>6.2f} {row['rss_ratio']:>9.2f}",
                        flush=True,
                    )
                else:
                    print(
                        f"{algo}/{variant} {hidden} K={k}: {solo.get('error') or packed.get('error')}",
                        flush=True,
                    )
                rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
