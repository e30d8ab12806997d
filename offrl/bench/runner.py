"""Run a grid's cells in worker processes (or Ray tasks) and write one result record per run.

Results directory:

    RESULTS_DIR/grid.toml                the grid file as given
    RESULTS_DIR/cells.json               every cell of the grid (what the report expects)
    RESULTS_DIR/runs/<cell-id>/          the ordinary offrl run directory of each cell
    RESULTS_DIR/records/<cell-id>.json   its result record, written atomically when the cell ends

A cell with a record for the same config hash is skipped, so an interrupted grid is continued by
running the same command again (``--retry-failed`` also reruns the cells recorded as failed). A cell whose run directory holds a checkpoint of an
interrupted attempt (same config hash) resumes from it. A cell that raises, or whose worker process
dies, is retried once from scratch, then recorded as ``failed`` with its error; the grid goes on.

Adding a kind of cell is one function: a ``CellRunner`` registered in :data:`CELL_RUNNERS`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as _dt
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from offrl.bench.grid import Cell, GridConfig, expand, load_grid
from offrl.errors import ConfigError, OfflineRLError
from offrl.logger import progress_enabled
from offrl.run import Interrupted, run_status, runtime_setting, sigterm_raises
from offrl.utils import atomic_write_json, atomic_write_text

RECORD_SCHEMA = 1
CELL_FILE = "bench_cell.json"  # in each run directory: the hash of the cell that made it


# -- inside a worker: one cell -----------------------------------------------------------------------
@dataclass
class CellOutcome:
    """What a cell runner reports beyond the run directory's own files."""

    steps: int  # gradient steps (offline) or environment steps (online)
    steps_per_second: float
    x_unit: str  # "gradient_steps" | "env_steps": the x axis of the cell's evaluations


CellRunner = Callable[[Cell, Path, bool], CellOutcome]  # (cell, run_dir, resume) -> outcome


def _run_offline(cell: Cell, run_dir: Path, resume: bool) -> CellOutcome:
    from offrl import train

    assert cell.dataset is not None
    if resume:
        result = train.resume(run_dir, show_progress=False)
    else:
        result = train.fit(
            cell.algo_name,
            cell.dataset,
            run_dir,
            seed=cell.seed,
            device=cell.device,
            show_progress=False,
            **cell.settings,
        )
    return CellOutcome(result.steps, result.steps_per_second, "gradient_steps")


ONLINE_MODULE = "offrl.online.loop"


def _run_online(cell: Cell, run_dir: Path, resume: bool) -> CellOutcome:
    from offrl.online import loop

    assert cell.env_id is not None
    if resume:
        result = loop.resume_online(run_dir, show_progress=False)
    else:
        result = loop.train_online(
            cell.algo_name,
            cell.env_id,
            run_dir,
            seed=cell.seed,
            device=cell.device,
            show_progress=False,
            **cell.settings,
        )
    return CellOutcome(int(result.env_steps), float(result.steps_per_second), "env_steps")


def _run_finetune(cell: Cell, run_dir: Path, resume: bool) -> CellOutcome:
    """Pretrain offline into RESULTS_DIR/pretrain/<cell-id> (kept, and resumed or reused when a cell is
    retried), then fine-tune online into the cell's run directory."""
    from offrl import finetune, train

    assert cell.dataset is not None
    pre = {k[len("pretrain.") :]: v for k, v in cell.settings.items() if k.startswith("pretrain.")}
    ft = {k[len("finetune.") :]: v for k, v in cell.settings.items() if k.startswith("finetune.")}
    pre_dir = run_dir.parent.parent / "pretrain" / cell.cell_id
    status = run_status(pre_dir)
    mark = _read_json(pre_dir / CELL_FILE)
    same = mark is not None and mark.get("config_hash") == cell.config_hash()
    if not (same and status.status == "finished"):
        if same and status.resumable:
            train.resume(pre_dir, show_progress=False)
        else:
            if pre_dir.exists():
                shutil.rmtree(pre_dir)
            pre_dir.mkdir(parents=True)
            atomic_write_json(
                pre_dir / CELL_FILE, {"cell_id": cell.cell_id, "config_hash": cell.config_hash()}
            )
            train.fit(
                cell.algo_name,
                cell.dataset,
                pre_dir,
                seed=cell.seed,
                device=cell.device,
                show_progress=False,
                **pre,
            )
    steps = int(ft.pop("train.steps"))
    if resume:
        result = finetune.resume_finetune(run_dir, show_progress=False)
    else:
        result = finetune.finetune(
            pre_dir,
            run_dir,
            steps=steps,
            seed=cell.seed,
            device=cell.device,
            show_progress=False,
            overrides=ft,
        )
    return CellOutcome(int(result.env_steps), float(result.steps_per_second), "env_steps")


