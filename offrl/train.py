"""The offline trainer: full passes over the dataset, with evaluation, checkpoints and the exported
policy changing only at pass boundaries. The only loop over gradient steps in offrl's offline side;
the run directory, config resolution, checkpoints and metrics are the harness's (offrl.run).

Run directory layout (documented in docs/training.md):

    RUN_DIR/config.toml              the resolved config; with the dataset and seed it reproduces the run
    RUN_DIR/run.json                 dataset path + SHA-256, versions, status, passes/steps done
    RUN_DIR/checkpoints/pass_NNNNNN/ state.safetensors + state.json (weights, optimisers, RNG, sampler)
    RUN_DIR/checkpoints/latest.json  names the newest complete checkpoint
    RUN_DIR/policy/                  the policy artefact of the newest checkpoint (offrl.load_policy)
    RUN_DIR/metrics.jsonl            train/…, eval/…, time/… against gradient steps
    RUN_DIR/tb/                      tensorboard event files
    RUN_DIR/eval.json                the final evaluation
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from offrl import config as cfgmod
from offrl import run
from offrl.algos import registry
from offrl.algos.base import Algorithm
from offrl.checkpoint import (
    STATE_JSON,
    Fields,
    RunConfigFileError,
    StateFileError,
    latest_checkpoint,
    load_checkpoint,
    set_torch_rng_state,
)
from offrl.config import option
from offrl.data.dataset import TransitionDataset
from offrl.diagnostics import diagnose, diagnostic_rows
from offrl.errors import ConfigError
from offrl.logger import Logger
from offrl.preprocess import ObsNormalizer
from offrl.run import TrainingDiverged as TrainingDiverged  # raised by Trainer.run
from offrl.runtime import Runtime
from offrl.utils import file_sha256

DEFAULT_RUNTIME = Runtime()


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = option(
        None, "number of full passes over the dataset (each transition once per pass)", low=1
    )
    steps: int | None = option(None, "gradient steps instead of --epochs; rounded up to whole passes", low=1)
    drop_last: bool = option(False, "skip each pass's final partial batch (the skipped count is reported)")
    eval_every: int = option(
        1, "evaluate in the environment every k passes (0: never, a purely offline run)", low=0
    )
    eval_episodes: int = option(10, "episodes per evaluation", low=1)
    eval_envs: int = option(
        5,
        "parallel environments used by evaluation: the same episodes and seeds at any count, though a "
        "greedy policy at a near-tie may act otherwise, since batch size moves float results in the last bits",
        low=1,
    )
    eval_seed: int = option(10_000, "seed of evaluation episodes (separate from the training seed)", low=0)
    checkpoint_every: int = option(
        1, "checkpoint and export the policy every k passes (and always at the end)", low=1
    )
    keep_checkpoints: int = option(2, "how many most recent checkpoints to keep (0: keep all)", low=0)
    log_every: int = option(
        1000, "gradient steps between metric reads, the only host syncs (also at pass ends)", low=1
    )
    ood_monitor: bool = option(
        True,
        "fit an out-of-distribution monitor on the dataset's states and save it in the policy artefact "
        "(policy.ood_score; its fit time is logged as time/ood_fit_seconds)",
    )
    diagnostics: bool = option(
        True,
        "log diag/... at pass ends: Q of the data's actions against their discounted return-to-go, Q of the "
        "policy's actions against the data's, and the policy's distance from the data's actions "
        "(docs/training.md; algorithms without Q-values log none)",
    )

    def __post_init__(self) -> None:
        cfgmod.validate(self, "train")


@dataclass(frozen=True)
class RunConfig:
    """A run: algorithm, dataset, seed, device, the trainer's and the algorithm's settings, the runtime."""

    algo: str
    dataset: str
    seed: int = 0
    device: str = "cpu"
    train: TrainConfig = TrainConfig()
    algo_config: Any = None  # the algorithm's Config instance
    runtime: Runtime = DEFAULT_RUNTIME

    def to_toml(self) -> str:
        return run.dumps_run_config(self)


_TOP_KEYS = ("seed", "device", "dataset")


def resolve_config(
    algo: str,
    dataset: str | os.PathLike[str],
    *,
    action_space: Any,
    seed: int = 0,
    device: str = "cpu",
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults ← config file ← overrides (``--set``, ``--epochs`` …), validated into a RunConfig.

    Plain override keys are looked up in the runtime, the algorithm's config, then the trainer's;
    ``train.k``, ``algo.k`` and ``runtime.k`` address one explicitly (see :func:`offrl.run.split_overrides`).
    """
    algo_cls = registry.algorithm_class(algo, action_space)
    s = run.Settings(top={"seed": seed, "device": device, "dataset": str(dataset)})
    given = dict(overrides or {})
    preset = given.pop("preset", None)
    from_file = run.Settings()
    if config_file is not None:
        from_file = run.read_config_file(config_file, ("algo", "preset", *_TOP_KEYS), algo)
        preset = preset if preset is not None else from_file.top.get("preset")
        from_file.top = {k: v for k, v in from_file.top.items() if k in ("seed", "device")}

    def split(settings: dict[str, Any]) -> run.Settings:
        return run.split_overrides(
            settings,
            top_keys=_TOP_KEYS,
            train_cls=TrainConfig,
            algo_cls=algo_cls.Config,
            who=f"algorithm '{algo_cls.name}'",
        )

    s.update(split(_preset_settings(str(preset), algo, action_space, given, from_file) if preset else {}))
    s.update(from_file)
    s.update(split(given))
    source = str(config_file) if config_file is not None else "settings"
    train_cfg, algo_cfg, runtime = run.build_tables(
        s, train_cls=TrainConfig, algo_cls=algo_cls.Config, runtime=DEFAULT_RUNTIME, source=source, algo=algo
    )
    if train_cfg.epochs is not None and train_cfg.steps is not None:
        raise ConfigError("give either epochs or steps, not both")
    run.run_device(str(s.top["device"]))
    return RunConfig(
        algo=algo,
        dataset=str(s.top["dataset"]),
        seed=int(s.top["seed"]),
        device=str(s.top["device"]),
        train=train_cfg,
        algo_config=algo_cfg,
        runtime=runtime,
    )


