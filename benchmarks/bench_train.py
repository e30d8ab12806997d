"""Training speed of offrl side by side with d3rlpy: gradient steps per second of BC, CQL and discrete CQL
(the goals), and on request TD3+BC, IQL, AWAC and BCQ (continuous and discrete).

    python benchmarks/bench_train.py [--d3rlpy-python /tmp/d3venv/bin/python] [--algos bc cql cql-discrete]
        [--threads 2] [--rounds 5] [--seconds 3] [--profile] [--compile] [--json OUT] [--quick]

Every implementation runs in its own worker process (d3rlpy in its own virtualenv, as it pins an older
gymnasium: ``python3 -m venv /tmp/d3venv && /tmp/d3venv/bin/pip install torch==2.13.0 &&
/tmp/d3venv/bin/pip install d3rlpy``), on the same synthetic dataset (continuous: 11 observations, 3
actions in [-1, 1]; discrete: 4 observations, 2 actions; 100k transitions) with matched networks:
d3rlpy's defaults, i.e. 2×256 relu MLPs, 2 critics and 10 sampled actions per proposal for CQL, batch
256 for every algorithm (d3rlpy's own defaults differ for AWAC, 1024, and BCQ, 100 and discrete 32;
BCQ's VAE is 2×256 with 100 sampled actions in the target, as d3rlpy's). offrl is measured through its real ``update`` on batches drawn by a
``FullPassSampler`` from a ``TransitionDataset`` (as the trainer does), d3rlpy through
``sample_transition_batch`` + ``update`` (as its ``fit`` does).

The parent process only orchestrates: each round runs every implementation in turn for about
``--seconds``, so load from other processes hits all of them alike; ratios are taken per round and
the median is reported. Rates are given per wall second and per CPU second of the worker (all its
threads); on a loaded machine the CPU-time rate is the steadier one. Peak memory is the worker's
peak resident set (``ru_maxrss``) and, in brackets, its growth after imports. ``--profile`` adds, per
offrl variant, where one step's time goes (torch.profiler self times, grouped).

Figures are ratios against d3rlpy measured in the same run, never assertions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ALGOS = ("bc", "cql", "cql-discrete", "td3bc", "iql", "awac", "bcq", "bcq-discrete")
DEFAULT_ALGOS = ("bc", "cql", "cql-discrete")  # the ones with goals; the others on request
DISCRETE = {"cql-discrete", "bcq-discrete"}
PRECISION_ALGOS = {"bc", "cql", "cql-discrete"}  # with a precision and a compile setting
ROWS, BATCH = 100_000, 256
CONT_OBS, CONT_ACT, DISC_OBS, DISC_ACT = 11, 3, 4, 2
WARMUP_STEPS = 5
GOALS = {"bc": 5.0, "cql": 3.5, "cql-discrete": 5.0}  # offrl / d3rlpy, best precision (issue goals)


# -- synthetic data (both workers) ---------------------------------------------------------------


def synthetic_arrays(discrete: bool, rows: int = ROWS, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    obs_dim = DISC_OBS if discrete else CONT_OBS
    terminals = np.zeros(rows, dtype=bool)
    terminals[999::1000] = True
    return {
        "observations": rng.standard_normal((rows, obs_dim), dtype=np.float32),
        "next_observations": rng.standard_normal((rows, obs_dim), dtype=np.float32),
        "actions": (
            rng.integers(0, DISC_ACT, rows)
            if discrete
            else rng.uniform(-1, 1, (rows, CONT_ACT)).astype(np.float32)
        ),
        "rewards": rng.standard_normal(rows, dtype=np.float32),
        "terminals": terminals,
    }


# -- workers -------------------------------------------------------------------------------------


class OfflineRLWorker:
    """offrl's algorithm fed as the trainer feeds it: sampler indices → ``dataset.batch`` → ``update``."""

    def __init__(
        self,
        algo: str,
        precision: str,
        compile_mode: str | None,
        device: str = "cpu",
        cuda_graphs: bool = True,
    ) -> None:
        import gymnasium as gym
        import numpy as np
        import torch

        from offrl.algos.bc import BC, BCConfig
        from offrl.algos.cql import CQL, CQLConfig
        from offrl.algos.cql_discrete import DiscreteCQL, DiscreteCQLConfig
        from offrl.data import format as fmt
        from offrl.data.dataset import TransitionDataset

        discrete = algo in DISCRETE
        arrays = synthetic_arrays(discrete)
        obs_dim = arrays["observations"].shape[1]
        action_space: gym.Space = (
            gym.spaces.Discrete(DISC_ACT) if discrete else gym.spaces.Box(-1.0, 1.0, (CONT_ACT,), np.float32)
        )
        raw = fmt.RawDataset(
            path="<memory>",
            timeouts=np.zeros(ROWS, dtype=bool),
            episode_ends=np.arange(1000, ROWS + 1, 1000, dtype=np.int64),
            observation_space=gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
            action_space=action_space,
            **arrays,
        )
        dataset = TransitionDataset(raw, device)
        # speed settings: the runtime's; older checkouts kept precision and compile in the algorithm
        # configs (named only where they differ from their defaults) and had no runtime
        old_api = "precision" in {f.name for f in dataclasses.fields(BCConfig)}
        extra: dict[str, Any] = {}
        if old_api:
            torch.set_flush_denormal(True)  # as the trainer did
            if precision != "fp32":
                extra["precision"] = precision
            if compile_mode is not None:
                extra["compile"] = compile_mode
        # d3rlpy's defaults: 2×256 MLPs everywhere, 2 critics, 10 sampled actions, Lagrange α' on
        cls: Any
        cfg: Any
        if algo == "bc":
            cls, cfg = BC, BCConfig(batch_size=BATCH, hidden=(256, 256), **extra)
        elif algo == "cql":
            cfg = CQLConfig(
                actor_hidden=(256, 256),
                critic_hidden=(256, 256),
                n_critics=2,
                n_actions=10,
                batch_size=BATCH,
                lagrange=True,
                **extra,
            )
            cls = CQL
        elif algo == "cql-discrete":
            # d3rlpy's DiscreteCQL does not clip gradients: offrl's default clip (norm 10) is turned off
            cfg = DiscreteCQLConfig(hidden=(256, 256), batch_size=BATCH, max_grad_norm=None, **extra)
            cls = DiscreteCQL
        else:
            cls, cfg = _later_algorithm(algo)
        if old_api:
            self.algo = cls(cfg, dataset.observation_space, dataset.action_space, seed=0, device=device)
            self.algo.cuda_graphs = cuda_graphs
        else:
            from offrl.runtime import Runtime

            runtime = Runtime(
                threads=torch.get_num_threads(),
                precision=precision,  # type: ignore[arg-type]
                compile=compile_mode,  # type: ignore[arg-type]
                cuda_graphs=cuda_graphs,
            )
            runtime.apply()  # as the trainer does (d3rlpy's worker runs with the CPU's defaults)
            spaces = (dataset.observation_space, dataset.action_space)
            self.algo = cls(cfg, *spaces, seed=0, device=device, runtime=runtime)
        self.dataset = self.algo.prepare_dataset(dataset)
        self.sampler = self.dataset.sampler(BATCH, seed=0, drop_last=True)
        self.algo.train_mode(True)

    def step(self) -> None:
        self.algo.update(self.dataset.batch(self.sampler.next_batch()))