CELL_RUNNERS: dict[str, CellRunner] = {
    "offline": _run_offline,
    "online": _run_online,
    "finetune": _run_finetune,
}

# A member of a pack takes at most this much memory (networks, optimiser state, activations of the
# default sizes at batch 256; the dataset is shared by the pack): packs are sized to half the free memory.
PACK_MEMBER_BYTES = 256 << 20
# Packs of up to this many on CUDA by default. On CPU a pack of 3 runs no faster per member than solo runs
# (benchmarks/README.md: packing pays from about 8 members of 64-wide networks), so CPU grids pack only
# when asked (--pack K).
DEFAULT_PACK = {"cuda": 8, "cpu": 1}


@dataclass(frozen=True)
class Pack:
    """Offline cells that differ only in seed or in settings their algorithm may sweep, trained in one
    process as one pack (:mod:`offrl.packed`); each keeps its run directory and record."""

    cells: tuple[Cell, ...]

    @property
    def cell_id(self) -> str:
        return f"{self.cells[0].cell_id} (+{len(self.cells) - 1} packed)"

    @property
    def settings(self) -> dict[str, Any]:
        return self.cells[0].settings

    def to_dict(self) -> dict[str, Any]:
        return {"pack": [c.to_dict() for c in self.cells]}


Job = Cell | Pack