def _preset_settings(
    name: str, algo: str, action_space: Any, given: dict[str, Any], from_file: run.Settings
) -> dict[str, Any]:
    """Preset ``name``'s settings for ``algo``; its budget yields to one the file or overrides give."""
    import gymnasium as gym

    from offrl import presets

    settings = presets.preset_settings(name, algo, discrete=isinstance(action_space, gym.spaces.Discrete))
    budgets = ("epochs", "steps", "train.epochs", "train.steps")
    if any(k in given for k in budgets) or any(k in from_file.train for k in budgets[:2]):
        settings = presets.without_budget(settings)
    return settings


def read_run_toml(run_dir: str | os.PathLike[str]) -> Fields:
    """A run directory's ``config.toml``, its fields checked as they are read (:class:`RunConfigFileError`)."""
    path = Path(run_dir) / run.CONFIG_TOML
    return Fields(cfgmod.read_toml(path), path, RunConfigFileError)


def run_dataset_path(run_dir: str | os.PathLike[str]) -> Path:
    """The dataset a run was trained on: as its ``config.toml`` records it, or, where that relative path
    does not resolve from here, the absolute path ``run.json`` recorded when the run started."""
    path = Path(read_run_toml(run_dir).text("dataset"))
    if not path.exists():
        recorded = run.run_status(run_dir).info.get("dataset_absolute")
        if isinstance(recorded, str) and Path(recorded).exists():
            return Path(recorded)
    return path


