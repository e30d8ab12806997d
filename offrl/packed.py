"""Many runs, one process: the members of a pack (seeds, and values of sweepable settings) of one
algorithm on one dataset, trained together by the offline trainer's pass loop with one batched update
(:class:`offrl.fast.packing.PackedStep`).

Each member is an ordinary run in its own folder (``OUT/seed-S``, or ``OUT/KEY=VALUE-seed-S`` in a sweep):
its own full-pass order, random streams, optimiser state, evaluations, checkpoints and exported policy,
so ``evaluate``, ``ope``, ``report`` and ``--resume`` treat it as a solo run. ``OUT/pack.json`` lists the
members; resuming ``OUT`` continues the whole pack, bitwise on CPU. A member folder resumed alone
continues as a solo run, which is not bitwise equal to the packed continuation (batched matrix products
round differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offrl import run
from offrl.errors import ConfigError
from offrl.fast.packing import PackedStep
from offrl.train import RunResult, Trainer, load_run_config, resolve_config, run_dataset_path
from offrl.utils import atomic_write_json, file_sha256

PACK_JSON = "pack.json"
PACK_FORMAT = 1


@dataclass(frozen=True)
class Member:
    """One member of a pack: its folder under the pack's ``OUT``, its seed and its swept settings."""

    folder: str
    seed: int
    settings: dict[str, Any]


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` -> the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds: '{part}' is not a seed or a range like 0-7") from None
        if sep and int(hi) < int(lo):
            raise ConfigError(f"--seeds: the range '{part}' is empty")
        seeds.extend(s for s in values if s not in seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: '{text}' gives no non-negative seed")
    return seeds


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """``["cql_alpha=1,5,10", …]`` -> ``{"cql_alpha": ["1", "5", "10"]}`` (values parsed as settings are)."""
    sweep: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--sweep: '{item}' is not KEY=VALUE1,VALUE2,…")
        if key in sweep:
            raise ConfigError(f"--sweep: '{key}' is given twice")
        sweep[key] = vals
    return sweep


def plan_members(seeds: list[int], sweep: dict[str, list[str]]) -> list[Member]:
    """Every combination of the swept values, each with every seed."""
    keys = list(sweep)
    members = []
    for values in itertools.product(*(sweep[k] for k in keys)):
        settings = dict(zip(keys, values, strict=True))
        prefix = "-".join(f"{k}={v}" for k, v in settings.items())
        for seed in seeds:
            members.append(Member(f"{prefix}-seed-{seed}" if prefix else f"seed-{seed}", seed, settings))
    return members


@dataclass
class PackResult:
    """What a packed run did: per member, its result or the divergence that stopped it."""

    out: Path
    members: list[Member]
    results: list[RunResult | run.TrainingDiverged]
    steps_per_second: float  # of the pack (each member advanced at this rate)

    @property
    def diverged(self) -> list[tuple[Member, run.TrainingDiverged]]:
        return [
            (m, r)
            for m, r in zip(self.members, self.results, strict=True)
            if isinstance(r, run.TrainingDiverged)
        ]


class PackedTrainer:
    """Trains the members' :class:`Trainer`\\ s (same algorithm, dataset, batch size and schedule) as one
    pack: the pass loop of the offline trainer, with one batched update for all members per step; each
    member's pass-end work (diagnostics, evaluation, checkpoint) is its own trainer's."""

    def __init__(self, trainers: list[Trainer], out: Path, members: list[Member]) -> None:
        self.trainers, self.out, self.members = trainers, out, members
        first = trainers[0]
        for t in trainers[1:]:
            for what, a, b in (
                ("algorithm", t.cfg.algo, first.cfg.algo),
                ("device", t.cfg.device, first.cfg.device),
                ("runtime", t.cfg.runtime, first.cfg.runtime),
                ("trainer settings", t.cfg.train, first.cfg.train),
                ("batch size", t.sampler.batch_size, first.sampler.batch_size),
                ("passes", t.total_passes, first.total_passes),
            ):
                if a != b:
                    raise ConfigError(f"packing: members differ in {what} ({b} and {a})")

    def run(self, *, resume: bool = False, show_progress: bool | None = None) -> PackResult:
        with contextlib.ExitStack() as stack:
            for t in self.trainers:
                stack.enter_context(t.rd.writing(resume=resume))
            return self._run(resume, show_progress)

    def _run(self, resume: bool, show_progress: bool | None) -> PackResult:
        trainers = self.trainers
        first = trainers[0]
        sha = file_sha256(first.dataset_path)  # one dataset: hashed once for all members
        for t in trainers:
            t.dataset_sha = sha
        starts = [t._open(resume) for t in trainers]
        if len(set(starts)) != 1:
            detail = ", ".join(f"{m.folder}: {s}" for m, s in zip(self.members, starts, strict=True))
            raise ConfigError(
                f"{self.out}: the members' newest checkpoints are at different passes ({detail}); resume "
                "each member folder alone, or restart the pack"
            )
        start_pass, step = starts[0], first.step
        pack = PackedStep([t.algo for t in trainers])
        per_pass = first.sampler.batches_per_pass
        bar = run.progress_bar(first.total_passes * per_pass, step, show_progress)
        bar.set_description(f"pack of {len(trainers)}")
        for t in trainers:
            t.show_progress = not bar.disable
        clock = run.StepClock(step)
        acc = run.MetricAccumulator(first.device)
        active = list(range(len(trainers)))
        results: list[RunResult | run.TrainingDiverged | None] = [None] * len(trainers)
        log_every = first.cfg.train.log_every

        def flush() -> None:
            rate = clock.interval_rate(step)
            for k, means in enumerate(acc.read_members(step, "gradient step")):
                t = trainers[k]
                t.step = step
                if k not in active:
                    continue
                if isinstance(means, run.TrainingDiverged):
                    results[k] = t.rd.diverged(means, passes_done=t.rd.last_saved)
                    pack.stop(k)
                    active.remove(k)
                    bar.write(f"{self.members[k].folder}: {means}; the other members go on")
                    continue
                t._flush(means, None, rate)
            bar.set_postfix({"steps/s": f"{rate:.0f}", "members": len(active)}, refresh=False)
            bar.update(step - bar.n)

        for p in range(start_pass, first.total_passes):
            for t in trainers:
                t.algo.train_mode(True)
            for idxs in zip(*(t.sampler.iter_pass() for t in trainers), strict=True):
                acc.add(pack.update(stacked_batch(first.train_data, idxs)))
                step += 1
                if step % log_every == 0:
                    flush()
            if acc.count:
                flush()
            if not active:
                break
            pack.unpack()
            with clock.paused():
                for k in active:
                    trainers[k].step = step
                    trainers[k]._end_pass(p + 1)
        bar.close()
        rate = clock.overall_rate(step)
        for k in active:
            results[k] = trainers[k]._finish(rate)
        done = [r for r in results if r is not None]
        return PackResult(self.out, self.members, done, rate)


def stacked_batch(data: Any, idxs: tuple[torch.Tensor, ...]) -> Any:
    """The rows ``idxs[k]`` of every member in one gather, each field shaped (K, B, ...)."""
    members = len(idxs)
    batch = data.batch(torch.cat(idxs))
    fields = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        fields[f.name] = (
            value.reshape(members, -1, *value.shape[1:]) if isinstance(value, torch.Tensor) else value
        )
    return type(batch)(**fields)


def _write_pack_json(out: Path, algo: str, dataset: str, members: list[Member]) -> None:
    atomic_write_json(
        out / PACK_JSON,
        {
            "offrl_pack": PACK_FORMAT,
            "algo": algo,
            "dataset": dataset,
            "members": [dataclasses.asdict(m) for m in members],
        },
    )


def is_pack(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / PACK_JSON).is_file()


def fit_packed(
    algo: str,
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seeds: list[int],
    sweep: dict[str, list[str]] | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    config_file: str | os.PathLike[str] | None = None,
    show_progress: bool | None = None,
    overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> PackResult:
    """Train one member per seed (and per combination of ``sweep`` values) of ``algo`` on ``dataset`` in one
    process, each into ``out/seed-S`` (``out/KEY=VALUE-seed-S``); otherwise as :func:`offrl.train.fit`
    (``overrides``: settings by their ``--set`` keys, values as text or typed)."""
    from offrl.data.format import read_raw
    from offrl.datasets_registry import resolve_dataset
    from offrl.logger import progress_enabled

    shown = progress_enabled() if show_progress is None else show_progress
    dataset = resolve_dataset(dataset, progress=shown)
    action_space = read_raw(dataset).action_space
    members = plan_members(seeds, sweep or {})
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_pack(out):
        raise ConfigError(f"{out}: the folder is not empty and holds no pack; give an empty or new --out")
    overrides = {**(overrides or {}), **settings}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if steps is not None:
        overrides["train.steps"] = steps
    trainers: list[Trainer] = []
    for m in members:
        cfg = resolve_config(
            algo,
            dataset,
            action_space=action_space,
            seed=m.seed,
            device=device,
            config_file=config_file,
            overrides={**overrides, **m.settings},
        )
        trainers.append(_member_trainer(cfg, out, m, trainers[0] if trainers else None, dataset))
    out.mkdir(parents=True, exist_ok=True)
    _write_pack_json(out, algo, str(dataset), members)
    return PackedTrainer(trainers, out, members).run(show_progress=show_progress)


def _member_trainer(cfg: Any, out: Path, m: Member, shared: Trainer | None, dataset_path: Any) -> Trainer:
    t = Trainer(cfg, out / m.folder, shared=shared, dataset_path=dataset_path)
    t.extra_info = {"pack": str(out.resolve()), "pack_member": m.folder}
    return t


def train_pack(
    runs: list[tuple[Any, Path]], *, resume: bool = False, show_progress: bool | None = None
) -> PackResult:
    """Train the runs ``(RunConfig, run directory)`` as one pack (the bench runner's entry: its cells keep
    their own run directories). With ``resume``, each continues from its newest checkpoint."""
    trainers: list[Trainer] = []
    members = []
    for cfg, run_dir in runs:
        run_dir = Path(run_dir)
        t = Trainer(cfg, run_dir, shared=trainers[0] if trainers else None)
        t.extra_info = {"pack_members": len(runs)}
        trainers.append(t)
        members.append(Member(run_dir.name, cfg.seed, {}))
    return PackedTrainer(trainers, Path(runs[0][1]).parent, members).run(
        resume=resume, show_progress=show_progress
    )


def resume_packed(
    out: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    show_progress: bool | None = None,
) -> PackResult:
    """Continue the pack in ``out`` from its members' newest checkpoints (which must be at one pass), up to
    its configured length or a new pass target."""
    from offrl.data.format import read_raw

    out = Path(out)
    try:
        doc = json.loads((out / PACK_JSON).read_text())
        members = [Member(str(m["folder"]), int(m["seed"]), dict(m["settings"])) for m in doc["members"]]
    except FileNotFoundError:
        raise ConfigError(f"{out}: holds no pack ({PACK_JSON} is missing)") from None
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{out / PACK_JSON}: not a pack description ({exc})") from None
    if not members:
        raise ConfigError(f"{out / PACK_JSON}: the pack has no members")
    trainers: list[Trainer] = []
    for m in members:
        folder = out / m.folder
        run.check_run_dir(folder, resume=True)
        dataset_path = run_dataset_path(folder)
        cfg = load_run_config(folder, read_raw(dataset_path).action_space)
        if epochs is not None or steps is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, steps=steps))
        t = _member_trainer(cfg, out, m, trainers[0] if trainers else None, dataset_path)
        t.target_given = epochs is not None or steps is not None
        trainers.append(t)
    return PackedTrainer(trainers, out, members).run(resume=True, show_progress=show_progress)
