"""Train one d3rlpy algorithm on an offrl dataset file and save its policy as TorchScript at every
evaluation point. Runs in d3rlpy's own virtual environment (experiments/d3rlpy/setup.sh); offrl's
side (experiments/d3rlpy/bench.py) evaluates the saved policies with offrl's protocol.

    .venv-d3rlpy/bin/python experiments/d3rlpy/train_d3rlpy.py --algo cql --data D.h5 --passes 52 \
        --steps-per-pass 391 --eval-every 10 --seed 0 --hidden 64 64 --out runs/d3rlpy/cell

Only the network sizes, batch size, observation standardisation and action bounds are set here (to
match offrl's runs); every other setting is d3rlpy's default, written to OUT/config.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import d3rlpy
import h5py
import numpy as np
import torch

CONTINUOUS = {"bc": "BCConfig", "cql": "CQLConfig", "iql": "IQLConfig", "td3bc": "TD3PlusBCConfig"}
DISCRETE = {"bc": "DiscreteBCConfig", "cql": "DiscreteCQLConfig", "bcq": "DiscreteBCQConfig"}


def load(path: Path) -> tuple[d3rlpy.dataset.MDPDataset, dict]:
    """The file's rows as d3rlpy episodes (d3rlpy takes each next observation from the row after; the
    last row of a truncated episode gets its own convention), and the action space."""
    with h5py.File(path, "r") as f:
        space = json.loads(f.attrs["action_space"])
        discrete = space["type"] == "Discrete"
        obs = f["observations"][:].astype(np.float32).reshape(len(f["rewards"]), -1)
        actions = f["actions"][:]
        terminals = f["terminals"][:].astype(np.float32)
        timeouts = f["timeouts"][:].astype(np.float32)
        ends = f["episode_ends"][:]
        rewards = f["rewards"][:].astype(np.float32)
    # every episode ends on a terminal or a timeout row, so d3rlpy cuts the same episodes
    last = ends - 1
    timeouts[last] = np.maximum(timeouts[last], 1.0 - terminals[last])
    dataset = d3rlpy.dataset.MDPDataset(
        observations=obs,
        actions=actions.astype(np.int64).reshape(-1, 1) if discrete else actions.astype(np.float32),
        rewards=rewards.reshape(-1, 1),
        terminals=terminals,
        timeouts=timeouts,
        action_space=d3rlpy.ActionSpace.DISCRETE if discrete else d3rlpy.ActionSpace.CONTINUOUS,
        action_size=int(space["n"]) if discrete else None,
    )
    return dataset, space


def make(algo: str, space: dict, hidden: list[int], batch_size: int) -> object:
    discrete = space["type"] == "Discrete"
    table = DISCRETE if discrete else CONTINUOUS
    if algo not in table:
        raise SystemExit(
            f"d3rlpy has no {'discrete' if discrete else 'continuous'} {algo} here; choose from {sorted(table)}"
        )
    cls = getattr(d3rlpy.algos, table[algo])
    enc = d3rlpy.models.VectorEncoderFactory(hidden_units=hidden)
    kwargs: dict = {
        "batch_size": batch_size,
        "observation_scaler": d3rlpy.preprocessing.StandardObservationScaler(),
    }
    if not discrete:
        low = np.broadcast_to(np.asarray(space["low"], np.float32), space["shape"])
        high = np.broadcast_to(np.asarray(space["high"], np.float32), space["shape"])
        kwargs["action_scaler"] = d3rlpy.preprocessing.MinMaxActionScaler(minimum=low, maximum=high)
    names = set(cls.__dataclass_fields__)
    for field in (
        "encoder_factory",
        "actor_encoder_factory",
        "critic_encoder_factory",
        "value_encoder_factory",
    ):
        if field in names:
            kwargs[field] = enc
    return cls(**kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--passes", type=int, required=True, help="d3rlpy epochs of --steps-per-pass steps")
    p.add_argument("--steps-per-pass", type=int, required=True, help="offrl's: ceil(rows / batch size)")
    p.add_argument(
        "--eval-every", type=int, required=True, help="passes between saved policies (and the last)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d3rlpy.seed(args.seed)
    dataset, space = load(args.data)
    config = make(args.algo, space, args.hidden, args.batch_size)
    algo = config.create(device=False)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fitter = algo.fitter(
        dataset,
        n_steps=args.passes * args.steps_per_pass,
        n_steps_per_epoch=args.steps_per_pass,
        experiment_name=f"d3rlpy-{args.algo}",
        with_timestamp=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        show_progress=False,
        save_interval=10**9,
    )
    for epoch, _metrics in fitter:
        if epoch == 1:  # the scalers are fitted once the first epoch has run
            doc = {
                "d3rlpy": d3rlpy.__version__,
                "class": type(config).__name__,
                "config": json.loads(config.serialize()),
            }
            (args.out / "config.json").write_text(json.dumps(doc, indent=1))
        if epoch % args.eval_every == 0 or epoch == args.passes:
            algo.save_policy(str(args.out / f"policy-{epoch * args.steps_per_pass}.pt"))
    seconds = time.perf_counter() - t0
    (args.out / "done.json").write_text(
        json.dumps({"steps": args.passes * args.steps_per_pass, "train_seconds": seconds})
    )


if __name__ == "__main__":
    main()