def _later_algorithm(algo: str) -> tuple[Any, Any]:
    """offrl's class and config for an algorithm benchmarked without a goal, sized as d3rlpy's defaults."""
    from offrl.algos.awac import AWAC, AWACConfig
    from offrl.algos.bcq import BCQ, BCQConfig
    from offrl.algos.bcq_discrete import DiscreteBCQ, DiscreteBCQConfig
    from offrl.algos.iql import IQL, IQLConfig
    from offrl.algos.td3bc import TD3BC, TD3BCConfig

    mlp = (256, 256)
    if algo == "td3bc":
        return TD3BC, TD3BCConfig(actor_hidden=mlp, critic_hidden=mlp, n_critics=2, batch_size=BATCH)
    if algo == "iql":
        return IQL, IQLConfig(hidden=mlp, n_critics=2, batch_size=BATCH)
    if algo == "awac":
        return AWAC, AWACConfig(actor_hidden=mlp, critic_hidden=mlp, n_critics=2, batch_size=BATCH)
    if algo == "bcq":
        # d3rlpy: every network (VAE included) 2×256, latent 2·A, 100 sampled actions in the target
        cfg = BCQConfig(
            actor_hidden=mlp,
            critic_hidden=mlp,
            encoder_hidden=mlp,
            decoder_hidden=mlp,
            n_actions=100,
            batch_size=BATCH,
        )
        return BCQ, cfg
    if algo == "bcq-discrete":
        # d3rlpy shares one encoder between Q and the imitator; offrl's are separate 2×256 MLPs
        return DiscreteBCQ, DiscreteBCQConfig(hidden=mlp, bc_hidden=mlp, batch_size=BATCH)
    raise ValueError(algo)


