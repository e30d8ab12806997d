"""The run harness of both trainers: what an offline run (``offrl.train``, full passes over a dataset)
and an online run (``offrl.online.loop``, environment steps) share, so that each trainer keeps only
its loop.

- configuration: a run config is top-level keys (algorithm, data or environment, seed, device) and
  three tables, ``[train]`` (the trainer's settings), ``[algo_config]`` (the algorithm's
  hyperparameters) and ``[runtime]`` (:class:`offrl.runtime.Runtime`); :func:`resolve_settings` merges
  defaults ← config file ← ``--set`` overrides and routes each override key to its table;
- the run directory: ``config.toml``, ``run.json`` (status, read by others through :func:`run_status`),
  checkpoints with ``latest.json`` and pruning, the exported policy, loggers (:class:`RunDirectory`);
- metrics: one accumulator per log interval with the first non-finite step, steps/s over training
  time only, evaluation with its logging, and :class:`TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from offrl import config as cfgmod
from offrl.checkpoint import latest_checkpoint, save_checkpoint, sweep_checkpoints, write_latest
from offrl.errors import ConfigError, OfflineRLError
from offrl.logger import JsonlLogger, Logger, MultiLogger, TensorboardLogger, progress_enabled
from offrl.runtime import RUNTIME_KEYS, Runtime, migrate
from offrl.utils import atomic_write_json, atomic_write_text, package_versions, sweep_leftovers

if TYPE_CHECKING:
    from offrl.algos.base import Algorithm
    from offrl.evaluation import EvalResult
    from offrl.policies.artifact import TorchPolicy

CONFIG_TOML = "config.toml"
RUN_JSON = "run.json"
LOCK_FILE = "run.lock"  # held (flock) by the one process writing the run; holds its PID
# files offrl itself puts in a run directory before the run starts (the lock, a bench cell's hash)
OFFRL_COMPANIONS = frozenset({LOCK_FILE, "bench_cell.json"})
SECTIONS = ("train", "algo_config", "runtime")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) stopped a run; ``run.json`` says "interrupted" and the run resumes from its
    last checkpoint. A KeyboardInterrupt, so that what stops on Ctrl-C stops on it too; the CLI exits
    with 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` in the main thread, as SIGINT raises
    KeyboardInterrupt (elsewhere signals cannot be handled, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_recorded(rd: RunDirectory, **fields: Any) -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` (as SIGINT raises KeyboardInterrupt); a run
    stopped by either is recorded as "interrupted" in ``run.json`` before the exception goes on."""
    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        if rd.info:  # begun: run.json says running
            rd.interrupted(signum, last_checkpoint=rd.last_saved, **fields)
        if not isinstance(exc, Interrupted):
            raise Interrupted(signum) from None
        raise


class TrainingDiverged(OfflineRLError):
    """A loss became NaN or infinite; the run directory stays at its last checkpoint."""


# -- configuration ----------------------------------------------------------------------------------
def algo_settings(algo_config: Any) -> dict[str, Any]:
    """The ``[algo_config]`` table: the algorithm's hyperparameters (runtime settings live in ``[runtime]``)."""
    return {k: v for k, v in cfgmod.to_dict(algo_config).items() if k not in RUNTIME_KEYS}


def dumps_run_config(cfg: Any) -> str:
    """``config.toml`` of a run config dataclass: its scalar fields, then one table per section."""
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "algo_config":
            value = algo_settings(value)
        elif dataclasses.is_dataclass(value):
            value = cfgmod.to_dict(value)
        doc[f.name] = value
    return cfgmod.dumps_toml(doc)


@dataclass
class Settings:
    """Settings sorted into a run config's top-level keys and its tables, not yet validated."""

    top: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    algo: dict[str, Any] = dataclasses.field(default_factory=dict)
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)

    def update(self, other: Settings) -> None:
        for name in ("top", "train", "algo", "runtime"):
            getattr(self, name).update(getattr(other, name))


