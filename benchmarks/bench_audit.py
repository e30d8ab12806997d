"""Speed of the dataset audit and of the OOD monitor.

1. ``offrl audit`` on 1,000,000 transitions: a 100k-transition HalfCheetah-v5 dataset (random policy) is
   recorded, then tiled 10× with small per-row noise (chaining of next observations kept, so the file
   passes ``offrl validate``). The audit runs in a child process; its wall time and peak resident memory
   (``ru_maxrss`` of the child) are reported. Targets: ≤ 5 minutes, < 4 GB.
2. ``policy.ood_score`` against ``policy.act`` at batch 1 (median of many calls) for a BC policy trained
   one pass on the base dataset. Target: the score costs at most what the action costs.

    .venv/bin/python benchmarks/bench_audit.py [--out DIR] [--base 100000] [--copies 10]

The machine is shared: the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's offrl, not an installed one


def synthesise(base_path: Path, out: Path, copies: int, seed: int = 0) -> int:
    from offrl.data import read_raw
    from offrl.data.writer import write_raw

    raw = read_raw(base_path)
    rng = np.random.default_rng(seed)
    n = raw.num_transitions
    std = raw.observations.std(0) * 0.01
    last = np.zeros(n, dtype=bool)
    last[raw.episode_ends - 1] = True
    parts = []
    for _ in range(copies):
        obs = raw.observations + rng.normal(size=raw.observations.shape).astype(np.float32) * std
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[last] = (
            raw.next_observations[last]
            + rng.normal(size=(int(last.sum()), obs.shape[1])).astype(np.float32) * std
        )
        parts.append((obs, nxt))
    big = dataclasses.replace(
        raw,
        observations=np.concatenate([p[0] for p in parts]),
        next_observations=np.concatenate([p[1] for p in parts]),
        actions=np.tile(raw.actions, (copies, 1)),
        rewards=np.tile(raw.rewards, copies),
        terminals=np.tile(raw.terminals, copies),
        timeouts=np.tile(raw.timeouts, copies),
        episode_ends=np.concatenate([raw.episode_ends + i * n for i in range(copies)]),
        episode_policy_ids=None
        if raw.episode_policy_ids is None
        else np.tile(raw.episode_policy_ids, copies),
        action_log_probs=None,
        infos={},
    )
    write_raw(big, out)
    return big.num_transitions


def bench_batch1(run_dir: Path, obs: np.ndarray, calls: int = 3000) -> dict[str, float]:
    import torch

    from offrl.policies.artifact import load_policy

    torch.set_num_threads(1)
    pol = load_policy(run_dir)
    out = {}
    for name, fn in (("act", lambda o: pol.act(o)), ("ood_score", lambda o: pol.ood_score(o))):
        for o in obs[:200]:
            fn(o[None])
        times = []
        for i in range(calls):
            o = obs[i % len(obs)][None]
            t = time.perf_counter()
            fn(o)
            times.append(time.perf_counter() - t)
        out[f"{name}_us_median"] = float(np.median(times) * 1e6)
        out[f"{name}_us_p90"] = float(np.quantile(times, 0.9) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_audit")
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--base", type=int, default=100_000)
    ap.add_argument("--copies", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}

    import gymnasium as gym

    from offrl.data import read_raw
    from offrl.data.recorder import record
    from offrl.policies import RandomPolicy

    base = out / "base.h5"
    if not base.exists():
        t = time.perf_counter()
        record(
            args.env,
            RandomPolicy(gym.make(args.env).action_space, seed=0),
            steps=args.base,
            seed=0,
            out=base,
            progress=False,
            obs_dtype="float32",
        )
        result["record_seconds"] = time.perf_counter() - t
    big = out / "big.h5"
    if not big.exists():
        result["transitions"] = synthesise(base, big, args.copies)
    else:
        result["transitions"] = read_raw(big).num_transitions

    cmd = [sys.executable, "-m", "offrl.cli", "audit", str(big), "--json", "--report", str(out / "report")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result["audit_seconds"] = time.perf_counter() - t
    result["audit_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        raise SystemExit(1)
    result["audit_timing"] = json.loads(proc.stdout)["timing"]

    from offrl.train import fit

    run_dir = out / "bc"
    if not (run_dir / "policy").exists():
        fit("bc", base, run_dir, epochs=1, eval_every=0, show_progress=False)
    result.update(bench_batch1(run_dir, read_raw(base).observations[:5000]))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    (out / "bench_audit.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