class D3rlpyWorker:
    """d3rlpy's algorithm fed as its ``fit`` feeds it: ``sample_transition_batch`` → ``update``."""

    def __init__(self, algo: str, device: str = "cpu") -> None:
        import d3rlpy

        discrete = algo in DISCRETE
        a = synthetic_arrays(discrete)
        # d3rlpy takes next observations from the following row; the arrays are the same draws
        self.dataset = d3rlpy.dataset.MDPDataset(
            a["observations"],
            a["actions"],
            a["rewards"],
            a["terminals"].astype("float32"),
            action_space=d3rlpy.ActionSpace.DISCRETE if discrete else d3rlpy.ActionSpace.CONTINUOUS,
            action_size=DISC_ACT if discrete else CONT_ACT,
        )
        config: Any = {
            "bc": lambda: d3rlpy.algos.BCConfig(batch_size=BATCH),
            "cql": lambda: d3rlpy.algos.CQLConfig(batch_size=BATCH),
            "cql-discrete": lambda: d3rlpy.algos.DiscreteCQLConfig(batch_size=BATCH),
            "td3bc": lambda: d3rlpy.algos.TD3PlusBCConfig(batch_size=BATCH),
            "iql": lambda: d3rlpy.algos.IQLConfig(batch_size=BATCH),
            "awac": lambda: d3rlpy.algos.AWACConfig(batch_size=BATCH),  # its default batch is 1024
            "bcq": lambda: d3rlpy.algos.BCQConfig(batch_size=BATCH),  # its default batch is 100
            "bcq-discrete": lambda: d3rlpy.algos.DiscreteBCQConfig(batch_size=BATCH),  # default 32
        }[algo]()
        self.algo = config.create(device="cuda:0" if device == "cuda" else "cpu:0")
        self.algo.build_with_dataset(self.dataset)

    def step(self) -> None:
        self.algo.update(self.dataset.sample_transition_batch(BATCH))


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addmv",
    "aten::mv",
    "mkldnn::_linear_pointwise",
}
# the kernels of a fused Adam step (step counters, update), also when called without Optimizer.step
OPTIMIZER_OPS = ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_foreach_add_")
COPY_OPS = {
    "aten::copy_",
    "aten::_to_copy",
    "aten::clone",
    "aten::cat",
    "aten::stack",
    "aten::index_select",
    "aten::index",
    "aten::repeat_interleave",
    "aten::fill_",
    "aten::zero_",
}


def profile_summary(step: Any, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind, from torch.profiler self CPU times.

    ``optimizer``: everything under ``Optimizer.step``/``zero_grad``, and the fused Adam kernels where
    the hand-written steps call them directly; ``matmul``, ``copy/cast`` and ``elementwise/reduce``
    (every other aten op) elsewhere; ``overhead``: the rest of the step (Python, dispatch, autograd
    engine).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    out = dict.fromkeys(("matmul", "elementwise/reduce", "copy/cast", "optimizer"), 0.0)
    for ev in prof.events():
        if ev.name in OPTIMIZER_OPS and not _has_ancestor(ev, "Optimizer.", *OPTIMIZER_OPS):
            out["optimizer"] += ev.cpu_time_total  # a fused Adam called without Optimizer.step
            continue
        if ev.name.startswith("Optimizer.") or not (ev.name.startswith(("aten::", "mkldnn::"))):
            if ev.name.startswith("Optimizer.") and not _has_ancestor(ev, "Optimizer."):
                out["optimizer"] += ev.cpu_time_total
            continue
        if _has_ancestor(ev, "Optimizer.", *OPTIMIZER_OPS):
            continue
        kind = (
            "matmul"
            if ev.name in MATMUL_OPS
            else "copy/cast"
            if ev.name in COPY_OPS
            else "elementwise/reduce"
        )
        out[kind] += ev.self_cpu_time_total
    per_step = {k: v / 1e3 / steps for k, v in out.items()}
    total = wall * 1e3 / steps
    per_step["overhead"] = max(0.0, total - sum(per_step.values()))
    per_step["total"] = total
    return {k: round(v, 3) for k, v in per_step.items()}


def _has_ancestor(ev: Any, *prefixes: str) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefixes):
            return True
        parent = parent.cpu_parent
    return False


