"""d3rlpy's implementations on offrl's datasets, recorded for `offrl report` beside offrl's runs.

Each cell trains in d3rlpy's virtual environment (train_d3rlpy.py, one torch thread), which saves its
policy as TorchScript at every evaluation point; here, in offrl's environment, each saved policy is
evaluated with offrl's protocol (offrl.evaluation.evaluate: the trainer's evaluation seed, episodes
and vectorisation, normalised with the dataset's references) and the cell's record is written to
RESULTS/records/d3rlpy-ALGO__DATASET__sSEED.json, labelled "d3rlpy-ALGO (VERSION, N passes)".

    python experiments/d3rlpy/bench.py experiments/d3rlpy/classic.toml --out runs/bench/classic
    # on two cores, two processes: --shard 0/2 and --shard 1/2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from offrl import config as cfgmod
from offrl.bench.grid import dataset_facts, slug
from offrl.datasets_registry import resolve_dataset
from offrl.evaluation import evaluate
from offrl.train import TrainConfig
from offrl.utils import atomic_write_text

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


class TorchScriptPolicy:
    """A d3rlpy policy saved as TorchScript: environment observations in, environment actions out."""

    def __init__(self, path: Path) -> None:
        self.module = torch.jit.load(str(path))
        self.path = path

    def __repr__(self) -> str:
        return str(self.path)

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.as_tensor(obs, dtype=torch.float32)).numpy()


def d3rlpy_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import d3rlpy; print(d3rlpy.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def label_of(algo: str, version: str, passes: int) -> str:
    """The report's row label: d3rlpy's version and budget, which may stop short of the table's."""
    return f"d3rlpy-{algo} ({version}, {passes} passes)"


def run_cell(
    python: Path, version: str, algo: str, source: str, seed: int, plan: dict[str, Any], results: Path
) -> Path | None:
    label = source.split("/")[-1]
    cell_id = f"d3rlpy-{algo}__{slug(label)}__s{seed}"
    record_path = results / "records" / f"{cell_id}.json"
    if record_path.exists():
        return None
    data = Path(resolve_dataset(source))
    facts = dataset_facts(str(data), None)
    with h5py.File(data, "r") as f:
        rows = len(f["rewards"])
    per_pass = math.ceil(rows / plan["batch_size"])
    passes = math.ceil(plan["steps"] / per_pass)
    run_dir = results / "d3rlpy-runs" / cell_id
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (run_dir / "done.json").exists():
        cmd = [
            str(python),
            str(HERE / "train_d3rlpy.py"),
            "--algo",
            algo,
            "--data",
            str(data),
            "--passes",
            str(passes),
            "--steps-per-pass",
            str(per_pass),
            "--eval-every",
            str(plan["eval_every"]),
            "--seed",
            str(seed),
            "--hidden",
            *map(str, plan["hidden"]),
            "--batch-size",
            str(plan["batch_size"]),
            "--out",
            str(run_dir),
        ]
        with open(run_dir / "train.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    train = TrainConfig()
    evaluations = []
    for policy in sorted(run_dir.glob("policy-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
        step = int(policy.stem.split("-")[1])
        result = evaluate(
            TorchScriptPolicy(policy),
            str(facts.env_id),
            episodes=plan["eval_episodes"],
            seed=train.eval_seed,
            num_envs=train.eval_envs,
            ref_min_return=facts.ref_min_return,
            ref_max_return=facts.ref_max_return,
        )
        evaluations.append(
            {
                "step": step,
                "pass": float(step // per_pass),
                "return_mean": result.mean,
                "return_std": result.std,
                "normalized_score": result.normalized_mean,
            }
        )
    done = json.loads((run_dir / "done.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    final = {**evaluations[-1], "episodes": plan["eval_episodes"]}
    best = max(
        evaluations, key=lambda e: e["normalized_score"] if e["normalized_score"] is not None else -1e9
    )
    record = {
        "schema": 1,
        "cell_id": cell_id,
        "external": "d3rlpy",  # not a cell of an offrl grid: `offrl report` keeps it beside the grid's
        "kind": "offline",
        "status": "finished",
        "algo": label_of(algo, version, passes),
        "task": slug(label),
        "seed": seed,
        "steps": passes * per_pass,
        "threads": 1,
        "x_unit": "gradient_steps",
        "wall_time_s": time.perf_counter() - t0,
        "steps_per_second": passes * per_pass / done["train_seconds"],
        "final": final,
        "best_during_training": best,
        "evaluations": evaluations,
        "cell": {
            "cell_id": cell_id,
            "algo": label_of(algo, version, passes),
            "algo_name": f"d3rlpy:{config['class']}",
            "task": slug(label),
            "seed": seed,
            "dataset": str(data),
            "env_id": facts.env_id,
            "info": {
                "dataset_source": source,
                "dataset_transitions": facts.transitions,
                "ref_min_return": facts.ref_min_return,
                "ref_max_return": facts.ref_max_return,
                "discrete": facts.discrete,
            },
            "settings": {"d3rlpy": config},
        },
        "package_versions": {"d3rlpy": version, "torch": torch.__version__},
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return record_path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("plan", type=Path, help="the plan TOML (experiments/d3rlpy/classic.toml)")
    parser.add_argument("--out", type=Path, required=True, help="the results folder (offrl bench --out)")
    parser.add_argument(
        "--python", type=Path, default=ROOT / os.environ.get("D3RLPY_VENV", ".venv-d3rlpy") / "bin" / "python"
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="K/N: run only every N-th cell from the K-th (0-based), so N processes share the plan",
    )
    args = parser.parse_args()
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        print(f"--shard: expected K/N with 0 <= K < N, got {args.shard!r}", file=sys.stderr)
        return 2
    if not args.python.exists():
        print(f"{args.python}: no d3rlpy environment; run experiments/d3rlpy/setup.sh first", file=sys.stderr)
        return 1
    plan = cfgmod.read_toml(args.plan)
    version = d3rlpy_version(args.python)
    torch.set_num_threads(1)
    index = -1
    for source in plan["datasets"]:
        discrete = dataset_facts(str(resolve_dataset(source)), None).discrete
        for algo in plan["discrete" if discrete else "continuous"]:
            for seed in plan["seeds"]:
                index += 1
                if index % shards != shard:
                    continue
                t0 = time.perf_counter()
                path = run_cell(args.python, version, algo, source, seed, plan, args.out)
                if path is not None:
                    print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
