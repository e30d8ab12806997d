"""CUDA checks of offrl's training steps; needs a GPU (prints a note and exits 0 without one).

    python benchmarks/gpu_check.py [--steps 12] [--json OUT]

For every algorithm whose step runs as a CUDA graph (``cuda_graph_safe``), in several settings:

- the graphed and the eager step, from the same seed on the same batches, agree: the largest absolute
  difference of any metric over the run and of any network weight at its end is printed (the
  graph replays the same kernels, so differences should be zero or at rounding level);
- metrics returned by one step are not overwritten by the next (each replay hands out fresh tensors);
- a state saved mid-run and loaded into a fresh instance continues as the uninterrupted run does;
- milliseconds per step, eager and graphed, at batch 256 with d3rlpy's default sizes.

Exit status 1 if a check fails. This is a prepared device check, not a unit test: CI has no GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from offrl.algos.awac import AWAC, AWACConfig
from offrl.algos.base import Algorithm
from offrl.algos.bc import BC, BCConfig, DiscreteBC
from offrl.algos.bcq import BCQ, BCQConfig
from offrl.algos.bcq_discrete import DiscreteBCQ, DiscreteBCQConfig
from offrl.algos.cql import CQL, CQLConfig
from offrl.algos.cql_discrete import DiscreteCQL, DiscreteCQLConfig
from offrl.algos.iql import IQL, IQLConfig
from offrl.algos.iql_discrete import DiscreteIQL
from offrl.algos.td3bc import TD3BC, TD3BCConfig
from offrl.runtime import Runtime
from offrl.types import Batch

OBS, ACT, N_DISCRETE = 11, 3, 4
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # weights after a dozen Adam steps of lr ≤ 3e-4


def box() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)


CASES: list[tuple[str, type[Algorithm], Callable[[int], Any], bool]] = [
    ("bc deterministic", BC, lambda b: BCConfig(batch_size=b, hidden=(256, 256)), False),
    (
        "bc gaussian",
        BC,
        lambda b: BCConfig(batch_size=b, hidden=(256, 256), policy="gaussian"),
        False,
    ),
    ("bc discrete", DiscreteBC, lambda b: BCConfig(batch_size=b, hidden=(256, 256)), True),
    ("cql", CQL, lambda b: CQLConfig(batch_size=b, actor_hidden=(256, 256), critic_hidden=(256, 256)), False),
    (
        "cql lagrange, 5 bc steps",
        CQL,
        lambda b: CQLConfig(
            batch_size=b, actor_hidden=(256, 256), critic_hidden=(256, 256), lagrange=True, bc_steps=5
        ),
        False,
    ),
    (
        "cql bf16",
        CQL,
        lambda b: CQLConfig(batch_size=b, actor_hidden=(256, 256), critic_hidden=(256, 256), lagrange=True),
        False,
    ),
    ("cql discrete", DiscreteCQL, lambda b: DiscreteCQLConfig(batch_size=b, hidden=(256, 256)), True),
    (
        "cql discrete, hard target every 4",
        DiscreteCQL,
        lambda b: DiscreteCQLConfig(
            batch_size=b, hidden=(256, 256), target_update="hard", target_update_interval=4
        ),
        True,
    ),
]


# Algorithms whose steps run through ``_run_step`` but are not yet marked ``cuda_graph_safe``:
# ``--candidates`` checks them (marking them for the run); where all pass, mark them in the code.
CANDIDATE_CASES: list[tuple[str, type[Algorithm], Callable[[int], Any], bool]] = [
    ("td3bc", TD3BC, lambda b: TD3BCConfig(batch_size=b), False),
    ("iql", IQL, lambda b: IQLConfig(batch_size=b), False),
    ("iql discrete", DiscreteIQL, lambda b: IQLConfig(batch_size=b), True),
    ("awac", AWAC, lambda b: AWACConfig(batch_size=b), False),
    ("bcq", BCQ, lambda b: BCQConfig(batch_size=b), False),
    ("bcq discrete", DiscreteBCQ, lambda b: DiscreteBCQConfig(batch_size=b), True),
    (
        "bcq discrete, hard target every 4",
        DiscreteBCQ,
        lambda b: DiscreteBCQConfig(batch_size=b, target_update="hard", target_update_interval=4),
        True,
    ),
]

COMPILED_CASES: list[tuple[str, type[Algorithm], Callable[[int], Any], bool]] = [
    (
        "cql compiled",
        CQL,
        lambda b: CQLConfig(batch_size=b, actor_hidden=(256, 256), critic_hidden=(256, 256), lagrange=True),
        False,
    ),
    (
        "cql compiled bf16",
        CQL,
        lambda b: CQLConfig(
            batch_size=b,
            actor_hidden=(256, 256),
            critic_hidden=(256, 256),
            lagrange=True,
        ),
        False,
    ),
    (
        "cql compiled tf32",  # "tf32" in a name: float32 matmuls on TF32 tensor cores for that case
        CQL,
        lambda b: CQLConfig(batch_size=b, actor_hidden=(256, 256), critic_hidden=(256, 256), lagrange=True),
        False,
    ),
    (
        "cql discrete compiled",
        DiscreteCQL,
        lambda b: DiscreteCQLConfig(batch_size=b, hidden=(256, 256)),
        True,
    ),
]


def kernel_profile(
    name: str, cls: type[Algorithm], cfg: Any, discrete: bool, steps: int = 20
) -> dict[str, Any]:
    """Per eager step: how many GPU kernels run and how long they take together (what a graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    algo = build(cls, cfg, discrete, runtime_of(name, False))
    data = batches(4, cfg.batch_size, discrete, "cuda")
    for b in data:
        algo.update(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            algo.update(data[i % len(data)])
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "kernels per step": len(kernels) / steps,
        "kernel ms per step": total_us / steps / 1000,
        "top kernels (ms per step)": {k[:80]: round(v / steps / 1000, 4) for k, v in top},
    }


def batches(n: int, size: int, discrete: bool, device: str) -> list[Batch]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        actions = (
            torch.randint(0, N_DISCRETE, (size,), generator=g)
            if discrete
            else torch.rand(size, ACT, generator=g) * 2 - 1
        )
        out.append(
            Batch(
                obs=torch.randn(size, OBS, generator=g),
                actions=actions,
                rewards=torch.randn(size, generator=g),
                next_obs=torch.randn(size, OBS, generator=g),
                terminals=(torch.rand(size, generator=g) < 0.05).float(),
            ).to(device)
        )
    return out


def runtime_of(name: str, graphs: bool) -> Runtime:
    """A case's runtime, from its name: "bf16" computes hidden layers in bfloat16, "compiled" compiles."""
    return Runtime(
        precision="bf16" if "bf16" in name else "fp32",
        compile="default" if "compiled" in name else None,
        cuda_graphs=graphs,
    )


def build(cls: type[Algorithm], cfg: Any, discrete: bool, runtime: Runtime) -> Algorithm:
    action_space = gym.spaces.Discrete(N_DISCRETE) if discrete else box()
    obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS,), np.float32)
    algo = cls(cfg, obs_space, action_space, device="cuda", seed=0, runtime=runtime)
    algo.train_mode(True)
    return algo