def worker_main(args: argparse.Namespace) -> int:
    """Build the algorithm, report ready, then answer ``{"steps": n}`` / ``{"profile": n}`` lines on stdin."""
    import torch

    torch.set_num_threads(args.threads)
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    impl: Any = (
        D3rlpyWorker(args.algo, args.device)
        if args.worker == "d3rlpy"
        else OfflineRLWorker(args.algo, args.precision, args.compile, args.device, not args.no_cuda_graphs)
    )

    def sync() -> None:  # GPU work is asynchronous: a timing ends when the device is done
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP_STEPS):
        impl.step()
    sync()
    _reply({"ready": True, "build_s": round(time.perf_counter() - t0, 2), "rss_import_kb": rss0})
    for line in sys.stdin:
        cmd = json.loads(line)
        if "profile" in cmd:
            _reply({"profile": profile_summary(impl.step, int(cmd["profile"]))})
            continue
        n = int(cmd["steps"])
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            impl.step()
        sync()
        _reply({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "maxrss_kb": _rss_kb()})
    return 0


REPLY = "@@bench "  # marks protocol lines: libraries may print to stdout too


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- orchestration -------------------------------------------------------------------------------


@dataclass
class Worker:
    label: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    wall: list[float] = field(default_factory=list)  # steps per wall second, per round
    cpu: list[float] = field(default_factory=list)  # steps per CPU second, per round
    maxrss_kb: int = 0
    profile: dict[str, float] | None = None

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        stdin: TextIO = self.proc.stdin  # type: ignore[assignment]
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        stdout: TextIO = self.proc.stdout  # type: ignore[assignment]
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"worker '{self.label}' exited (code {self.proc.wait()})")
            if line.startswith(REPLY):
                reply: dict[str, Any] = json.loads(line[len(REPLY) :])
                return reply
            sys.stderr.write(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start_worker(
    label: str, python: str, argv: list[str], env: dict[str, str] | None = None, script: Path | None = None
) -> Worker:
    """A worker process running ``script`` (default: this file) in worker mode, once it reports ready."""
    proc = subprocess.Popen(
        [python, str(script or Path(__file__).resolve()), *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    w = Worker(label, proc)
    w.ready = w._read()
    return w


def run_algo(algo: str, args: argparse.Namespace) -> list[Worker]:
    common = ["--algo", algo, "--threads", str(args.threads), "--device", args.device]
    specs: list[tuple[str, str, list[str], dict[str, str] | None]] = []
    if args.device == "cuda":  # the same step without CUDA graphs, to show what they bring
        specs.append(
            ("offrl fp32 eager", sys.executable, ["--worker", "offrl", "--no-cuda-graphs", *common], None)
        )
    specs.append(("offrl fp32", sys.executable, ["--worker", "offrl", "--precision", "fp32", *common], None))
    if algo in PRECISION_ALGOS:
        specs.append(
            ("offrl bf16", sys.executable, ["--worker", "offrl", "--precision", "bf16", *common], None)
        )
    if args.compile and algo in PRECISION_ALGOS:
        mode = "" if args.compile == "default" else " autotuned"
        for precision in ("fp32", "bf16"):
            specs.append(
                (
                    f"offrl {precision} compiled{mode}",
                    sys.executable,
                    ["--worker", "offrl", "--precision", precision, "--compile-mode", args.compile, *common],
                    None,
                )
            )
    if args.offrl_src is not None:
        src_env = {**os.environ, "PYTHONPATH": str(args.offrl_src)}
        specs.append(
            (f"offrl@{args.offrl_src.name} fp32", sys.executable, ["--worker", "offrl", *common], src_env)
        )
    if args.d3rlpy_python is not None:
        specs.append(("d3rlpy", str(args.d3rlpy_python), ["--worker", "d3rlpy", *common], None))
    workers: list[Worker] = []
    try:
        for label, py, argv, env in specs:
            workers.append(start_worker(label, py, argv, env))
        steps = {}
        for w in workers:  # calibrate: rounds of about args.seconds each
            r = w.ask({"steps": 3})
            steps[w.label] = max(3, int(args.seconds * 3 / max(r["wall"], 1e-9)))
        for rnd in range(args.rounds):
            order = workers[rnd % len(workers) :] + workers[: rnd % len(workers)]
            for w in order:
                r = w.ask({"steps": steps[w.label]})
                w.wall.append(steps[w.label] / r["wall"])
                w.cpu.append(steps[w.label] / max(r["cpu"], 1e-9))
                w.maxrss_kb = r["maxrss_kb"]
        if args.profile:
            for w in workers:
                if w.label.startswith("offrl"):
                    w.profile = w.ask({"profile": max(3, steps[w.label] // 2)})["profile"]
    finally:
        for w in workers:
            w.close()
    return workers


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (rounds pair measurements taken under the same load)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def report(results: dict[str, list[Worker]], args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    header = (
        f"{'algorithm':13s} {'implementation':24s} {'steps/s':>9s} {'steps/CPU-s':>12s} "
        f"{'× d3rlpy':>9s} {'× (CPU)':>8s} {'peak RSS MB (+after import)':>28s}"
    )
    print(header)
    print("-" * len(header))
    for algo, workers in results.items():
        ref = next((w for w in workers if w.label == "d3rlpy"), None)
        for w in workers:
            row: dict[str, Any] = {
                "algorithm": algo,
                "implementation": w.label,
                "steps_per_s": round(statistics.median(w.wall), 2),
                "steps_per_cpu_s": round(statistics.median(w.cpu), 2),
                "peak_rss_mb": round(w.maxrss_kb / 1024, 1),
                "rss_growth_mb": round((w.maxrss_kb - w.ready["rss_import_kb"]) / 1024, 1),
            }
            if ref is not None:
                row["ratio"] = round(paired_ratio(w.wall, ref.wall), 2)
                row["ratio_cpu"] = round(paired_ratio(w.cpu, ref.cpu), 2)
            if w.profile is not None:
                row["profile_ms_per_step"] = w.profile
            rows.append(row)
            ratio = (
                f"{row['ratio']:9.2f} {row['ratio_cpu']:8.2f}" if ref is not None else f"{'-':>9s} {'-':>8s}"
            )
            print(
                f"{algo:13s} {w.label:24s} {row['steps_per_s']:9.1f} {row['steps_per_cpu_s']:12.1f} {ratio} "
                f"{row['peak_rss_mb']:17.0f} (+{row['rss_growth_mb']:.0f})"
            )
    if args.profile:
        print("\nwhere a step's time goes (ms per step, torch.profiler self times; profiling adds overhead)")
        for row in rows:
            if "profile_ms_per_step" in row:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in row["profile_ms_per_step"].items())
                print(f"  {row['algorithm']:13s} {row['implementation']:24s} {parts}")
    return {"rows": rows, "goals": GOALS}


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--algos",
        nargs="+",
        choices=ALGOS,
        default=list(DEFAULT_ALGOS),
        help="default: the three with goals (bc cql cql-discrete)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in every worker")
    p.add_argument("--rounds", type=int, default=5, help="measurement rounds; medians are reported")
    p.add_argument("--seconds", type=float, default=3.0, help="wall seconds per implementation per round")
    p.add_argument(
        "--d3rlpy-python",
        type=Path,
        default=Path("/tmp/d3venv/bin/python"),
        help="python of a virtualenv with d3rlpy installed (skipped with a message if absent)",
    )
    p.add_argument(
        "--offrl-src", type=Path, default=None, help="also run the offrl package found in this folder"
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=("default", "max-autotune-no-cudagraphs"),
        help="also run offrl with torch.compile in this mode (default: 'default'; slow to start)",
    )
    p.add_argument("--profile", action="store_true", help="also break one offrl step down by kind of work")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 s: a smoke run")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where every worker trains; on cuda offrl also runs without CUDA graphs",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    # worker mode (internal)
    p.add_argument("--worker", choices=("offrl", "d3rlpy"), help=argparse.SUPPRESS)
    p.add_argument("--algo", choices=ALGOS, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--compile-mode", dest="compile_mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-cuda-graphs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        args.compile = args.compile_mode
        return worker_main(args)
    if args.quick:
        args.rounds, args.seconds = 2, 1.0
    if args.d3rlpy_python is not None and not args.d3rlpy_python.exists():
        print(
            f"d3rlpy: {args.d3rlpy_python} not found, so offrl runs alone. Install it in its own venv:\n"
            "  python3 -m venv /tmp/d3venv && /tmp/d3venv/bin/pip install torch==2.13.0 && "
            "/tmp/d3venv/bin/pip install d3rlpy",
            file=sys.stderr,
        )
        args.d3rlpy_python = None
    info = machine(args.threads)
    print(
        f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads, "
        f"load average {info['load_average']}" + (f", device {info['gpu']}" if args.device == "cuda" else "")
    )
    results = {algo: run_algo(algo, args) for algo in args.algos}
    out = report(results, args)
    if args.json is not None:
        out["machine"] = info
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
