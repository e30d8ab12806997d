"""Speed of offrl's data path, each measure side by side with a bare baseline on the same machine.

    python benchmarks/bench_data.py [--rows 1000000] [--quick] [--json OUT] [--threads 1]

1. load:      ``TransitionDataset.load`` of a format-v1 file vs a raw h5py read of the same arrays
2. sampling:  ``sampler.next_batch()`` + ``dataset.batch(idx)`` vs a per-sample Python loop
3. recording: ``offrl.data.recorder.record`` vs a bare loop stepping the same vector env

Figures are ratios against the baseline measured in the same run, never assertions: the absolute
numbers move with the machine and its load; the ratios are what the goals are about.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import math
import os
import platform
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import torch

from offrl.data import format as fmt
from offrl.data.dataset import TransitionDataset
from offrl.data.recorder import record
from offrl.data.writer import write_raw
from offrl.policies import RandomPolicy
from offrl.suites import cpu_model
from offrl.utils import atomic_write_json

OBS_DIM, ACT_DIM, EPISODE_LEN, BATCH_SIZE = 11, 3, 1000, 256
GOAL_LOAD_RATIO = 1.5  # load / raw h5py read, at most
GOAL_BATCH_US = 50.0  # per batch of 256 on CPU, at most
GOAL_RECORD_FRACTION = 0.5  # recorder steps/s / bare-loop steps/s, at least


# -- machine -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    return cpu_model() or platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "gymnasium": gym.__version__,
        "mujoco": _version("mujoco"),
    }


# -- timing helpers ------------------------------------------------------------------------------


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Best wall time of each function over ``reps`` rounds; the rounds interleave the functions so
    that a burst of load from other processes hits all of them rather than one."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], _seconds(fn))
    return best


# -- 1. load -------------------------------------------------------------------------------------


def synthetic_raw(rows: int, seed: int = 0) -> fmt.RawDataset:
    """A valid format-v1 dataset shaped like Hopper: 11 float32 obs, 3 actions in [-1, 1],
    episodes of 1000 steps (the last one shorter), every third episode terminated."""
    rng = np.random.default_rng(seed)
    lengths = [EPISODE_LEN] * (rows // EPISODE_LEN) + ([rows % EPISODE_LEN] if rows % EPISODE_LEN else [])
    ends = np.cumsum(lengths).astype(np.int64)
    # one extra state per episode, so next_observations[i] == observations[i + 1] inside an episode
    states = rng.standard_normal((rows + len(lengths), OBS_DIM), dtype=np.float32)
    state_ends = ends + np.arange(1, len(lengths) + 1)
    keep_obs = np.ones(len(states), dtype=bool)
    keep_obs[state_ends - 1] = False
    keep_next = np.ones(len(states), dtype=bool)
    keep_next[state_ends - np.asarray(lengths) - 1] = False
    terminals = np.zeros(rows, dtype=bool)
    timeouts = np.zeros(rows, dtype=bool)
    terminated = np.arange(len(lengths)) % 3 == 2
    terminals[ends[terminated] - 1] = True
    timeouts[ends[~terminated] - 1] = True
    return fmt.RawDataset(
        path="<memory>",
        observations=states[keep_obs],
        actions=rng.uniform(-1.0, 1.0, (rows, ACT_DIM)).astype(np.float32),
        rewards=rng.standard_normal(rows, dtype=np.float32),
        next_observations=states[keep_next],
        terminals=terminals,
        timeouts=timeouts,
        episode_ends=ends,
        observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
        action_space=gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32),
        episode_policy_ids=np.zeros(len(lengths), dtype=np.int32),
        policies=["random"],
        env_id="Synthetic-Hopper-like",
    )


def raw_h5py_read(path: Path) -> dict[str, torch.Tensor]:
    """The floor: every array of the file read into numpy and wrapped as a tensor, nothing else."""
    out: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        for key, item in f.items():
            if isinstance(item, h5py.Dataset):
                out[key] = torch.from_numpy(np.asarray(item[()]))
    return out


def bench_load(raw: fmt.RawDataset, tmp: Path, reps: int) -> dict[str, Any]:
    path = tmp / "bench.h5"
    write_s = _seconds(lambda: write_raw(raw, path))
    problems = fmt.check(fmt.read_raw(path))
    if problems:
        raise SystemExit(f"bench_data: the synthetic dataset is invalid: {problems}")
    raw_h5py_read(path)  # first read pulls the file into the OS page cache
    in_file = fmt.read_raw(path)
    t = best_of(
        {
            "raw_h5py_s": lambda: raw_h5py_read(path),
            "read_raw_s": lambda: fmt.read_raw(path),
            "load_s": lambda: TransitionDataset.load(path, check=False),
            "check_s": lambda: fmt.check(in_file),
            "load_checked_s": lambda: TransitionDataset.load(path, check=True),
        },
        reps,
    )
    return {
        "rows": raw.num_transitions,
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "write_s": write_s,
        **t,
        "load_over_raw": t["load_s"] / t["raw_h5py_s"],
        "load_checked_over_raw": t["load_checked_s"] / t["raw_h5py_s"],
    }


# -- 2. sampling ---------------------------------------------------------------------------------


def naive_batch(ds: TransitionDataset, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-sample Python loop that batching by index arithmetic replaces."""
    rows = idx.tolist()
    return tuple(
        torch.stack([t[i] for i in rows])
        for t in (ds.observations, ds.actions, ds.rewards, ds.next_observations, ds.terminals)
    )