def memory_bounded_pack(limit: int) -> int:
    """``limit``, or fewer where half the free memory holds fewer members."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover (no sysconf)
        return limit
    return max(1, min(limit, int(free // 2 // PACK_MEMBER_BYTES)))


def plan_jobs(cells: list[Cell], limit: int) -> list[Job]:
    """Group offline cells that may be packed (same algorithm, dataset, device and settings, except seeds
    and settings their algorithm may sweep) into packs of at most ``limit``; the rest stay single."""
    from offrl.algos import registry
    from offrl.data.format import read_raw
    from offrl.fast.packing import sweepable

    if limit <= 1:
        return list(cells)
    groups: dict[str, list[Cell]] = {}
    jobs: list[Job] = []
    spaces: dict[str, Any] = {}
    for cell in cells:
        if cell.kind != "offline" or cell.dataset is None:
            jobs.append(cell)
            continue
        if cell.dataset not in spaces:
            spaces[cell.dataset] = read_raw(cell.dataset).action_space
        try:
            free = sweepable(registry.algorithm_class(cell.algo_name, spaces[cell.dataset]))
        except ConfigError:
            jobs.append(cell)
            continue
        fixed = {k: v for k, v in cell.settings.items() if k.removeprefix("algo.") not in free}
        key = json.dumps([cell.algo_name, cell.dataset, cell.device, fixed], sort_keys=True, default=str)
        groups.setdefault(key, []).append(cell)
    for members in groups.values():
        for i in range(0, len(members), limit):
            chunk = members[i : i + limit]
            jobs.append(Pack(tuple(chunk)) if len(chunk) > 1 else chunk[0])
    return jobs


def execute_pack(pack_data: list[dict[str, Any]], results_dir: str, attempt: int) -> dict[str, Any]:
    """Train a pack's cells in this process; write each member's record; return them. A member that
    diverged gets an error record (the caller retries it alone); the pack's own failure is an error for all."""
    os.environ["OFFRL_NO_PROGRESS"] = "1"
    from offrl import train
    from offrl.data.format import read_raw
    from offrl.packed import train_pack

    cells = [Cell.from_dict(d) for d in pack_data]
    results = Path(results_dir)
    run_dirs = [results / "runs" / c.cell_id for c in cells]
    t0 = time.perf_counter()
    try:
        resume = attempt == 1 and all(_resumable(c, d) for c, d in zip(cells, run_dirs, strict=True))
        runs = []
        for cell, run_dir in zip(cells, run_dirs, strict=True):
            assert cell.dataset is not None
            if not resume and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                run_dir / CELL_FILE, {"cell_id": cell.cell_id, "config_hash": cell.config_hash()}
            )
            if resume:
                cfg = train.load_run_config(run_dir, read_raw(cell.dataset).action_space)
            else:
                overrides = {k: v for k, v in cell.settings.items()}
                cfg = train.resolve_config(
                    cell.algo_name,
                    cell.dataset,
                    action_space=read_raw(cell.dataset).action_space,
                    seed=cell.seed,
                    device=cell.device,
                    overrides=overrides,
                )
            runs.append((cfg, run_dir))
        result = train_pack(runs, resume=resume, show_progress=False)
    except Exception as exc:
        error = {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        return {"pack": [{**_base_record(c, attempt), **error} for c in cells]}
    wall = time.perf_counter() - t0
    records = []
    for cell, run_dir, outcome in zip(cells, run_dirs, result.results, strict=True):
        if isinstance(outcome, Exception):
            records.append(
                {**_base_record(cell, attempt), "status": "error", "error": f"diverged: {outcome}"}
            )
            continue
        record = finished_record(
            cell,
            run_dir,
            results,
            CellOutcome(outcome.steps, outcome.steps_per_second, "gradient_steps"),
            attempt=attempt,
            resumed=resume,
            wall_time_s=wall,
        )
        record["packed_with"] = len(cells)
        atomic_write_json(results / "records" / f"{cell.cell_id}.json", record)
        records.append(record)
    return {"pack": records}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _resumable(cell: Cell, run_dir: Path) -> bool:
    """An interrupted earlier attempt of this very cell left a checkpoint to continue from."""
    mark = _read_json(run_dir / CELL_FILE)
    return (
        mark is not None and mark.get("config_hash") == cell.config_hash() and run_status(run_dir).resumable
    )


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# diag/ metrics whose name, without the prefix, is an evaluation's own key
DIAG_RENAMED = {"return_mean": "data_return_mean"}


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluations logged in ``metrics.jsonl``, one per step (a resumed run's repeat of a step wins),
    each with the ``diag/`` metrics logged at its step (without the prefix; ``diag/return_mean``, the
    data's return-to-go, as ``data_return_mean``), where there are any."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    diag: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if any(k.startswith("diag/") for k in row):
            diag[int(row["step"])] = {
                DIAG_RENAMED.get(k[5:], k[5:]): _float(v) for k, v in row.items() if k.startswith("diag/")
            }
        if "eval/return_mean" not in row:
            continue
        step = int(row["step"])
        by_step[step] = {
            "step": step,
            "pass": _float(row.get("eval/pass")),
            "return_mean": _float(row.get("eval/return_mean")),
            "return_std": _float(row.get("eval/return_std")),
            "normalized_score": _float(row.get("eval/normalized_score")),
        }
        if row.get("eval/action_top_share") is not None:  # discrete actions (offrl.evaluation)
            by_step[step]["action_top_share"] = _float(row["eval/action_top_share"])
    return [{**by_step[s], **diag.get(s, {})} for s in sorted(by_step)]


def _best(evaluations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best evaluation during training — chosen with online rollouts, so not an offline result."""
    key = "normalized_score" if any(e["normalized_score"] is not None for e in evaluations) else "return_mean"
    scored = [e for e in evaluations if e[key] is not None]
    return max(scored, key=lambda e: e[key]) if scored else None


def _final(run_dir: Path, evaluations: list[dict[str, Any]]) -> dict[str, Any] | None:
    ev = _read_json(run_dir / "eval.json")
    if ev is None:
        return None
    step = ev.get("step", ev.get("env_steps"))
    return {
        "step": step,
        "pass": ev.get("pass"),
        "return_mean": _float(ev.get("mean")),
        "return_std": _float(ev.get("std")),
        "normalized_score": _float(ev.get("normalized_mean")),
        "episodes": len(ev.get("returns", [])),
    }


def cell_threads(cell: Cell | Pack) -> int:
    """The torch threads a cell's run uses (grids set one per run: the pool parallelises across runs)."""
    return int(runtime_setting(cell.settings, "threads", 1))


def _base_record(cell: Cell, attempt: int) -> dict[str, Any]:
    return {
        "schema": RECORD_SCHEMA,
        "cell_id": cell.cell_id,
        "config_hash": cell.config_hash(),
        "cell": cell.to_dict(),
        "kind": cell.kind,
        "algo": cell.algo,
        "task": cell.task,
        "seed": cell.seed,
        "threads": cell_threads(cell),
        "attempts": attempt,
        "host": socket.gethostname(),
    }


def execute_cell(cell_data: dict[str, Any], results_dir: str, attempt: int) -> dict[str, Any]:
    """Train one cell (or a pack of them: :func:`execute_pack`) in this process and write its record;
    return it. Never raises for the cell's own errors: they come back as ``status: "error"`` so that the
    caller decides whether to retry."""
    if "pack" in cell_data:
        return execute_pack(cell_data["pack"], results_dir, attempt)
    os.environ["OFFRL_NO_PROGRESS"] = "1"
    cell = Cell.from_dict(cell_data)
    results = Path(results_dir)
    run_dir = results / "runs" / cell.cell_id
    record = _base_record(cell, attempt)
    for module in (ONLINE_MODULE if cell.kind != "offline" else "offrl.train", "torch.utils.tensorboard"):
        with contextlib.suppress(ImportError):  # a fresh worker's imports are not the run's wall time
            importlib.import_module(module)
    t0 = time.perf_counter()
    try:
        resume = attempt == 1 and _resumable(cell, run_dir)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a stale or failed attempt: start over
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / CELL_FILE, {"cell_id": cell.cell_id, "config_hash": cell.config_hash()})
        outcome = CELL_RUNNERS[cell.kind](cell, run_dir, resume)
    except Exception as exc:
        record.update(
            {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
                "wall_time_s": time.perf_counter() - t0,
            }
        )
        return record
    record = finished_record(
        cell, run_dir, results, outcome, attempt=attempt, resumed=resume, wall_time_s=time.perf_counter() - t0
    )
    atomic_write_json(results / "records" / f"{cell.cell_id}.json", record)
    return record


def finished_record(
    cell: Cell,
    run_dir: Path,
    results: Path,
    outcome: CellOutcome,
    *,
    attempt: int = 1,
    resumed: bool = False,
    wall_time_s: float,
) -> dict[str, Any]:
    """The record of ``cell`` whose run finished in ``run_dir`` (also written by ``offrl iterate``)."""
    evaluations = read_evaluations(run_dir)
    run_info = run_status(run_dir).info
    record = _base_record(cell, attempt)
    record.update(
        {
            "status": "finished",
            "error": None,
            "resumed": resumed,
            "x_unit": outcome.x_unit,
            "steps": outcome.steps,
            "steps_per_second": outcome.steps_per_second,
            "wall_time_s": wall_time_s,
            "evaluations": evaluations,
            "final": _final(run_dir, evaluations),
            "best_during_training": _best(evaluations),
            "dataset_sha256": run_info.get("dataset_sha256"),
            "package_versions": run_info.get("package_versions"),
            "run_dir": os.path.relpath(run_dir, results),
            "finetune": run_info.get("finetune"),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return record


# -- backends --------------------------------------------------------------------------------------------
class Backend(Protocol):
    slots: int  # cells run at the same time

    def submit(self, cell: Job, attempt: int) -> Any: ...

    def wait(self, handles: Iterable[Any]) -> list[tuple[Any, dict[str, Any] | BaseException]]: ...

    def close(self, cancel: bool) -> None: ...


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS, Windows)
        return os.cpu_count() or 1


CellTarget = Callable[[dict[str, Any], str, int], dict[str, Any]]  # execute_cell's signature


class LocalBackend:
    """A spawn-context process pool: fresh interpreters, so no torch or RNG state leaks between the
    parent and the runs. A worker that dies breaks the pool (every cell running in it fails this
    attempt); a new pool serves the next cells. ``target`` must be importable by the workers."""

    def __init__(self, slots: int, results_dir: str, target: CellTarget = execute_cell) -> None:
        self.slots = slots
        self.results_dir = results_dir
        self.target = target
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()  # set when the grid stops: workers start no further cell
        self._pool: cf.ProcessPoolExecutor | None = None
        self._pool_of: dict[cf.Future[dict[str, Any]], cf.ProcessPoolExecutor] = {}

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.slots, mp_context=self._ctx, initializer=_init_worker, initargs=(self._stop,)
            )
        return self._pool

    def submit(self, cell: Job, attempt: int) -> Any:
        pool = self._executor()
        fut = pool.submit(_unless_stopped, self.target, cell.to_dict(), self.results_dir, attempt)
        self._pool_of[fut] = pool
        return fut

    def wait(self, handles: Iterable[Any]) -> list[tuple[Any, dict[str, Any] | BaseException]]:
        done, _ = cf.wait(list(handles), return_when=cf.FIRST_COMPLETED)
        out: list[tuple[Any, dict[str, Any] | BaseException]] = []
        for fut in done:
            pool = self._pool_of.pop(fut, None)
            try:
                out.append((fut, fut.result()))
            except (Exception, cf.CancelledError) as exc:
                # only the pool this future ran in is broken; a newer one may already serve other cells
                if isinstance(exc, BrokenProcessPool) and pool is not None and pool is self._pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                out.append((fut, exc))
        return out

    def close(self, cancel: bool) -> None:
        if self._pool is None:
            return
        if cancel:
            # a stop reaches the cells running now: SIGTERM makes each record itself interrupted (it
            # resumes from its last checkpoint) and end; cells already handed to a worker's queue do not
            # start (the stop event), and a worker that does not end in time is killed
            self._stop.set()
            processes = list(getattr(self._pool, "_processes", {}).values())
            for proc in processes:
                if proc.is_alive():
                    proc.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in processes:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        self._pool = None


_WORKER_STOP: Any = None  # in a pool worker: the backend's stop event


def _init_worker(stop: Any) -> None:
    global _WORKER_STOP
    _WORKER_STOP = stop


def _unless_stopped(
    target: CellTarget, cell: dict[str, Any], results_dir: str, attempt: int
) -> dict[str, Any]:
    if _WORKER_STOP is not None and _WORKER_STOP.is_set():
        raise Interrupted(signal.SIGTERM)
    return target(cell, results_dir, attempt)


STOP_GRACE_S = 30.0  # seconds a stopped grid gives its running cells to record themselves interrupted


class RayBackend:
    """Ray tasks (``pip install 'offrl[ray]'``): the same cells and records, on one machine or a cluster.
    On several machines RESULTS_DIR and the dataset files must be on storage every node sees."""

    def __init__(self, slots: int | None, address: str | None, results_dir: str) -> None:
        self.results_dir = results_dir
        try:
            import ray
        except ImportError:
            raise OfflineRLError(
                "the ray backend needs Ray: install the optional extra with pip install 'offrl[ray]'"
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._remote = ray.remote(execute_cell)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = slots if slots is not None else max(1, cpus)

    def submit(self, cell: Job, attempt: int) -> Any:
        threads = cell_threads(cell)
        return self._remote.options(num_cpus=threads, max_retries=0).remote(
            cell.to_dict(), self.results_dir, attempt
        )

    def wait(self, handles: Iterable[Any]) -> list[tuple[Any, dict[str, Any] | BaseException]]:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        out: list[tuple[Any, dict[str, Any] | BaseException]] = []
        for ref in ready:
            try:
                out.append((ref, self._ray.get(ref)))
            except Exception as exc:  # a crashed worker or a lost node
                out.append((ref, exc))
        return out

    def close(self, cancel: bool) -> None:
        if self._started:  # a local instance this backend started (or a connection it opened)
            self._ray.shutdown()


# -- the grid loop ----------------------------------------------------------------------------------------
@dataclass
class BenchSummary:
    results_dir: Path
    cells: list[str]
    ran: list[str] = field(default_factory=list)  # cells trained in this invocation (finished or not)
    skipped: list[str] = field(default_factory=list)  # already recorded for the same config
    failed: list[str] = field(default_factory=list)  # recorded as failed (now or before)
    messages: list[str] = field(default_factory=list)


def _recorded_status(results: Path, cell: Cell) -> str | None:
    """The status of the cell's record, if one exists for this very config."""
    rec = _read_json(results / "records" / f"{cell.cell_id}.json")
    if rec is None or rec.get("config_hash") != cell.config_hash():
        return None
    status = rec.get("status")
    return status if isinstance(status, str) else None


def _failed_record(cell: Cell, attempt: int, error: dict[str, Any] | BaseException) -> dict[str, Any]:
    record = _base_record(cell, attempt)
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, BrokenProcessPool):
            text = f"the worker process died while running this or a concurrent cell ({text})"
        record.update({"error": text, "traceback": None})
    else:
        record.update({"error": error.get("error"), "traceback": error.get("traceback")})
        record["wall_time_s"] = error.get("wall_time_s")
    record.update({"status": "failed", "evaluations": [], "final": None, "best_during_training": None})
    return record


def default_workers(cells: list[Cell]) -> int:
    """As many workers as the cores hold runs of the grid's largest thread count."""
    threads = max((cell_threads(c) for c in cells), default=1)
    return max(1, available_cores() // max(1, threads))


def run_grid(
    grid: GridConfig | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    backend: str | Backend = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    retries: int = 1,
    retry_failed: bool = False,
    show_progress: bool | None = None,
    pack: int | None = None,
) -> BenchSummary:
    """Run every unfinished cell of ``grid`` and write its record under ``out``/records.

    ``backend``: "local" (a process pool of ``workers``, default: the cores), "ray", or a
    :class:`Backend` built for ``out`` (e.g. a :class:`LocalBackend` reused across calls; its owner
    closes it). A cell whose record says ``failed`` for the same config runs again only with
    ``retry_failed``; editing its settings in the grid changes its config hash, so it runs again anyway.

    ``pack``: offline cells that differ only in seed (or in settings their algorithm may sweep) train
    together in one process, up to this many, fewer where memory is short (default: 8 on CUDA, 1 on CPU).
    """
    if isinstance(backend, str) and backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be 'local' or 'ray', got {backend!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be positive, got {workers}")
    if not isinstance(grid, GridConfig):
        grid = load_grid(grid)
    results = Path(out).resolve()
    cells = expand(grid)
    summary = BenchSummary(results, [c.cell_id for c in cells])

    results.mkdir(parents=True, exist_ok=True)
    (results / "records").mkdir(exist_ok=True)
    if grid.path is not None:
        atomic_write_text(results / "grid.toml", grid.path.read_text())
    atomic_write_json(results / "cells.json", {"name": grid.name, "cells": [c.to_dict() for c in cells]})

    todo: list[Cell] = []
    for cell in cells:
        status = _recorded_status(results, cell)
        if status == "finished" or (status == "failed" and not retry_failed):
            summary.skipped.append(cell.cell_id)
            if status == "failed":
                summary.failed.append(cell.cell_id)
        else:
            todo.append(cell)
    if summary.skipped:
        n_failed = len(summary.failed)
        summary.messages.append(
            f"{len(summary.skipped)} cell(s) already recorded, skipped"
            + (f" ({n_failed} failed: run them again with --retry-failed)" if n_failed else "")
        )
    if not todo:
        return summary

    workers = workers if workers is not None else grid.workers
    address = ray_address if ray_address is not None else grid.ray_address
    exec_backend: Backend
    if not isinstance(backend, str):
        exec_backend = backend
    elif backend == "ray":
        exec_backend = RayBackend(workers, address, str(results))
    else:
        exec_backend = LocalBackend(workers if workers is not None else default_workers(todo), str(results))
    owned = isinstance(backend, str)
    if pack is not None and pack < 1:
        raise ConfigError(f"--pack must be positive, got {pack}")
    if pack is None:
        pack = DEFAULT_PACK["cuda" if any(c.device.startswith("cuda") for c in todo) else "cpu"]
    jobs = plan_jobs(todo, memory_bounded_pack(pack))
    try:
        with sigterm_raises():  # a stopped grid stops its workers too (close(cancel=True))
            _loop(exec_backend, jobs, results, retries, summary, show_progress, grid.name)
    except BaseException:
        if owned:
            with contextlib.suppress(Exception):
                exec_backend.close(cancel=True)
        raise
    if owned:
        exec_backend.close(cancel=False)
    return summary


def _loop(
    backend: Backend,
    jobs: list[Job],
    results: Path,
    retries: int,
    summary: BenchSummary,
    show_progress: bool | None,
    name: str,
) -> None:
    show = progress_enabled() if show_progress is None else show_progress
    pending: deque[Job] = deque(jobs)
    attempts: dict[str, int] = {}
    running: dict[Any, Job] = {}
    total = sum(len(j.cells) if isinstance(j, Pack) else 1 for j in jobs)
    bar = tqdm(total=total, desc=name, unit="cell", disable=not show, dynamic_ncols=True, file=sys.stderr)
    finished = 0

    def status() -> None:
        bar.set_postfix_str(
            f"done {finished}, running {len(running)}, failed {len(summary.failed)}, queued {len(pending)}"
        )

    def settle(cell: Cell, result: dict[str, Any] | BaseException) -> None:
        nonlocal finished
        if isinstance(result, dict) and result.get("status") == "finished":
            finished += 1
            bar.update(1)
            return
        err = result.get("error") if isinstance(result, dict) else f"{type(result).__name__}: {result}"
        if attempts[cell.cell_id] <= retries:
            bar.write(f"{cell.cell_id}: attempt {attempts[cell.cell_id]} failed ({err}); retrying")
            pending.appendleft(cell)  # alone: a pack's failed member is retried outside the pack
        else:
            atomic_write_json(
                results / "records" / f"{cell.cell_id}.json",
                _failed_record(cell, attempts[cell.cell_id], result),
            )
            summary.failed.append(cell.cell_id)
            bar.write(f"{cell.cell_id}: failed after {attempts[cell.cell_id]} attempts: {err}")
            bar.update(1)

    try:
        while pending or running:
            while pending and len(running) < backend.slots:
                job = pending.popleft()
                cells = job.cells if isinstance(job, Pack) else (job,)
                for cell in cells:
                    attempts[cell.cell_id] = attempts.get(cell.cell_id, 0) + 1
                    if attempts[cell.cell_id] == 1:
                        summary.ran.append(cell.cell_id)
                attempt = max(attempts[c.cell_id] for c in cells)
                running[backend.submit(job, attempt)] = job
            status()
            for handle, result in backend.wait(running):
                job = running.pop(handle)
                if isinstance(job, Pack):
                    member_results = (
                        result["pack"]
                        if isinstance(result, dict) and "pack" in result
                        else [result] * len(job.cells)
                    )
                    for cell, member_result in zip(job.cells, member_results, strict=True):
                        settle(cell, member_result)
                else:
                    settle(job, result)
            status()
    finally:
        bar.close()
