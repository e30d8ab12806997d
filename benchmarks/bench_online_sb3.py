"""offrl's online baselines side by side with Stable-Baselines3: same environment, steps, seed and
hyperparameters; environment steps per second (training only) and the final deterministic return.

    python benchmarks/bench_online_sb3.py --sb3-python /tmp/sb3venv/bin/python [--cases sac,ppo]
        [--seed 0] [--threads 1] [--concurrent] [--quick] [--json OUT]

SB3 lives in its own virtual environment (it is no dependency of offrl) and runs in a subprocess
with that interpreter:

    python3 -m venv /tmp/sb3venv && /tmp/sb3venv/bin/pip install torch==2.13.0 \\
        && /tmp/sb3venv/bin/pip install stable-baselines3 gymnasium

Cases (settings from experiments/online/*.toml, mapped onto SB3's arguments):
  sac: SAC on Pendulum-v1, 20k steps          ppo: PPO on CartPole-v1, 100k steps
Both sides are evaluated on the same 10 episodes (reset seeds from offrl.evaluation.episode_seed)
with deterministic actions. Figures are ratios measured in the same run; on a shared machine the
absolute numbers move with its load, which is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from offrl import config as cfgmod
from offrl.evaluation import episode_seed
from offrl.online.loop import OnlineTrainer, resolve_online_config
from offrl.utils import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "sac": (REPO / "experiments" / "online" / "sac_pendulum.toml", 20_000),
    "ppo": (REPO / "experiments" / "online" / "ppo_cartpole.toml", 100_000),
}
EVAL_EPISODES, EVAL_SEED = 10, 10_000

# Runs in the SB3 interpreter: builds the model from a JSON spec, times learn(), evaluates.
SB3_CHILD = r"""
import json, sys, time
import numpy as np, torch, gymnasium as gym
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env
kw = spec["kwargs"]
pk = kw.pop("policy_kwargs")
if pk.pop("tanh", False):
    pk["activation_fn"] = torch.nn.Tanh
if spec["algo"] == "sac":
    env = gym.make(spec["env"])
    model = SAC("MlpPolicy", env, policy_kwargs=pk, seed=spec["seed"], device="cpu", verbose=0, **kw)
else:
    lr = kw.pop("learning_rate")
    schedule = (lambda f: f * lr) if kw.pop("anneal_lr") else lr
    env = make_vec_env(spec["env"], n_envs=kw.pop("n_envs"), seed=spec["seed"])
    model = PPO("MlpPolicy", env, learning_rate=schedule, policy_kwargs=pk, seed=spec["seed"], device="cpu",
                verbose=0, **kw)
t0 = time.perf_counter()
model.learn(total_timesteps=spec["steps"])
seconds = time.perf_counter() - t0
ev = gym.make(spec["env"])
returns = []
for s in spec["eval_seeds"]:
    obs, _ = ev.reset(seed=s)
    done, total = False, 0.0
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, r, term, trunc, _ = ev.step(action)
        total += float(r)
        done = term or trunc
    returns.append(total)