def load_run_config(run_dir: str | os.PathLike[str], action_space: Any) -> RunConfig:
    """The config a run directory was started with (older layouts included)."""
    doc = read_run_toml(run_dir)
    return resolve_config(
        doc.text("algo"),
        doc.text("dataset"),
        action_space=action_space,
        seed=doc.integer("seed"),
        device=doc.text("device"),
        config_file=doc.path,
    )


def build_algorithm(cfg: RunConfig, dataset: TransitionDataset) -> Algorithm:
    """The configured algorithm for ``dataset``, with its observation normaliser fitted on it."""
    algo_cls = registry.algorithm_class(cfg.algo, dataset.action_space)
    normalizer = None
    if getattr(cfg.algo_config, "normalize_obs", False):
        normalizer = ObsNormalizer.fit(dataset.observations)
    return algo_cls(
        cfg.algo_config,
        dataset.observation_space,
        dataset.action_space,
        normalizer=normalizer,
        device=cfg.device,
        seed=cfg.seed,
        runtime=cfg.runtime,
    )


def load_initial_weights(algo: Algorithm, source: str | os.PathLike[str]) -> Path:
    """Copy the networks (normaliser included) of a finished run's newest checkpoint, or of a checkpoint
    folder, into ``algo``; optimisers, RNG and counters stay fresh. Returns the checkpoint used."""
    folder = Path(source)
    if (folder / "checkpoints").is_dir():
        ck = latest_checkpoint(folder / "checkpoints")
        if ck is None:
            raise ConfigError(f"{source}: the run has no complete checkpoint to start from")
        folder = ck
    state, _ = load_checkpoint(folder, algo.device)
    try:
        algo.nets.load_state_dict(state["algo"]["nets"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{folder}: its weights do not fit this '{algo.name}' configuration (same algorithm and "
            f"network sizes needed to start from them): {exc}"
        ) from None
    return folder


@dataclass
class RunResult:
    run_dir: Path
    passes: int
    steps: int
    final_eval: dict[str, Any] | None
    steps_per_second: float


class Trainer:
    """Trains one run in full passes. Construct with a config, call :meth:`run`; or :meth:`resume`."""

    dataset: TransitionDataset
    train_data: TransitionDataset
    dataset_sha: str

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike[str],
        *,
        dataset: TransitionDataset | None = None,
        init_from: str | os.PathLike[str] | None = None,
        dataset_path: str | os.PathLike[str] | None = None,
        shared: Trainer | None = None,
    ):
        """``shared``: a trainer on the same dataset and algorithm whose dataset (and prepared view of it) this
        one reuses instead of loading its own (the members of a pack)."""
        self.cfg = cfg
        self.extra_info: dict[str, Any] = {}  # more fields for run.json (e.g. the pack a member is in)
        self.run_dir = Path(run_dir)
        self.rd = run.RunDirectory(self.run_dir, prefix="pass", digits=6, unit="pass")
        # the run directory and the environment are checked before any work (loading, training)
        run.check_run_dir(self.run_dir, resume=None)
        self.device = run.run_device(cfg.device)
        cfg.runtime.apply()
        # where the dataset is read (cfg.dataset as recorded, or its absolute path from another directory)
        self.dataset_path = Path(dataset_path if dataset_path is not None else cfg.dataset)
        if shared is not None:
            dataset = shared.dataset
            self.dataset_sha = shared.dataset_sha if getattr(shared, "dataset_sha", None) else ""
        self.dataset = (
            dataset if dataset is not None else TransitionDataset.load(self.dataset_path, self.device)
        )
        if cfg.train.eval_every and self.dataset.env_id:
            from offrl.evaluation import env_spaces

            env_spaces(self.dataset.env_id)
        self.target_given = False  # a resume with a new pass target (--epochs, --steps)
        self.algo = build_algorithm(cfg, self.dataset)
        # warm start: before prepare_dataset, which applies the (then loaded) observation normaliser
        self.init_from = None if init_from is None else load_initial_weights(self.algo, init_from)
        # a pack's members share one prepared view: the normaliser is fitted on the same data
        self.train_data = (
            shared.train_data
            if shared is not None and self.init_from is None
            else self.algo.prepare_dataset(self.dataset)
        )
        gamma = getattr(cfg.algo_config, "gamma", None)
        self.diag_rows = (
            diagnostic_rows(
                self.dataset,
                self.train_data,
                float(gamma),
                reward_scale=float(getattr(cfg.algo_config, "reward_scale", 1.0)),
                seed=cfg.seed,
            )
            if cfg.train.diagnostics and gamma is not None
            else None
        )
        batch_size = int(cfg.algo_config.batch_size)
        self.sampler = self.train_data.sampler(batch_size, seed=cfg.seed, drop_last=cfg.train.drop_last)
        self.total_passes = self._total_passes(cfg.train)
        self.step = 0
        self.show_progress = False  # set by run(): whether progress (and the monitor's fit line) is shown
        self._logger: Logger | None = None

    def _total_passes(self, t: TrainConfig) -> int:
        per_pass = self.sampler.batches_per_pass
        if t.epochs is not None:
            if t.epochs <= 0:
                raise ConfigError(f"epochs must be positive, got {t.epochs}")
            return t.epochs
        if t.steps is not None:
            if t.steps <= 0:
                raise ConfigError(f"steps must be positive, got {t.steps}")
            return math.ceil(t.steps / per_pass)
        raise ConfigError("give the length of training: epochs or steps")

    def describe_schedule(self) -> str:
        s, t = self.sampler, self.cfg.train
        msg = (
            f"{len(self.dataset)} transitions, batch {s.batch_size}: {s.batches_per_pass} steps per pass; "
            f"{self.total_passes} passes = {self.total_passes * s.batches_per_pass} gradient steps"
        )
        if t.steps is not None and self.total_passes * s.batches_per_pass != t.steps:
            msg += f" ({t.steps} steps asked for, rounded up to whole passes)"
        if s.leftover:
            msg += f"; drop_last skips {s.leftover} transitions per pass"
        return msg

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, passes_done: int) -> None:
        state = {
            "algo": self.algo.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
        }
        self.rd.save(
            passes_done,
            state,
            {
                "algo": self.cfg.algo,
                "pass": passes_done,
                "step": self.step,
                "dataset_sha256": self.dataset_sha,
            },
            latest={"pass": passes_done, "step": self.step},
            policy=self._with_monitor(self.algo.policy()),
            policy_extra={
                "algo": self.cfg.algo,
                "pass": passes_done,
                "step": self.step,
                "env_id": self.dataset.env_id,
                "ref_min_return": self.dataset.ref_min_return,
                "ref_max_return": self.dataset.ref_max_return,
                "dataset_sha256": self.dataset_sha,
            },
            keep=self.cfg.train.keep_checkpoints,
        )

    def _with_monitor(self, policy: Any) -> Any:
        """The exported policy, carrying the OOD monitor (fitted once per process on the dataset's states
        with its own seeded generators, so the run's random streams and numbers are untouched)."""
        if not self.cfg.train.ood_monitor:
            return policy
        if not hasattr(self, "_monitor"):
            from offrl.audit.ood import fit_monitor

            self._monitor, message = fit_monitor(
                self.dataset.observations, self.dataset.episode_ends, seed=self.cfg.seed
            )
            if self._monitor is not None and self._logger is not None:
                self._logger.log(
                    self.step, {"time/ood_fit_seconds": float(self._monitor.info["fit_seconds"])}
                )
            if self.show_progress:
                tqdm.write(message)
        policy.ood_monitor = self._monitor
        return policy

    def _restore(self, folder: Path) -> int:
        state, meta = load_checkpoint(folder, self.device)
        path = folder / STATE_JSON  # errors name the file and the field (StateFileError)
        s, m = Fields(state, path, StateFileError, "state"), Fields(meta, path, StateFileError, "meta")
        passes, step = m.integer("pass", minimum=0), s.integer("step", minimum=0)
        if m.get("dataset_sha256", (str, type(None)), "a string", None) not in (None, self.dataset_sha):
            raise ConfigError(
                f"{self.cfg.dataset} has changed since this run started (SHA-256 differs from the checkpoint's); "
                "refusing to resume on different data"
            )
        s.use("algo", self.algo.load_state_dict)
        s.use("sampler", self.sampler.load_state_dict)
        s.use("torch_rng", set_torch_rng_state)
        self.step = step
        return passes

    # -- the loop --------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, show_progress: bool | None = None) -> RunResult:
        with self.rd.writing(resume=resume):
            return self._run(resume, show_progress)

    def _run(self, resume: bool, show_progress: bool | None) -> RunResult:
        cfg, rd = self.cfg, self.rd
        start_pass = self._open(resume)
        per_pass = self.sampler.batches_per_pass
        bar = run.progress_bar(self.total_passes * per_pass, self.step, show_progress)
        self.show_progress = not bar.disable
        clock = run.StepClock(self.step)
        acc = run.MetricAccumulator(self.device)
        try:
            for p in range(start_pass, self.total_passes):
                self.algo.train_mode(True)
                for idx in self.sampler.iter_pass():
                    acc.add(self.algo.update(self.train_data.batch(idx)))
                    self.step += 1
                    if self.step % cfg.train.log_every == 0:
                        self._flush(acc.read(self.step, "gradient step"), bar, clock.interval_rate(self.step))
                bar.set_description(f"pass {p + 1}/{self.total_passes}")
                if acc.count:
                    self._flush(acc.read(self.step, "gradient step"), bar, clock.interval_rate(self.step))
                with clock.paused():  # steps/s counts training time only
                    self._end_pass(p + 1)
        except run.TrainingDiverged as exc:
            bar.close()
            raise rd.diverged(exc, passes_done=rd.last_saved) from None
        bar.close()
        return self._finish(clock.overall_rate(self.step))

    def _open(self, resume: bool) -> int:
        """Restore the newest checkpoint (on resume), record the run as running and open its loggers.
        Returns the number of passes already done."""
        cfg, rd = self.cfg, self.rd
        if not getattr(self, "dataset_sha", None):
            self.dataset_sha = file_sha256(self.dataset_path)
        start_pass = self._restore(rd.resume_point(cfg.runtime)) if resume else 0
        if resume and self.target_given and start_pass >= self.total_passes:
            raise ConfigError(
                f"{self.run_dir}: {start_pass} passes are done; a target of {self.total_passes} passes is "
                "not beyond them, so there is nothing to train (the run is left as it was)"
            )
        rd.last_saved = start_pass
        info: dict[str, Any] = {
            "dataset": str(cfg.dataset),
            "dataset_absolute": str(self.dataset_path.resolve()),
            "dataset_sha256": self.dataset_sha,
        }
        if self.init_from is not None:
            info["init_from"] = str(self.init_from)
        info.update(self.extra_info)
        self._logger = rd.begin(
            resume=resume, config_toml=cfg.to_toml(), info=info, totals={"total_passes": self.total_passes}
        )
        self.final_eval: dict[str, Any] | None = None
        return start_pass

    @property
    def logger(self) -> Logger:
        assert self._logger is not None, "the run is not open"
        return self._logger

    def _end_pass(self, passes_done: int) -> None:
        """What happens at a pass boundary: diagnostics, evaluation and checkpoint, as scheduled."""
        cfg = self.cfg
        is_last = passes_done == self.total_passes
        if self.diag_rows is not None and (diag := diagnose(self.algo, self.diag_rows)):
            self.logger.log(self.step, {f"diag/{k}": v for k, v in diag.items()})
        if cfg.train.eval_every and (passes_done % cfg.train.eval_every == 0 or is_last):
            self.final_eval = self._evaluate(passes_done, self.logger)
        if passes_done % cfg.train.checkpoint_every == 0 or is_last:
            self._save(passes_done)

    def _finish(self, steps_per_second: float) -> RunResult:
        self.rd.finish(self.final_eval, passes_done=self.total_passes, steps_done=self.step)
        return RunResult(self.run_dir, self.total_passes, self.step, self.final_eval, steps_per_second)

    def _flush(self, means: dict[str, float], bar: tqdm | None, sps: float) -> None:
        """Log the means read since the last flush and the steps/s since then (and show them on the bar)."""
        out = {f"train/{k}": v for k, v in means.items()}
        out["time/steps_per_second"] = sps
        out["train/pass"] = self.step / self.sampler.batches_per_pass
        self.logger.log(self.step, out)
        if bar is None:
            return
        loss_key = next((k for k in ("loss", "critic_loss") if k in means), None)
        postfix = {"steps/s": f"{sps:.0f}"}
        if loss_key:
            postfix[loss_key] = f"{means[loss_key]:.4g}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(self.step - bar.n)

    def _evaluate(self, passes_done: int, logger: Logger) -> dict[str, Any] | None:
        if not self.dataset.env_id:
            return None
        result = run.evaluate_and_log(
            self.algo,
            self.dataset.env_id,
            self.cfg.train,
            logger,
            self.step,
            extra_metrics={"eval/pass": float(passes_done)},
            ref_min_return=self.dataset.ref_min_return,
            ref_max_return=self.dataset.ref_max_return,
        )
        return {**result.to_dict(), "pass": passes_done, "step": self.step}