def read_config_file(path: str | os.PathLike[str], top_keys: tuple[str, ...], algo: str | None) -> Settings:
    """A config file (``offrl train --config``, a run's ``config.toml``) as :class:`Settings`; runtime
    settings written where older versions kept them are moved to ``[runtime]``."""
    doc = migrate(cfgmod.read_toml(path))
    known = [*top_keys, *SECTIONS]
    unknown = set(doc) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(known)}")
    if algo is not None and doc.get("algo", algo) != algo:
        raise ConfigError(f"{path}: configures algorithm {doc['algo']!r}, but --algo is {algo!r}")
    return Settings(
        top={k: doc[k] for k in top_keys if k in doc},
        train=dict(doc.get("train", {})),
        algo=dict(doc.get("algo_config", {})),
        runtime=dict(doc.get("runtime", {})),
    )


def split_overrides(
    overrides: Mapping[str, Any], *, top_keys: tuple[str, ...], train_cls: type, algo_cls: type, who: str
) -> Settings:
    """Sort ``key=value`` overrides into top-level, ``[train]``, ``[algo_config]`` and ``[runtime]`` keys.

    ``train.k``, ``algo.k`` (or ``algo_config.k``) and ``runtime.k`` address a table; a runtime key goes
    to ``[runtime]`` under any prefix (older versions kept threads in ``[train]`` and precision in the
    algorithm's config). Plain keys are looked up among the runtime's, then the algorithm's, then the
    trainer's. Unknown keys are an error listing every valid one.
    """
    train_keys = {f.name for f in dataclasses.fields(train_cls)}
    algo_keys = {f.name for f in dataclasses.fields(algo_cls)} - RUNTIME_KEYS
    out = Settings()
    for key, value in overrides.items():
        prefix, _, name = key.rpartition(".")
        if prefix not in ("", "train", "algo", "algo_config", "runtime"):
            name = key  # not a table: reported as unknown below
        if name in RUNTIME_KEYS and prefix in ("", "train", "algo", "algo_config", "runtime"):
            out.runtime[name] = value
        elif prefix == "train":
            out.train[name] = value
        elif prefix in ("algo", "algo_config"):
            out.algo[name] = value
        elif not prefix and key in top_keys:
            out.top[key] = value
        elif not prefix and key in algo_keys:
            out.algo[key] = value
        elif not prefix and key in train_keys:
            out.train[key] = value
        else:
            valid = [
                *sorted(top_keys),
                *sorted(f"train.{k}" for k in train_keys),
                *sorted(f"runtime.{k}" for k in RUNTIME_KEYS),
                *sorted(algo_keys),
            ]
            raise ConfigError(f"unknown setting {key!r} for {who}; valid: {', '.join(valid)}")
    return out


def build_tables(
    s: Settings, *, train_cls: type, algo_cls: type, runtime: Runtime, source: str, algo: str
) -> tuple[Any, Any, Runtime]:
    """The validated ``(train, algo_config, runtime)`` of merged settings; ``runtime`` gives the defaults."""
    return (
        cfgmod.from_dict(train_cls, s.train, f"{source} [train]"),
        cfgmod.from_dict(algo_cls, s.algo, f"{source} [algo_config] ('{algo}')"),
        cfgmod.replace(runtime, s.runtime, f"{source} [runtime]"),
    )