print(json.dumps({"env_steps": int(model.num_timesteps), "seconds": seconds, "returns": returns}))
"""


def sb3_spec(case: str, cfg: Any, steps: int, threads: int) -> dict[str, Any]:
    """SB3 arguments equivalent to an offrl config."""
    a = cfg.algo_config
    if case == "sac":
        if not a.actor_lr == a.critic_lr == a.alpha_lr:
            raise SystemExit("SB3's SAC has one learning rate: the sac config must use one too")
        kwargs: dict[str, Any] = {
            "learning_rate": a.actor_lr,
            "buffer_size": a.buffer_size,
            "learning_starts": a.learning_starts,
            "batch_size": a.batch_size,
            "tau": a.tau,
            "gamma": a.gamma,
            "train_freq": a.train_freq,
            "gradient_steps": a.gradient_steps,
            "ent_coef": f"auto_{a.init_alpha}" if a.auto_alpha else a.init_alpha,
            "policy_kwargs": {
                "net_arch": {"pi": list(a.actor_hidden), "qf": list(a.critic_hidden)},
                "n_critics": a.n_critics,
            },
        }
    else:
        kwargs = {
            "learning_rate": a.lr,
            "anneal_lr": a.anneal_lr,
            "n_envs": a.num_envs,
            "n_steps": a.n_steps,
            "batch_size": a.num_envs * a.n_steps // a.n_minibatches,
            "n_epochs": a.n_epochs,
            "gamma": a.gamma,
            "gae_lambda": a.gae_lambda,
            "clip_range": a.clip,
            "clip_range_vf": a.clip if a.clip_value else None,
            "normalize_advantage": a.normalize_advantages,
            "ent_coef": a.ent_coef,
            "vf_coef": a.vf_coef,
            "max_grad_norm": a.max_grad_norm,
            "policy_kwargs": {
                "net_arch": {"pi": list(a.hidden), "vf": list(a.hidden)},
                "tanh": a.activation == "tanh",
                "ortho_init": a.ortho_init,
            },
        }
    return {
        "algo": case,
        "env": cfg.env,
        "seed": cfg.seed,
        "steps": steps,
        "threads": threads,
        "kwargs": kwargs,
        "eval_seeds": [episode_seed(EVAL_SEED, j) for j in range(EVAL_EPISODES)],
    }


def run_offrl(cfg: Any, out: Path) -> dict[str, Any]:
    trainer = OnlineTrainer(cfg, out)
    t0 = time.perf_counter()
    result = trainer.run(show_progress=False)
    wall = time.perf_counter() - t0
    assert result.final_eval is not None
    return {
        "env_steps": result.env_steps,
        # collection + learning time (the loop excludes its evaluation and checkpoint pauses)
        "seconds": result.env_steps / result.steps_per_second,
        "wall_seconds": wall,
        "returns": result.final_eval["returns"],
    }


def start_sb3(python: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    args = [python, "-c", SB3_CHILD, json.dumps(spec)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_sb3(proc: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"SB3 run failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sb3-python", required=True, help="interpreter of a venv with stable-baselines3")
    ap.add_argument("--cases", default="sac,ppo", help="comma-separated: sac, ppo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run)")
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run both sides at the same time, so that they share one machine load (needs ≥ 2 free cores)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="offrl-only setting, e.g. precision=bf16 (SB3 has no counterpart)",
    )
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--workdir", default="/tmp/bench_online_sb3", help="offrl run directories")
    args = ap.parse_args()

    os.environ.setdefault("OFFRL_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "seed": args.seed,
        "threads": args.threads,
        "concurrent": args.concurrent,
        "cases": {},
    }
    for case in args.cases.split(","):
        cfg_file, steps = CASES[case]
        steps = steps // 10 if args.quick else steps
        overrides = {
            "train.steps": steps,
            "train.eval_every": 0,
            "train.eval_episodes": EVAL_EPISODES,
            "train.eval_seed": EVAL_SEED,
            "train.threads": args.threads,
            **cfgmod.parse_sets(args.set),
        }
        cfg = resolve_online_config(None, None, seed=args.seed, config_file=cfg_file, overrides=overrides)
        out = Path(args.workdir) / f"{case}_{int(time.time())}"
        spec = sb3_spec(case, cfg, steps, args.threads)
        print(f"[{case}] {cfg.algo} on {cfg.env}, {steps} steps, seed {args.seed}", flush=True)
        if args.concurrent:  # both under the same (changing) machine load
            proc = start_sb3(args.sb3_python, spec)
            ours = run_offrl(cfg, out)
            theirs = finish_sb3(proc)
        else:
            ours = run_offrl(cfg, out)
            theirs = finish_sb3(start_sb3(args.sb3_python, spec))
        row = {
            "env": cfg.env,
            "steps": steps,
            "offrl_steps_per_s": ours["env_steps"] / ours["seconds"],
            "sb3_steps_per_s": theirs["env_steps"] / theirs["seconds"],
            "offrl_return": sum(ours["returns"]) / len(ours["returns"]),
            "sb3_return": sum(theirs["returns"]) / len(theirs["returns"]),
            "offrl": ours,
            "sb3": theirs,
            "config": cfgmod.to_dict(cfg.algo_config),
        }
        row["speed_ratio"] = row["offrl_steps_per_s"] / row["sb3_steps_per_s"]
        report["cases"][case] = row
        print(
            f"[{case}] steps/s offrl {row['offrl_steps_per_s']:.0f} vs SB3 {row['sb3_steps_per_s']:.0f} "
            f"(ratio {row['speed_ratio']:.2f}); final return offrl {row['offrl_return']:.1f} vs SB3 "
            f"{row['sb3_return']:.1f}",
            flush=True,
        )
    report["machine"]["load_after"] = os.getloadavg()
    print(f"load average before {report['machine']['load_before']}, after {report['machine']['load_after']}")
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