def weight_diff(a: Algorithm, b: Algorithm) -> float:
    sa, sb = a.nets.state_dict(), b.nets.state_dict()
    return max(((sa[k].float() - sb[k].float()).abs().max().item() for k in sa), default=0.0)


def check_case(
    name: str, cls: type[Algorithm], make_cfg: Callable[[int], Any], discrete: bool, steps: int
) -> dict[str, Any]:
    cfg = make_cfg(64)
    data = batches(steps, 64, discrete, "cuda")
    eager = build(cls, cfg, discrete, runtime_of(name, False))
    graphed = build(cls, cfg, discrete, runtime_of(name, True))
    metric_diff, kept = 0.0, True
    saved: dict[str, Any] | None = None
    previous: dict[str, torch.Tensor] | None = None
    previous_values: dict[str, float] = {}
    for i, b in enumerate(data):
        me, mg = eager.update(b), graphed.update(b)
        metric_diff = max(metric_diff, max(abs(me[k].float().item() - mg[k].float().item()) for k in me))
        if previous is not None:  # the last step's tensors must still hold the last step's values
            kept &= all(previous[k].float().item() == previous_values[k] for k in previous)
        previous = mg
        previous_values = {k: v.float().item() for k, v in mg.items()}
        if i == steps // 2 - 1:
            saved = copy.deepcopy(graphed.state_dict())
    graphs_used = graphed._graph_steps is not None and graphed._graph_steps.captured > 0
    # resume: a fresh instance from the mid-run state, fed the second half
    assert saved is not None
    resumed = build(cls, cfg, discrete, runtime_of(name, True))
    resumed.load_state_dict(saved)
    for b in data[steps // 2 :]:
        resumed.update(b)
    precision = runtime_of(name, True).precision
    result = {
        "case": name,
        "graph captured": graphs_used,
        "max metric diff": metric_diff,
        "metrics kept": kept,
    }
    tol = TOLERANCE[precision]
    diffs = (weight_diff(eager, graphed), weight_diff(resumed, graphed))
    result["max weight diff graphed-eager"], result["max weight diff resumed-uninterrupted"] = diffs
    result["ok"] = bool(graphs_used and kept and max(diffs) <= tol)
    # speed at batch 256
    cfg256 = make_cfg(256)
    for label, graphs in (("eager", False), ("graphed", True)):
        algo = build(cls, cfg256, discrete, runtime_of(name, graphs))
        data256 = batches(8, 256, discrete, "cuda")
        for b in data256:
            algo.update(b)
        torch.cuda.synchronize()
        n, t0 = 300, time.perf_counter()
        for i in range(n):
            algo.update(data256[i % len(data256)])
        torch.cuda.synchronize()
        result[f"ms/step {label}"] = 1000 * (time.perf_counter() - t0) / n
    return result


def check_compiled(
    name: str, cls: type[Algorithm], make_cfg: Callable[[int], Any], discrete: bool, steps: int
) -> dict[str, Any]:
    """A compiled step replayed as a graph against the uncompiled eager step (compiling is slow, so
    one compiled instance serves both the comparison and the timing)."""
    cfg = make_cfg(256)
    data = batches(steps, 256, discrete, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in name
    eager = build(cls, cfg, discrete, dataclasses.replace(runtime_of(name, False), compile=None))
    graphed = build(cls, cfg, discrete, runtime_of(name, True))
    t0 = time.perf_counter()
    for b in data:
        eager.update(b)
        graphed.update(b)
    torch.cuda.synchronize()
    result: dict[str, Any] = {"case": name, "first steps incl. compile s": time.perf_counter() - t0}
    result["graph captured"] = graphed._graph_steps is not None and graphed._graph_steps.captured > 0
    result["max weight diff graphed-eager"] = weight_diff(eager, graphed)
    n, t0 = 300, time.perf_counter()
    for i in range(n):
        graphed.update(data[i % len(data)])
    torch.cuda.synchronize()
    result["ms/step graphed"] = 1000 * (time.perf_counter() - t0) / n
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = 5e-2 if "bf16" in name or "tf32" in name else 1e-3
    result["ok"] = bool(result["graph captured"] and result["max weight diff graphed-eager"] <= tol)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=12, help="updates per correctness run (graphs start after 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--compile", action="store_true", help="only the torch.compile cases (minutes to compile)")
    p.add_argument("--profile", action="store_true", help="also count each eager step's GPU kernels")
    p.add_argument(
        "--candidates", action="store_true", help="only the algorithms not yet marked cuda_graph_safe"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    results = []
    if args.profile:
        for name, cls, make_cfg, discrete in (CASES[3], CASES[5], CASES[6], CASES[0]):
            prof = {"case": name, **kernel_profile(name, cls, make_cfg(256), discrete)}
            print(json.dumps(prof), flush=True)
            results.append({**prof, "ok": True})
    cases = COMPILED_CASES if args.compile else CANDIDATE_CASES if args.candidates else CASES
    if args.candidates:
        for _, cls, _, _ in CANDIDATE_CASES:
            cls.cuda_graph_safe = True  # for this run only
    for name, cls, make_cfg, discrete in cases:
        try:
            check = check_compiled if args.compile else check_case
            r = check(name, cls, make_cfg, discrete, args.steps)
        except Exception as exc:  # report and go on: one failing case must not hide the others
            r = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    failed = [r["case"] for r in results if not r["ok"]]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