def bench_sampling(ds: TransitionDataset, draws: int, naive_draws: int, reps: int) -> dict[str, Any]:
    sampler = ds.sampler(BATCH_SIZE, seed=0)
    first = ds.batch(sampler.next_batch())
    # the baseline must gather the same rows, or the comparison says nothing
    check_idx = sampler.next_batch()
    fast, slow = ds.batch(check_idx), naive_batch(ds, check_idx)
    for a, b in zip((fast.obs, fast.actions, fast.rewards, fast.next_obs, fast.terminals), slow):
        if not torch.equal(a, b):
            raise SystemExit("bench_data: the naive baseline gathers different rows than dataset.batch")
    assert first.obs.shape == (BATCH_SIZE, OBS_DIM)

    def vectorised() -> None:
        for _ in range(draws):
            ds.batch(sampler.next_batch())

    def naive() -> None:
        for _ in range(naive_draws):
            naive_batch(ds, sampler.next_batch())

    t = best_of({"batch": vectorised, "naive": naive}, reps)
    us = t["batch"] / draws * 1e6
    naive_us = t["naive"] / naive_draws * 1e6
    return {
        "batch_size": BATCH_SIZE,
        "draws": draws,
        "naive_draws": naive_draws,
        "batch_us": us,
        "naive_us": naive_us,
        "naive_over_batch": naive_us / us,
    }


# -- 3. recording --------------------------------------------------------------------------------


def pick_env(requested: str) -> tuple[str, str | None]:
    """``requested`` if it can be made here, else Pendulum-v1 and the reason."""
    try:
        gym.make(requested).close()
        return requested, None
    except (ImportError, gym.error.Error) as exc:
        return "Pendulum-v1", f"{requested} unavailable ({type(exc).__name__}: {exc}); used Pendulum-v1"


def bare_loop(env_id: str, steps: int, num_envs: int) -> None:
    """Step the same kind of vector env the recorder uses (sync, same-step autoreset) with the same
    policy, storing nothing: the floor for the recorder."""
    venv = gym.make_vec(
        env_id,
        num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )
    policy = RandomPolicy(venv.single_action_space, seed=0)
    obs, _ = venv.reset(seed=0)
    for _ in range(math.ceil(steps / num_envs)):
        obs, *_ = venv.step(policy.act(obs, deterministic=False))
    venv.close()


def run_record(env_id: str, action_space: gym.Space, steps: int, num_envs: int, out: Path) -> None:
    policy = RandomPolicy(action_space, seed=0)
    record(env_id, policy, steps=steps, num_envs=num_envs, seed=0, out=out, progress=False)


def _action_space(env_id: str) -> gym.Space:
    # made once outside the timed runs: making a MuJoCo env loads its model (~0.1-0.4 s here)
    env = gym.make(env_id)
    space = env.action_space
    env.close()
    return space


def bench_recording(env_id: str, steps: int, envs: list[int], tmp: Path, reps: int) -> list[dict[str, Any]]:
    out = []
    space = _action_space(env_id)
    for k in envs:
        path = tmp / f"record_{k}.h5"
        run_record(env_id, space, min(steps, 500), k, path)  # warm-up: imports, model compilation, caches
        t = best_of(
            {
                "record": partial(run_record, env_id, space, steps, k, path),
                "bare": partial(bare_loop, env_id, steps, k),
            },
            reps,
        )
        rec_sps = steps / t["record"]
        bare_sps = math.ceil(steps / k) * k / t["bare"]
        out.append(
            {
                "env_id": env_id,
                "num_envs": k,
                "steps": steps,
                "record_steps_per_s": rec_sps,
                "bare_steps_per_s": bare_sps,
                "record_over_bare": rec_sps / bare_sps,
            }
        )
    return out


