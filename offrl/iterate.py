"""Offline learning with periodic deployment: ``offrl iterate``, K rounds of collect → append → train.

Round ``k`` deploys a policy for ``steps_per_round`` environment steps — round 0 the uniform random
policy, later rounds the policy of round ``k − 1`` acting stochastically, so that new data adds
coverage — appends them to the dataset file (atomically: the merged file replaces the old one in one
rename), then trains a new offline run in full passes over the whole file, from scratch or, with
``warm_start``, from the previous round's network weights.

Output directory:

    DIR/iterate.json           the config, the resolved training settings and one summary per round
    DIR/round_NNN/             round k's ordinary offline run directory (docs/training.md)
    DIR/records/<id>.json      round k's result record in the ``offrl bench`` format, its dataset size
                               (= environment samples) as ``cell.info.dataset_transitions``

so ``offrl report DIR`` tabulates the rounds and, with online records beside them (copied from an
``offrl bench`` results directory), draws the rounds as points on the online learning curves.

Running the same command again continues: finished rounds are skipped; a round whose data was
appended but whose training did not finish resumes it. The dataset's row count after every append is
kept in iterate.json, and each append leaves a marker in the file's metadata, so an append that
happened just before a crash is recognised instead of repeated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from offrl import config as cfgmod
from offrl.config import option
from offrl.errors import ConfigError, DatasetError
from offrl.utils import atomic_write_json, file_sha256

if TYPE_CHECKING:
    import gymnasium as gym
    import numpy as np

    from offrl.train import RunConfig

ITERATE_JSON = "iterate.json"
STATE_VERSION = 1
APPENDS_KEY = "iterate_appends"  # file metadata: one marker per append, the last one names the round
_IDENTITY = ("env", "algo", "dataset", "steps_per_round", "seed", "warm_start", "device")


@dataclass(frozen=True)
class IterateConfig:
    env: str = field(metadata={"help": "gymnasium environment id to deploy in, e.g. CartPole-v1"})
    algo: str = field(metadata={"help": "offline algorithm trained every round (see `offrl algos`)"})
    dataset: str = field(
        metadata={"help": "dataset file the rounds append to; created if missing, else its env must match"}
    )
    rounds: int = option(3, "number of rounds (deploy → append → train); rerun with more to extend", low=1)
    steps_per_round: int = option(10_000, "environment steps collected per round", low=1)
    seed: int = option(0, "training seed of every round; collection seeds derive from it and the round")
    warm_start: bool = option(
        False,
        "start round k's networks (observation normaliser included) from round k-1's final weights; "
        "optimisers start fresh",
    )
    epochs: int | None = option(None, "full passes over the whole file per round", low=1)
    steps: int | None = option(
        None, "gradient steps per round instead of epochs, rounded up to whole passes", low=1
    )
    settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "algorithm and train.KEY settings of every round, as with `offrl train --set`"},
    )
    device: str = option("cpu", "cpu or cuda")
    config_file: str | None = option(None, "TOML config of the offline runs, as with `offrl train --config`")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"iterate: --rounds must be positive, got {self.rounds}")
        if self.steps_per_round < 1:
            raise ConfigError(f"iterate: --steps-per-round must be positive, got {self.steps_per_round}")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("iterate: give either --epochs or --steps, not both")
        if str(self.dataset).startswith("minari:"):
            raise ConfigError(
                f"iterate: --dataset {self.dataset}: iterate appends to its dataset file, and a Minari dataset "
                "is read-only here; convert it first (offrl convert --from minari ID --out FILE.h5)"
            )


class _Trained(NamedTuple):
    passes: int
    steps: int
    steps_per_second: float  # 0 when the run had finished before this call
    resumed: bool  # continued from a checkpoint (or adopted finished): its timing covers a tail only


@dataclass
class IterateResult:
    out: Path
    rounds: list[dict[str, Any]]  # the summaries of iterate.json, one per round done so far
    ran: list[int]  # rounds collected or trained by this call
    skipped: list[int]  # rounds finished before this call


def _json_plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists), for comparing configs across invocations."""
    return json.loads(json.dumps(obj, default=str))