def runtime_setting(settings: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value of runtime ``key`` among ``--set``-style settings, under any of its spellings."""
    for spelling in (f"runtime.{key}", f"train.{key}", f"algo.{key}", f"algo_config.{key}", key):
        if spelling in settings:
            return settings[spelling]
    return default


# -- the run directory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunStatus:
    status: str | None  # "running" | "interrupted" | "finished" | "diverged"; None: no run.json
    resumable: bool  # interrupted while running, with a checkpoint to continue from
    info: dict[str, Any]  # run.json as written (dataset, versions, counts, init_from …)


def run_status(run_dir: str | os.PathLike[str]) -> RunStatus:
    """Where the run in ``run_dir`` stands, from its ``run.json`` and checkpoints."""
    path = Path(run_dir)
    try:
        info = json.loads((path / RUN_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict):
        return RunStatus(None, False, {})
    status = info.get("status")
    resumable = status in ("running", "interrupted") and (path / "checkpoints" / "latest.json").exists()
    return RunStatus(status if isinstance(status, str) else None, resumable, info)


def saved_runtime_differences(run_dir: str | os.PathLike[str], runtime: Runtime) -> list[str]:
    """The runtime settings ``run_dir``'s ``config.toml`` records otherwise than ``runtime``."""
    path = Path(run_dir) / CONFIG_TOML
    if not path.exists():
        return []
    saved = cfgmod.replace(runtime, migrate(cfgmod.read_toml(path)).get("runtime", {}), f"{path} [runtime]")
    return [
        f"{k}={getattr(saved, k)!r}" for k in sorted(RUNTIME_KEYS) if getattr(saved, k) != getattr(runtime, k)
    ]


def check_run_dir(path: str | os.PathLike[str], *, resume: bool | None) -> None:
    """Refuse, before any work, a run directory that cannot be written or is not offrl's to write:
    an existing file, a path under a file, a non-empty folder that holds no offrl run; for a new run
    (``resume=False``) a run that already has checkpoints, for a resume a folder without a run
    (``resume=None``: only what applies to both). A run stopped before its first complete checkpoint
    (no ``latest.json``) may be started over."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == p else f"lies under the file {parent}"
            raise ConfigError(f"{p}: {what}, not a run directory")
        if parent.exists():
            break
    if not p.exists():
        if resume:
            raise ConfigError(f"{p}: no such run directory")
        return
    entries = {e.name for e in p.iterdir()} - OFFRL_COMPANIONS
    info = run_status(p).info if RUN_JSON in entries else {}
    is_run = "status" in info and "package_versions" in info  # what offrl writes, not a user's run.json
    if resume:
        if not (p / CONFIG_TOML).exists():
            raise ConfigError(f"{p}: holds no offrl run (no {CONFIG_TOML}) to resume")
        return
    if resume is False and (p / "checkpoints" / "latest.json").exists():
        raise ConfigError(f"{p} already holds a run; use --resume or another --out")
    if entries and not is_run and not (p / "checkpoints").exists():
        raise ConfigError(
            f"{p}: the folder is not empty and holds no offrl run ({', '.join(sorted(entries)[:3])}"
            f"{', …' if len(entries) > 3 else ''}); give an empty or new --out"
        )


class RunDirectory:
    """One run's directory: ``config.toml``, ``run.json``, checkpoints named ``PREFIX_NNN`` with
    ``latest.json``, the exported ``policy/``, ``metrics.jsonl``, ``tb/`` and ``eval.json``.

    ``unit`` names what checkpoint numbers count (``pass``, ``environment step``) in messages.
    """

    def __init__(self, path: str | os.PathLike[str], *, prefix: str, digits: int, unit: str) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.prefix, self.digits, self.unit = prefix, digits, unit
        self.info: dict[str, Any] = {}
        self.logger: Logger | None = None
        self.last_saved = 0
        self._lock_fd: int | None = None

    # -- one writer ---------------------------------------------------------------------------------
    def acquire(self, *, resume: bool) -> None:
        """Check that the run directory may be written, create it and take its lock.

        A new run needs a directory that does not exist, is empty, or holds a run without a checkpoint
        (which then starts over); a folder with anything else in it is not offrl's to overwrite. A
        resumed run needs a run. The lock is an exclusive ``flock`` on ``run.lock``, which the OS
        releases when the process ends (a kill -9 included), so it never goes stale; the holder writes
        its PID into it, since ``flock`` does not say who holds a lock.
        """
        check_run_dir(self.path, resume=resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot create the run directory ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.path}: another process (PID {holder}) is writing this run; one writer per run directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self.sweep()  # only under the lock: another writer's staging folders look like leftovers

    @contextlib.contextmanager
    def writing(self, *, resume: bool) -> Iterator[None]:
        """Hold the run directory for the block: its lock (:meth:`acquire`), and SIGINT/SIGTERM recorded
        as an interrupted run (:func:`interrupts_recorded`); released however the block ends."""
        self.acquire(resume=resume)
        try:
            with interrupts_recorded(self):
                yield
        finally:
            self.release()

    def release(self) -> None:
        """Close the loggers and drop the lock (the OS drops it anyway when the process ends)."""
        self.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock

    def resume_point(self, runtime: Runtime) -> Path:
        """The newest checkpoint, after checking that ``runtime`` is the one the run was started with."""
        ck = latest_checkpoint(self.checkpoints)
        if ck is None:
            raise ConfigError(f"{self.path}: no checkpoint to resume from")
        diffs = saved_runtime_differences(self.path, runtime)
        if diffs:
            raise ConfigError(
                f"{self.path / CONFIG_TOML}: the run was started with runtime {', '.join(diffs)}; "
                "a resumed run keeps its runtime settings"
            )
        return ck

    def begin(
        self, *, resume: bool, config_toml: str, info: dict[str, Any], totals: dict[str, Any]
    ) -> Logger:
        """Record the run as running and open its loggers; takes the lock first if :meth:`acquire` was
        not called (a new run: refuses a directory that holds one or anything else)."""
        if self._lock_fd is None:
            self.acquire(resume=resume)
        if resume:
            self.info = run_status(self.path).info
            for key, value in info.items():  # what older versions did not record (dataset_absolute)
                self.info.setdefault(key, value)
        else:
            # a run stopped before its first complete checkpoint starts over: its records go with it
            for leftover in ("metrics.jsonl", "eval.json"):
                (self.path / leftover).unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)
            self.info = {
                **info,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "package_versions": package_versions(),
            }
        atomic_write_text(self.path / CONFIG_TOML, config_toml)
        self.write_status("running", **totals)
        self.logger = MultiLogger(
            [JsonlLogger(self.path / "metrics.jsonl"), TensorboardLogger(self.path / "tb")]
        )
        return self.logger

    def sweep(self) -> list[str]:
        """Clear what writes cut short by a kill left behind (hidden staging folders and temporary
        files of checkpoints, the policy and the run's records); a folder moved aside for its
        replacement is put back. Only while this process is the run folder's one writer."""
        own = (CONFIG_TOML, RUN_JSON, "eval.json", "policy")
        return [*sweep_leftovers(self.path, own), *sweep_checkpoints(self.checkpoints)]

    def write_status(self, status: str, **fields: Any) -> None:
        self.info.update({"status": status, **fields})
        atomic_write_json(self.path / RUN_JSON, self.info)

    def save(
        self,
        number: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        *,
        latest: dict[str, Any],
        policy: TorchPolicy,
        policy_extra: dict[str, Any],
        keep: int,
    ) -> None:
        """Checkpoint ``number`` (then ``latest.json`` names it), the policy export, and pruning to the
        ``keep`` newest checkpoints (0: keep all)."""
        name = f"{self.prefix}_{number:0{self.digits}d}"
        save_checkpoint(self.checkpoints / name, state, meta)
        write_latest(self.checkpoints, name, latest)
        policy.save(self.path / "policy", extra=policy_extra)
        self.last_saved = number
        if keep > 0:
            for old in sorted(p for p in self.checkpoints.glob(f"{self.prefix}_*") if p.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def interrupted(self, signum: int, **fields: Any) -> None:
        """Record that a signal (SIGINT, SIGTERM) stopped the run; it resumes from its last checkpoint."""
        self.close()
        name = signal.Signals(signum).name
        self.write_status("interrupted", signal=name, **fields)

    def diverged(self, exc: TrainingDiverged, **fields: Any) -> TrainingDiverged:
        """Record the divergence in ``run.json``; the error to raise, naming the checkpoint left."""
        self.close()
        self.write_status("diverged", error=str(exc), **fields)
        return TrainingDiverged(
            f"{exc}; the run is left at its last checkpoint ({self.unit} {self.last_saved}) in {self.path}"
        )

    def finish(self, final_eval: dict[str, Any] | None, **fields: Any) -> None:
        if final_eval is not None:
            atomic_write_json(self.path / "eval.json", final_eval)
        self.close()
        self.write_status("finished", **fields)


# -- set-up -----------------------------------------------------------------------------------------
def run_device(device: str) -> torch.device:
    """The torch device ``device`` names; a ConfigError for a name torch does not know or a CUDA
    device this machine lacks (checked with the other settings, before the run directory is made)."""
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r}: not a torch device (cpu, cuda, cuda:N)") from None
    if out.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: offrl runs on cpu or cuda")
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return out


def progress_bar(total: int, initial: int, show_progress: bool | None) -> tqdm:
    show = progress_enabled() if show_progress is None else show_progress
    return tqdm(total=total, initial=initial, disable=not show, unit="step", dynamic_ncols=True)


# -- metrics --------------------------------------------------------------------------------------
class MetricAccumulator:
    """Sums per-update metrics on the device and remembers, per term, the first update in the interval
    that was not finite, without reading anything back until :meth:`read` (one host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[str] | None = None
        self.sums: Tensor | None = None
        self.first_bad: Tensor | None = None
        self.count = 0

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        """Add one update's metrics: scalars, or (K,) vectors with one value per member of a pack."""
        if self.keys is None:
            self.keys = list(metrics)
        vals = torch.stack(
            [torch.as_tensor(metrics[k], device=self.device).detach().float().reshape(-1) for k in self.keys]
        )  # (terms, members)
        bad = ~torch.isfinite(vals)
        if self.sums is None or self.first_bad is None:
            self.sums = torch.where(bad, torch.zeros_like(vals), vals)
            self.first_bad = torch.where(bad, 0, -1)
        else:
            self.sums += torch.where(bad, torch.zeros_like(vals), vals)
            self.first_bad = torch.where(bad & (self.first_bad < 0), self.count, self.first_bad)
        self.count += 1

    def read(self, counter: int, unit: str) -> dict[str, float]:
        """The means since the last read; ``counter`` numbers the last update added (in ``unit``s, e.g.
        gradient steps), so that a non-finite term raises :class:`TrainingDiverged` naming its first."""
        members = self.read_members(counter, unit)
        if not members:
            return {}
        result = members[0]
        if isinstance(result, TrainingDiverged):
            raise result
        return result

    def read_members(self, counter: int, unit: str) -> list[dict[str, float] | TrainingDiverged]:
        """:meth:`read` for each member of a pack: its means, or the divergence it met (not raised)."""
        if self.keys is None or self.sums is None or self.first_bad is None:
            return []
        means = (self.sums / self.count).T.tolist()
        first_bad = self.first_bad.T.tolist()
        count = self.count
        self.sums, self.first_bad, self.count = None, None, 0
        out: list[dict[str, float] | TrainingDiverged] = []
        for member_means, member_bad in zip(means, first_bad, strict=True):
            bad = [(k, fb) for k, fb in zip(self.keys, member_bad) if fb >= 0]
            if bad:
                term, rel = min(bad, key=lambda kv: kv[1])
                out.append(TrainingDiverged(f"non-finite '{term}' at {unit} {counter - count + rel + 1}"))
            else:
                out.append(dict(zip(self.keys, member_means)))
        return out


class StepClock:
    """Steps per second over training time only: evaluation and checkpoints run :meth:`paused`."""

    def __init__(self, step: int) -> None:
        self.start = self.last = time.perf_counter()
        self.start_step = self.last_step = step
        self.paused_total = 0.0

    def interval_rate(self, step: int) -> float:
        """Steps per second since the previous call (the start), which this call ends."""
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        spent = time.perf_counter() - t0
        self.last += spent
        self.paused_total += spent

    def overall_rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.start - self.paused_total
        return (step - self.start_step) / elapsed if elapsed > 0 else 0.0


def evaluate_and_log(
    algo: Algorithm,
    env_id: str,
    train_cfg: Any,
    logger: Logger,
    step: int,
    *,
    extra_metrics: Mapping[str, float] | None = None,
    **evaluate_kwargs: Any,
) -> EvalResult:
    """Evaluate ``algo``'s policy with the trainer's ``eval_*`` settings and log ``eval/…`` at ``step``."""
    from offrl.evaluation import evaluate

    algo.train_mode(False)
    result = evaluate(
        algo.policy(),
        env_id,
        episodes=train_cfg.eval_episodes,
        seed=train_cfg.eval_seed,
        num_envs=train_cfg.eval_envs,
        **evaluate_kwargs,
    )
    algo.train_mode(True)
    metrics = {"eval/return_mean": result.mean, "eval/return_std": result.std, **(extra_metrics or {})}
    if result.normalized_mean is not None:
        metrics["eval/normalized_score"] = result.normalized_mean
    if result.action_top_share is not None:
        metrics["eval/action_top_share"] = result.action_top_share
    logger.log(step, metrics)
    return result