def profile_record(env_id: str, steps: int, num_envs: int, tmp: Path, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.runcall(run_record, env_id, _action_space(env_id), steps, num_envs, tmp / "profile.h5")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# -- report --------------------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    load, samp = results["load"], results["sampling"]
    rows: list[dict[str, Any]] = [
        {
            "measure": "load (no check) / raw h5py",
            "value": f"{load['load_s']:.3f} s / {load['raw_h5py_s']:.3f} s",
            "ratio": load["load_over_raw"],
            "goal": f"<= {GOAL_LOAD_RATIO}x",
            "met": load["load_over_raw"] <= GOAL_LOAD_RATIO,
        },
        {
            "measure": "load (checked) / raw h5py",
            "value": f"{load['load_checked_s']:.3f} s (check {load['check_s']:.3f} s)",
            "ratio": load["load_checked_over_raw"],
            "goal": "-",
            "met": None,
        },
        {
            "measure": f"batch of {BATCH_SIZE}: next_batch + batch",
            "value": f"{samp['batch_us']:.1f} us (naive {samp['naive_us']:.0f} us)",
            "ratio": samp["naive_over_batch"],
            "goal": f"<= {GOAL_BATCH_US:.0f} us",
            "met": samp["batch_us"] <= GOAL_BATCH_US,
        },
    ]
    for r in results["recording"]:
        rows.append(
            {
                "measure": f"record {r['env_id']} x{r['num_envs']} / bare loop",
                "value": f"{r['record_steps_per_s']:.0f} / {r['bare_steps_per_s']:.0f} steps/s",
                "ratio": r["record_over_bare"],
                "goal": f">= {GOAL_RECORD_FRACTION:.0%}",
                "met": r["record_over_bare"] >= GOAL_RECORD_FRACTION,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("measure", "value", "ratio", "goal", "met")
    cells = [
        (
            r["measure"],
            r["value"],
            f"{r['ratio']:.2f}",
            r["goal"],
            "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in (header, tuple("-" * w for w in widths), *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="transitions in the load/sampling dataset (1M; 100k with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes for a fast smoke run")
    p.add_argument("--draws", type=int, default=10_000, help="batches drawn per sampling repetition")
    p.add_argument(
        "--steps", type=int, default=None, help="env steps per recording run (20k; 5k with --quick)"
    )
    p.add_argument("--envs", type=int, nargs="+", default=[1, 4], help="num_envs values to record with")
    p.add_argument("--env", default="Hopper-v5", help="env id to record (falls back to Pendulum-v1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the best of each is reported")
    p.add_argument(
        "--load-reps", type=int, default=5, help="repetitions of the load measures (each under a second)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one recording run (the num_envs furthest from its bare loop)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    rows = args.rows if args.rows is not None else (100_000 if args.quick else 1_000_000)
    steps = args.steps if args.steps is not None else (5_000 if args.quick else 20_000)
    draws = min(args.draws, 2_000) if args.quick else args.draws
    if rows < BATCH_SIZE or min(steps, draws, args.reps, args.load_reps, args.threads, *args.envs) < 1:
        p.error(
            f"need --rows >= {BATCH_SIZE} and positive --steps, --draws, --reps, --load-reps, --threads, --envs"
        )
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OFFRL_NO_PROGRESS", "1")

    results: dict[str, Any] = {"machine": machine()}
    env_id, note = pick_env(args.env)
    results["config"] = {
        "rows": rows,
        "draws": draws,
        "record_steps": steps,
        "num_envs": args.envs,
        "env_id": env_id,
        "reps": args.reps,
        "load_reps": args.load_reps,
        "note": note,
    }
    m = results["machine"]
    print(f"{m['date']}  {m['cpu']}  {m['cores']} cores  load average {m['load_average']}")
    print(
        f"python {m['python']}  torch {m['torch']} ({m['torch_threads']} threads)  numpy {m['numpy']}  "
        f"h5py {m['h5py']} (HDF5 {m['hdf5']})  gymnasium {m['gymnasium']}  mujoco {m['mujoco']}"
    )
    if note:
        print(f"note: {note}")

    with tempfile.TemporaryDirectory(prefix="offrl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        raw = synthetic_raw(rows)
        print(f"\n[load] {rows} rows, best of {args.load_reps}", flush=True)
        results["load"] = load = bench_load(raw, tmp, args.load_reps)
        print(
            f"  file {load['file_mb']} MB (written in {load['write_s']:.2f} s)  raw h5py {load['raw_h5py_s']:.3f} s  "
            f"read_raw {load['read_raw_s']:.3f} s  load {load['load_s']:.3f} s  check {load['check_s']:.3f} s  "
            f"load+check {load['load_checked_s']:.3f} s"
        )
        ds = TransitionDataset(raw)
        del raw
        naive_draws = max(
            1, draws // 50
        )  # the loop is ~100x slower; fewer draws give the same per-batch time
        print(
            f"\n[sampling] {draws} batches of {BATCH_SIZE} (naive: {naive_draws}), best of {args.reps}",
            flush=True,
        )
        results["sampling"] = samp = bench_sampling(ds, draws, naive_draws, args.reps)
        print(f"  next_batch + batch {samp['batch_us']:.1f} us   naive loop {samp['naive_us']:.0f} us")
        del ds
        print(f"\n[recording] {env_id}, {steps} steps, num_envs {args.envs}, best of {args.reps}", flush=True)
        results["recording"] = bench_recording(env_id, steps, args.envs, tmp, args.reps)
        for r in results["recording"]:
            print(
                f"  num_envs {r['num_envs']}: record {r['record_steps_per_s']:.0f} steps/s   "
                f"bare {r['bare_steps_per_s']:.0f} steps/s"
            )
        if args.profile:
            k = min(results["recording"], key=lambda r: r["record_over_bare"])["num_envs"]
            print(f"\n[profile] record {env_id} num_envs {k}, {steps} steps, by own time")
            results["record_profile"] = text = profile_record(env_id, steps, k, tmp)
            print(text)

    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["summary"] = summary(results)
    print(f"\nload average at the end {results['machine']['load_average_end']}\n")
    print_table(results["summary"])
    if args.json is not None:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