def round_dir(out: Path, k: int) -> Path:
    return out / f"round_{k:03d}"


def collect_seed(seed: int, k: int) -> int:
    """Seed of round k's environment resets and action sampling: distinct per round, fixed by ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


# -- iterate.json ----------------------------------------------------------------------------------
def _identity(cfg: IterateConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in _IDENTITY}


def _run_config_doc(run_cfg: RunConfig) -> dict[str, Any]:
    from offrl.run import algo_settings

    return _json_plain(
        {
            "train": cfgmod.to_dict(run_cfg.train),
            "algo_config": algo_settings(run_cfg.algo_config),
            "runtime": cfgmod.to_dict(run_cfg.runtime),
        }
    )


def _recorded_run_config_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """The run config recorded in iterate.json as :func:`_run_config_doc` writes it now: older files
    kept runtime settings in [train] and [algo_config] and had no [runtime] table."""
    from offrl.runtime import Runtime, migrate
    from offrl.train import DEFAULT_RUNTIME

    doc = migrate(doc)
    runtime: Runtime = cfgmod.replace(DEFAULT_RUNTIME, doc.get("runtime", {}), f"{ITERATE_JSON} [runtime]")
    return _json_plain({**doc, "runtime": cfgmod.to_dict(runtime)})


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


def _load_state(cfg: IterateConfig, run_cfg: RunConfig, out: Path) -> dict[str, Any]:
    """iterate.json of an earlier invocation with the same settings, or a new one (written now, before
    any data is collected, so that the file's row count at the start is known on every rerun)."""
    from offrl.data.append import read_checked_env

    path = out / ITERATE_JSON
    ident = _json_plain(_identity(cfg))
    run_doc = _run_config_doc(run_cfg)
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        recorded = state.get("config", {})
        diffs = _differences({k: recorded.get(k) for k in _IDENTITY}, ident)
        diffs += _differences(_recorded_run_config_doc(state.get("run_config", {})), run_doc)
        if diffs:
            raise ConfigError(
                f"{out} holds an iterate run with other settings ({'; '.join(diffs)}); "
                "repeat its command (only --rounds may change) or use another --out"
            )
        return state
    dataset = Path(cfg.dataset)
    if out.exists() and any(p.resolve() != dataset for p in out.iterdir()):  # the file may live there
        raise ConfigError(f"{out} is not empty and has no {ITERATE_JSON}; use a new or empty --out")
    initial = 0
    if dataset.exists():
        initial = read_checked_env(dataset, cfg.env).num_transitions
    state = {
        "version": STATE_VERSION,
        "run_id": uuid.uuid4().hex,
        "config": _json_plain(dataclasses.asdict(cfg)),
        "run_config": run_doc,
        "initial_transitions": initial,
        "rounds": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, state)
    return state


def _save_state(out: Path, state: dict[str, Any], cfg: IterateConfig) -> None:
    state["config"].update(_json_plain({"rounds": cfg.rounds}))
    atomic_write_json(out / ITERATE_JSON, state)


# -- one round -------------------------------------------------------------------------------------
class _Sampling:
    """A trained policy asked to sample its actions. It offers ``log_prob`` only where its kind has
    one: the recorder stores the log-probabilities of any policy that offers them."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        if policy.is_stochastic:
            self.log_prob = policy.log_prob

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        return self.policy.act(obs, deterministic=deterministic)


def _deployed_policy(cfg: IterateConfig, out: Path, k: int, action_space: gym.Space, seed: int) -> Any:
    from offrl.policies import RandomPolicy
    from offrl.policies.artifact import load_policy

    if k == 0:
        return RandomPolicy(action_space, seed=seed)
    return _Sampling(load_policy(round_dir(out, k - 1), device=cfg.device, seed=seed))


def _collect(
    cfg: IterateConfig, out: Path, state: dict[str, Any], k: int, action_space: gym.Space, show: bool
) -> dict[str, Any]:
    """Deploy, append to the dataset, and return round k's summary so far (status ``collected``)."""
    from offrl.data.append import append_episodes, read_checked_env
    from offrl.data.recorder import record

    t0 = time.perf_counter()
    dataset = Path(cfg.dataset)
    before = state["rounds"][k - 1]["dataset_transitions"] if k else state["initial_transitions"]
    n = cfg.steps_per_round
    seed = collect_seed(cfg.seed, k)
    marker = {"run_id": state["run_id"], "round": k, "rows": [before, before + n]}
    entry: dict[str, Any] = {
        "round": k,
        "status": "collected",
        "policy": "random" if k == 0 else f"{cfg.algo} policy of iterate round {k - 1}",
        "collect_seed": seed,
        "collected_steps": n,
    }
    rows, last = 0, None
    if dataset.exists():
        raw = read_checked_env(dataset, cfg.env)
        rows, last = raw.num_transitions, (raw.metadata.get(APPENDS_KEY) or [None])[-1]
    if rows == before + n and last == marker:
        entry["appended_before_restart"] = True  # appended, then interrupted before iterate.json said so
    elif rows != before:
        found = f"has {rows} transitions" if dataset.exists() else "is missing"
        raise DatasetError(
            dataset,
            f"{found}, but {out / ITERATE_JSON} expects {before} before round {k}: the file was changed "
            "outside this loop; restore it or start a new --out",
        )
    else:
        policy = _deployed_policy(cfg, out, k, action_space, seed)
        with tempfile.TemporaryDirectory(prefix=".collect-", dir=out) as tmp:
            part = Path(tmp) / "part.h5"
            record(
                cfg.env,
                policy,
                steps=n,
                seed=seed,
                out=part,
                deterministic=False,  # sampled actions add coverage (kinds without sampling act as usual)
                progress=show,
                policy_description=entry["policy"],
            )
            rows = append_episodes(
                dataset,
                part,
                cfg.env,
                marker_key=APPENDS_KEY,
                marker=marker,
                description=f"made by `offrl iterate` in {cfg.env}",
            )
    entry.update(
        {
            "dataset_transitions": rows,
            "env_samples": rows,
            "collected_steps_total": (k + 1) * n,
            "dataset_sha256": file_sha256(dataset),
            "collect_wall_time_s": time.perf_counter() - t0,
        }
    )
    return entry


def _train(cfg: IterateConfig, run_cfg: RunConfig, out: Path, entry: dict[str, Any], show: bool) -> _Trained:
    """Train (or resume, or adopt a finished) round run; ``(passes, steps, steps/s, resumed)``."""
    from offrl.run import run_status
    from offrl.train import Trainer

    k = int(entry["round"])
    dataset = Path(cfg.dataset)
    if file_sha256(dataset) != entry["dataset_sha256"]:
        raise DatasetError(
            dataset, f"changed since round {k}'s data was appended (SHA-256 differs from {ITERATE_JSON})"
        )
    run_dir = round_dir(out, k)
    status = run_status(run_dir)
    if status.status == "finished":  # trained, then interrupted before iterate.json said so
        info = status.info
        return _Trained(int(info.get("passes_done", 0)), int(info.get("steps_done", 0)), 0.0, True)
    if status.resumable:
        result = Trainer(run_cfg, run_dir).run(resume=True, show_progress=show)
        return _Trained(result.passes, result.steps, result.steps_per_second, True)
    shutil.rmtree(run_dir, ignore_errors=True)  # nothing to continue from
    init_from = round_dir(out, k - 1) if cfg.warm_start and k > 0 else None
    result = Trainer(run_cfg, run_dir, init_from=init_from).run(show_progress=show)
    return _Trained(result.passes, result.steps, result.steps_per_second, False)


def _write_record(
    cfg: IterateConfig,
    run_cfg: RunConfig,
    out: Path,
    raw_facts: dict[str, Any],
    entry: dict[str, Any],
    outcome: _Trained,
    wall: float,
) -> Path:
    """Round k's result in the bench record format; its dataset size is the report's x position."""
    from offrl.bench.grid import Cell, slug
    from offrl.bench.runner import CellOutcome, finished_record

    k = int(entry["round"])
    label = f"{cfg.algo}-iterate" + ("-warm" if cfg.warm_start else "")
    task = f"{cfg.env} round {k:03d}"
    settings = {
        **_json_plain(_overrides(cfg)),
        "train.threads": run_cfg.runtime.threads,
        "iterate.round": k,
        "iterate.steps_per_round": cfg.steps_per_round,
        "iterate.warm_start": cfg.warm_start,
    }
    cell = Cell(
        cell_id=f"{label}__{slug(task)}__s{cfg.seed}",
        kind="offline",
        algo=label,
        algo_name=cfg.algo,
        task=task,
        seed=cfg.seed,
        device=cfg.device,
        settings=settings,
        dataset=cfg.dataset,
        env_id=cfg.env,
        info={
            **raw_facts,
            "dataset_source": cfg.dataset,
            "dataset_transitions": entry["dataset_transitions"],
            "env_samples": entry["env_samples"],
            "iterate_round": k,
        },
    )
    rec = finished_record(
        cell,
        round_dir(out, k),
        out,
        CellOutcome(outcome.steps, outcome.steps_per_second, "gradient_steps"),
        resumed=outcome.resumed,
        wall_time_s=wall,
    )
    rec["iterate"] = {"round": k, "env_samples": entry["env_samples"], "warm_start": cfg.warm_start}
    path = out / "records" / f"{cell.cell_id}.json"
    atomic_write_json(path, rec)
    return path


def _finish_entry(entry: dict[str, Any], run_dir: Path, outcome: _Trained) -> None:
    from offrl.run import run_status

    ev = None
    if (run_dir / "eval.json").exists():
        ev = json.loads((run_dir / "eval.json").read_text())
    run_info = run_status(run_dir).info
    entry.update(
        {
            "status": "finished",
            "run_dir": run_dir.name,
            "init_from": run_info.get("init_from"),
            "passes": outcome.passes,
            "gradient_steps": outcome.steps,
            "steps_per_second": outcome.steps_per_second,
            "training_resumed": outcome.resumed,
            "final_eval": None
            if ev is None
            else {
                "return_mean": ev["mean"],
                "return_std": ev["std"],
                "normalized_score": ev.get("normalized_mean"),
                "normalized_std": ev.get("normalized_std"),
                "episodes": len(ev["returns"]),
            },
        }
    )


def describe_round(entry: dict[str, Any]) -> str:
    """One line for people: data size, final evaluation, training and wall time of a finished round."""
    line = f"round {entry['round']}: {entry['dataset_transitions']} transitions"
    ev = entry.get("final_eval")
    if ev:
        line += f", final return {ev['return_mean']:.1f} ± {ev['return_std']:.1f}"
        if ev.get("normalized_score") is not None:
            line += f" (normalised {ev['normalized_score']:.1f})"
    else:
        line += ", not evaluated (train.eval_every = 0)"
    return (
        line
        + f"; {entry['passes']} passes, {entry['gradient_steps']} gradient steps, {entry['wall_time_s']:.1f} s"
    )


# -- the loop --------------------------------------------------------------------------------------
def _overrides(cfg: IterateConfig) -> dict[str, Any]:
    overrides = dict(cfg.settings)
    if cfg.epochs is not None:
        overrides["train.epochs"] = cfg.epochs
    if cfg.steps is not None:
        overrides["train.steps"] = cfg.steps
    return overrides


def resolve_run_config(cfg: IterateConfig, action_space: gym.Space) -> RunConfig:
    """The offline run config of every round (``offrl train``'s resolution of --epochs/--steps/--set)."""
    from offrl.train import resolve_config

    run_cfg = resolve_config(
        cfg.algo,
        cfg.dataset,
        action_space=action_space,
        seed=cfg.seed,
        device=cfg.device,
        config_file=cfg.config_file,
        overrides=_overrides(cfg),
    )
    t = run_cfg.train
    if t.epochs is None and t.steps is None:
        raise ConfigError("iterate: give the length of each round's training: --epochs or --steps")
    for name in ("epochs", "steps"):
        value = getattr(t, name)
        if value is not None and value <= 0:
            raise ConfigError(f"iterate: {name} must be positive, got {value}")
    return run_cfg


def run_iterate(
    cfg: IterateConfig,
    out: str | os.PathLike[str],
    *,
    show_progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> IterateResult:
    """Run (or continue) the rounds of ``cfg`` in ``out``; see the module docstring."""
    import gymnasium as gym

    from offrl.data.append import read_checked_env
    from offrl.evaluation import env_spaces
    from offrl.logger import progress_enabled

    cfg = dataclasses.replace(cfg, dataset=str(Path(cfg.dataset).resolve()))
    out_dir = Path(out)
    show = progress_enabled() if show_progress is None else show_progress
    _, action_space = env_spaces(cfg.env)
    run_cfg = resolve_run_config(cfg, action_space)
    state = _load_state(cfg, run_cfg, out_dir)
    result = IterateResult(out_dir, state["rounds"], [], [])
    for k in range(cfg.rounds):
        rounds = state["rounds"]
        if k < len(rounds) and rounds[k].get("status") == "finished":
            result.skipped.append(k)
            continue
        result.ran.append(k)
        if k == len(rounds):
            rounds.append(_collect(cfg, out_dir, state, k, action_space, show))
            _save_state(out_dir, state, cfg)
        entry = rounds[k]
        t0 = time.perf_counter()
        outcome = _train(cfg, run_cfg, out_dir, entry, show)
        _finish_entry(entry, round_dir(out_dir, k), outcome)
        # collection plus training; a resumed training counts its own tail only (training_resumed)
        wall = entry["collect_wall_time_s"] + time.perf_counter() - t0
        raw = read_checked_env(Path(cfg.dataset), cfg.env)
        facts = {
            "ref_min_return": raw.ref_min_return,
            "ref_max_return": raw.ref_max_return,
            "discrete": isinstance(action_space, gym.spaces.Discrete),
        }
        entry["wall_time_s"] = wall
        entry["record"] = str(
            _write_record(cfg, run_cfg, out_dir, facts, entry, outcome, wall).relative_to(out_dir)
        )
        _save_state(out_dir, state, cfg)
        if log is not None:
            log(describe_round(entry))
    return result


def iterate(
    env: str,
    algo: str,
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rounds: int,
    steps_per_round: int,
    seed: int = 0,
    warm_start: bool = False,
    epochs: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    config_file: str | os.PathLike[str] | None = None,
    show_progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> IterateResult:
    """``rounds`` deployments of an offline learner, e.g.
    ``iterate("CartPole-v1", "bc", "data.h5", "runs/it", rounds=5, steps_per_round=10_000, epochs=20)``;
    ``settings`` are algorithm or ``train.``-prefixed trainer settings, as for :func:`offrl.train.fit`."""
    cfg = IterateConfig(
        env=env,
        algo=algo,
        dataset=str(dataset),
        rounds=rounds,
        steps_per_round=steps_per_round,
        seed=seed,
        warm_start=warm_start,
        epochs=epochs,
        steps=steps,
        settings=dict(settings),
        device=device,
        config_file=None if config_file is None else str(config_file),
    )
    return run_iterate(cfg, out, show_progress=show_progress, log=log)