def fit(
    algo: str,
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    config_file: str | os.PathLike[str] | None = None,
    show_progress: bool | None = None,
    init_from: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> RunResult:
    """Train ``algo`` on a dataset in full passes; ``settings`` are algorithm, ``train.``-prefixed
    trainer or ``runtime.``-prefixed runtime settings, e.g. ``fit("cql", "data.h5", "runs/cql", epochs=10, cql_alpha=5.0, eval_every=0)``.
    ``dataset`` is a file or a named dataset (``builtin/…``, ``classic/…``, ``minari:ID``), as for ``--dataset``.
    ``init_from`` (a run directory or checkpoint folder) warm-starts the networks from its weights."""
    from offrl.data.format import read_raw
    from offrl.datasets_registry import resolve_dataset
    from offrl.logger import progress_enabled

    shown = progress_enabled() if show_progress is None else show_progress
    dataset = resolve_dataset(dataset, progress=shown)
    action_space = read_raw(dataset).action_space
    overrides = dict(settings)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if steps is not None:
        overrides["train.steps"] = steps
    cfg = resolve_config(
        algo,
        dataset,
        action_space=action_space,
        seed=seed,
        device=device,
        config_file=config_file,
        overrides=overrides,
    )
    return Trainer(cfg, out, init_from=init_from).run(show_progress=show_progress)


def resume(
    run_dir: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    show_progress: bool | None = None,
) -> RunResult:
    """Continue a run from its newest checkpoint up to its configured length, or to a new pass target
    (``epochs`` passes, or ``steps`` gradient steps rounded up to whole passes), which must lie beyond
    the passes done. Everything else is the run's own: its ``config.toml`` and dataset.

    The dataset is read where ``config.toml`` says; a relative path that does not resolve from here is
    read from the absolute path ``run.json`` recorded when the run started."""
    from offrl.data.format import read_raw

    if epochs is not None and steps is not None:
        raise ConfigError("give either epochs or steps, not both")
    run.check_run_dir(run_dir, resume=True)
    read_run_toml(run_dir).text("algo")
    dataset_path = run_dataset_path(run_dir)
    cfg = load_run_config(run_dir, read_raw(dataset_path).action_space)
    if epochs is not None or steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, steps=steps))
    trainer = Trainer(cfg, run_dir, dataset_path=dataset_path)
    trainer.target_given = epochs is not None or steps is not None
    return trainer.run(resume=True, show_progress=show_progress)
