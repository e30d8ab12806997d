"""Speed of ``offrl convert --from minari`` against minari iterating the same episodes itself.

    python benchmarks/bench_minari.py [--steps 1000000] [--episode-len 1000] [--reps 3] [--json OUT]

A Minari dataset of ``--steps`` transitions (obs 17 float32, actions 6 float32 in [-1, 1], episodes of
``--episode-len`` steps, written by minari's ``create_dataset_from_buffers`` into a temporary root) is
1. iterated by minari: ``for ep in dataset.iterate_episodes()``, touching every array;
2. converted by offrl: ``import_minari(id, out.h5)``: minari's iteration, the concatenation, the format-v1
   checks and the atomic file write.
The figure is the ratio of the two (goal: at most 2×), best of ``--reps`` interleaved repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

OBS_DIM, ACT_DIM = 17, 6
GOAL_RATIO = 2.0


def build(root: Path, steps: int, episode_len: int) -> str:
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(max(1, steps // episode_len)):
        t = episode_len
        done = np.zeros(t, dtype=bool)
        done[-1] = True
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=rng.normal(size=(t + 1, OBS_DIM)).astype(np.float32),
                actions=rng.uniform(-1, 1, size=(t, ACT_DIM)).astype(np.float32),
                rewards=rng.normal(size=t),
                terminations=done if i % 2 else np.zeros(t, dtype=bool),
                truncations=np.zeros(t, dtype=bool) if i % 2 else done,
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "bench/synthetic-v0",
            buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        )
    return "bench/synthetic-v0"


def minari_iterate(dataset_id: str) -> float:
    import minari

    start = time.perf_counter()
    ds = minari.load_dataset(dataset_id)
    total = 0.0
    for ep in ds.iterate_episodes():
        total += float(ep.observations[0, 0]) + float(ep.actions[0, 0]) + float(ep.rewards[0])
        total += float(ep.terminations[-1]) + float(ep.truncations[-1])
    return time.perf_counter() - start


def offrl_convert(dataset_id: str, out: Path) -> float:
    from offrl.data.minari_io import import_minari

    out.unlink(missing_ok=True)
    start = time.perf_counter()
    import_minari(dataset_id, out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--episode-len", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import minari

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dataset_id = build(Path(tmp) / "root", args.steps, args.episode_len)
        built = time.perf_counter() - t0
        out = Path(tmp) / "converted.h5"
        minari_iterate(dataset_id)  # warm the page cache for both readers
        iterate_s, convert_s = [], []
        for _ in range(args.reps):
            iterate_s.append(minari_iterate(dataset_id))
            convert_s.append(offrl_convert(dataset_id, out))
        size_mb = out.stat().st_size / 1e6
    figures: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "python": platform.python_version(),
            "minari": minari.__version__,
            "numpy": np.__version__,
        },
        "steps": args.steps,
        "episodes": max(1, args.steps // args.episode_len),
        "build_s": built,
        "minari_iterate_s": min(iterate_s),
        "offrl_convert_s": min(convert_s),
        "ratio": min(convert_s) / min(iterate_s),
        "goal_ratio": GOAL_RATIO,
        "converted_mb": size_mb,
    }
    print(json.dumps(figures["machine"]))
    print(
        f"{args.steps:,} transitions in {figures['episodes']} episodes (dataset written in {built:.1f} s)\n"
        f"minari iterate_episodes: {figures['minari_iterate_s']:.2f} s (best of {args.reps})\n"
        f"offrl import_minari:     {figures['offrl_convert_s']:.2f} s (best of {args.reps}), {size_mb:.0f} MB written\n"
        f"ratio convert / iterate: {figures['ratio']:.2f}x (goal ≤ {GOAL_RATIO}x: "
        f"{'met' if figures['ratio'] <= GOAL_RATIO else 'NOT met'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
