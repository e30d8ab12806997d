"""The offline trainer: full passes over the dataset, with evaluation, checkpoints and the exported
policy changing only at pass boundaries. The only loop over gradient steps in offrl's offline side.

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
import datetime as _dt
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from offrl import config as cfgmod
from offrl import nets
from offrl.algos import registry
from offrl.algos.base import OfflineAlgorithm
from offrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_latest
from offrl.config import option
from offrl.data.dataset import TransitionDataset
from offrl.errors import ConfigError, OfflineRLError
from offrl.logger import JsonlLogger, Logger, MultiLogger, TensorboardLogger, progress_enabled
from offrl.preprocess import ObsNormalizer
from offrl.utils import atomic_write_json, atomic_write_text, file_sha256, package_versions


class TrainingDiverged(OfflineRLError):
    """A loss became NaN or infinite; the run was rolled back to its last checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = option(
        None, "number of full passes over the dataset (each transition once per pass)"
    )
    steps: int | None = option(None, "gradient steps instead of --epochs; rounded up to whole passes")
    drop_last: bool = option(False, "skip each pass's final partial batch (the skipped count is reported)")
    eval_every: int = option(1, "evaluate in the environment every k passes (0: never, a purely offline run)")
    eval_episodes: int = option(10, "episodes per evaluation")
    eval_envs: int = option(5, "parallel environments used by evaluation (results do not depend on it)")
    eval_seed: int = option(10_000, "seed of evaluation episodes (separate from the training seed)")
    checkpoint_every: int = option(
        1, "checkpoint and export the policy every k passes (and always at the end)"
    )
    keep_checkpoints: int = option(2, "how many most recent checkpoints to keep (0: keep all)")
    log_every: int = option(
        1000, "gradient steps between metric reads, the only host syncs (also at pass ends)"
    )
    threads: int = option(
        2, "torch intra-op threads; results differ between thread counts, so it is recorded"
    )
    flush_denormal: bool = option(
        True,
        nets.FLUSH_DENORMAL_HELP,
    )
    cuda_graphs: bool = option(
        True,
        "on CUDA, replay each update step (compiled or not) as a CUDA graph after 3 eager steps (bc and "
        "cql, checked bitwise against eager: at small batches a step is launch-bound); other "
        "algorithms run eagerly; no effect on CPU",
    )


@dataclass(frozen=True)
class RunConfig:
    """A run: algorithm, dataset, seed, device, the trainer's and the algorithm's settings."""

    algo: str
    dataset: str
    seed: int = 0
    device: str = "cpu"
    train: TrainConfig = TrainConfig()
    algo_config: Any = None  # the algorithm's Config instance

    def to_toml(self) -> str:
        return cfgmod.dumps_toml(
            {
                "algo": self.algo,
                "dataset": self.dataset,
                "seed": self.seed,
                "device": self.device,
                "train": cfgmod.to_dict(self.train),
                "algo_config": cfgmod.to_dict(self.algo_config),
            }
        )


def _split_overrides(overrides: dict[str, Any], algo_cls: type[OfflineAlgorithm]) -> tuple[dict, dict, dict]:
    """Sort ``key=value`` overrides into top-level, train.* and algorithm keys.

    Plain keys are looked up in the algorithm's config, then the trainer's; ``train.k`` and
    ``algo.k`` address one explicitly. Unknown keys are an error listing every valid one.
    """
    top_keys = {"seed", "device", "dataset"}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    algo_keys = {f.name for f in dataclasses.fields(algo_cls.Config)}
    top: dict[str, Any] = {}
    train: dict[str, Any] = {}
    algo: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith("train."):
            train[key[6:]] = value
        elif key.startswith(("algo.", "algo_config.")):
            algo[key.split(".", 1)[1]] = value
        elif key in top_keys:
            top[key] = value
        elif key in algo_keys:
            algo[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            valid = sorted(top_keys) + sorted(f"train.{k}" for k in train_keys) + sorted(algo_keys)
            raise ConfigError(
                f"unknown setting {key!r} for algorithm '{algo_cls.name}'; valid: {', '.join(valid)}"
            )
    return top, train, algo


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
    """Defaults ← config file ← overrides (``--set``, ``--epochs`` …), validated into a RunConfig."""
    algo_cls = registry.algorithm_class(algo, action_space)
    train_d: dict[str, Any] = {}
    algo_d: dict[str, Any] = {}
    top: dict[str, Any] = {"seed": seed, "device": device, "dataset": str(dataset)}
    if config_file is not None:
        doc = cfgmod.read_toml(config_file)
        known = {"algo", "dataset", "seed", "device", "train", "algo_config"}
        unknown = set(doc) - known
        if unknown:
            raise ConfigError(
                f"{config_file}: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(known)}"
            )
        if doc.get("algo", algo) != algo:
            raise ConfigError(f"{config_file}: configures algorithm {doc['algo']!r}, but --algo is {algo!r}")
        train_d.update(doc.get("train", {}))
        algo_d.update(doc.get("algo_config", {}))
        top.update({k: doc[k] for k in ("seed", "device") if k in doc})
    o_top, o_train, o_algo = _split_overrides(dict(overrides or {}), algo_cls)
    top.update(o_top)
    train_d.update(o_train)
    algo_d.update(o_algo)
    train_cfg = cfgmod.from_dict(TrainConfig, train_d, "train settings")
    algo_cfg: Any = cfgmod.from_dict(algo_cls.Config, algo_d, f"'{algo}' settings")
    if train_cfg.epochs is not None and train_cfg.steps is not None:
        raise ConfigError("give either epochs or steps, not both")
    return RunConfig(
        algo=algo,
        dataset=str(top["dataset"]),
        seed=int(top["seed"]),
        device=str(top["device"]),
        train=train_cfg,
        algo_config=algo_cfg,
    )


def load_run_config(run_dir: str | os.PathLike[str], action_space: Any) -> RunConfig:
    doc = cfgmod.read_toml(Path(run_dir) / "config.toml")
    algo_cls = registry.algorithm_class(doc["algo"], action_space)
    return RunConfig(
        algo=doc["algo"],
        dataset=doc["dataset"],
        seed=int(doc["seed"]),
        device=doc["device"],
        train=cfgmod.from_dict(TrainConfig, doc.get("train", {}), f"{run_dir}/config.toml [train]"),
        algo_config=cfgmod.from_dict(
            algo_cls.Config, doc.get("algo_config", {}), f"{run_dir}/config.toml [algo_config]"
        ),
    )


def build_algorithm(cfg: RunConfig, dataset: TransitionDataset) -> OfflineAlgorithm:
    """The configured algorithm for ``dataset``, with its observation normaliser fitted on it."""
    algo_cls = registry.algorithm_class(cfg.algo, dataset.action_space)
    normalizer = None
    if getattr(cfg.algo_config, "normalize_obs", False):
        normalizer = ObsNormalizer.fit(dataset.observations)
    algo = algo_cls(
        cfg.algo_config,
        dataset.observation_space,
        dataset.action_space,
        normalizer=normalizer,
        device=cfg.device,
        seed=cfg.seed,
    )
    return algo


def load_initial_weights(algo: OfflineAlgorithm, source: str | os.PathLike[str]) -> Path:
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
    except (KeyError, RuntimeError) as exc:
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

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike[str],
        *,
        dataset: TransitionDataset | None = None,
        init_from: str | os.PathLike[str] | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
        nets.set_cpu_numerics(cfg.train.threads, cfg.train.flush_denormal)
        self.dataset = dataset if dataset is not None else TransitionDataset.load(cfg.dataset, self.device)
        self.algo = build_algorithm(cfg, self.dataset)
        self.algo.cuda_graphs = cfg.train.cuda_graphs
        # warm start: before prepare_dataset, which applies the (then loaded) observation normaliser
        self.init_from = None if init_from is None else load_initial_weights(self.algo, init_from)
        self.train_data = self.algo.prepare_dataset(self.dataset)
        batch_size = int(cfg.algo_config.batch_size)
        self.sampler = self.train_data.sampler(batch_size, seed=cfg.seed, drop_last=cfg.train.drop_last)
        self.total_passes = self._total_passes(cfg.train)
        self.step = 0
        self.logger: Logger | None = None

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
    def _state(self) -> dict[str, Any]:
        return {
            "algo": self.algo.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
        }

    def _save(self, passes_done: int) -> None:
        ckdir = self.run_dir / "checkpoints"
        name = f"pass_{passes_done:06d}"
        meta = {
            "algo": self.cfg.algo,
            "pass": passes_done,
            "step": self.step,
            "dataset_sha256": self.dataset_sha,
        }
        save_checkpoint(ckdir / name, self._state(), meta)
        write_latest(ckdir, name, {"pass": passes_done, "step": self.step})
        policy = self.algo.policy()
        extra = {
            "algo": self.cfg.algo,
            "pass": passes_done,
            "step": self.step,
            "env_id": self.dataset.env_id,
            "ref_min_return": self.dataset.ref_min_return,
            "ref_max_return": self.dataset.ref_max_return,
            "dataset_sha256": self.dataset_sha,
        }
        policy.save(self.run_dir / "policy", extra=extra)
        keep = self.cfg.train.keep_checkpoints
        if keep > 0:
            old = sorted(p for p in ckdir.glob("pass_*") if p.is_dir())[:-keep]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)

    def _restore(self, folder: Path) -> int:
        state, meta = load_checkpoint(folder, self.device)
        if meta.get("dataset_sha256") not in (None, self.dataset_sha):
            raise ConfigError(
                f"{self.cfg.dataset} has changed since this run started (SHA-256 differs from the checkpoint's); "
                "refusing to resume on different data"
            )
        self.algo.load_state_dict(state["algo"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        return int(meta["pass"])

    # -- the loop --------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, show_progress: bool | None = None) -> RunResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dataset_sha = file_sha256(cfg.dataset)
        run_json = self.run_dir / "run.json"
        start_pass = 0
        if resume:
            ck = latest_checkpoint(self.run_dir / "checkpoints")
            if ck is None:
                raise ConfigError(f"{self.run_dir}: no checkpoint to resume from")
            start_pass = self._restore(ck)
            info = json.loads(run_json.read_text()) if run_json.exists() else {}
        else:
            if (self.run_dir / "checkpoints").exists():
                raise ConfigError(f"{self.run_dir} already holds a run; use --resume or another --out")
            info = {
                "dataset": str(cfg.dataset),
                "dataset_sha256": self.dataset_sha,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "package_versions": package_versions(),
            }
            if self.init_from is not None:
                info["init_from"] = str(self.init_from)
        atomic_write_text(self.run_dir / "config.toml", cfg.to_toml())
        info.update({"status": "running", "total_passes": self.total_passes})
        atomic_write_json(run_json, info)

        self.logger = MultiLogger(
            [JsonlLogger(self.run_dir / "metrics.jsonl"), TensorboardLogger(self.run_dir / "tb")]
        )
        show = progress_enabled() if show_progress is None else show_progress
        per_pass = self.sampler.batches_per_pass
        total_steps = self.total_passes * per_pass
        bar = tqdm(total=total_steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        final_eval: dict[str, Any] | None = None
        t_start = time.perf_counter()
        steps_at_start = self.step
        acc = _MetricAccumulator(self.device)
        last_log_t, last_log_step = time.perf_counter(), self.step
        last_saved_pass = start_pass
        pause_total = 0.0
        try:
            for p in range(start_pass, self.total_passes):
                self.algo.train_mode(True)
                for idx in self.sampler.iter_pass():
                    metrics = self.algo.update(self.train_data.batch(idx))
                    acc.add(metrics)
                    self.step += 1
                    if self.step % cfg.train.log_every == 0:
                        last_log_t, last_log_step = self._flush(acc, bar, last_log_t, last_log_step)
                bar.set_description(f"pass {p + 1}/{self.total_passes}")
                if acc.count:
                    last_log_t, last_log_step = self._flush(acc, bar, last_log_t, last_log_step)
                passes_done = p + 1
                is_last = passes_done == self.total_passes
                t_pause = time.perf_counter()
                if cfg.train.eval_every and (passes_done % cfg.train.eval_every == 0 or is_last):
                    final_eval = self._evaluate(passes_done)
                if passes_done % cfg.train.checkpoint_every == 0 or is_last:
                    self._save(passes_done)
                    last_saved_pass = passes_done
                paused = time.perf_counter() - t_pause
                last_log_t += paused  # steps/s counts training time only
                pause_total += paused
        except TrainingDiverged as exc:
            bar.close()
            self.logger.close()
            info.update({"status": "diverged", "error": str(exc), "passes_done": last_saved_pass})
            atomic_write_json(run_json, info)
            raise TrainingDiverged(
                f"{exc}; the run is left at its last checkpoint (pass {last_saved_pass}) in {self.run_dir}"
            ) from None
        bar.close()
        elapsed = time.perf_counter() - t_start - pause_total
        sps = (self.step - steps_at_start) / elapsed if elapsed > 0 else 0.0
        if final_eval is not None:
            atomic_write_json(self.run_dir / "eval.json", final_eval)
        self.logger.close()
        info.update({"status": "finished", "passes_done": self.total_passes, "steps_done": self.step})
        atomic_write_json(run_json, info)
        return RunResult(self.run_dir, self.total_passes, self.step, final_eval, sps)

    def _flush(self, acc: _MetricAccumulator, bar: tqdm, last_t: float, last_step: int) -> tuple[float, int]:
        """Read the accumulated metrics (one host sync), check them, log them."""
        means, bad = acc.read()
        if bad is not None:
            term, rel = bad
            first = self.step - acc.last_count + rel + 1
            raise TrainingDiverged(f"non-finite '{term}' at gradient step {first}")
        now = time.perf_counter()
        sps = (self.step - last_step) / max(now - last_t, 1e-9)
        out = {f"train/{k}": v for k, v in means.items()}
        out["time/steps_per_second"] = sps
        out["train/pass"] = self.step / self.sampler.batches_per_pass
        assert self.logger is not None
        self.logger.log(self.step, out)
        loss_key = next((k for k in ("loss", "critic_loss") if k in means), None)
        postfix = {"steps/s": f"{sps:.0f}"}
        if loss_key:
            postfix[loss_key] = f"{means[loss_key]:.4g}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(self.step - bar.n)
        return now, self.step

    def _evaluate(self, passes_done: int) -> dict[str, Any] | None:
        env_id = self.dataset.env_id
        if not env_id:
            return None
        from offrl.evaluation import evaluate

        self.algo.train_mode(False)
        t = self.cfg.train
        result = evaluate(
            self.algo.policy(),
            env_id,
            episodes=t.eval_episodes,
            seed=t.eval_seed,
            num_envs=t.eval_envs,
            ref_min_return=self.dataset.ref_min_return,
            ref_max_return=self.dataset.ref_max_return,
        )
        self.algo.train_mode(True)
        metrics = {
            "eval/return_mean": result.mean,
            "eval/return_std": result.std,
            "eval/pass": float(passes_done),
        }
        if result.normalized_mean is not None:
            metrics["eval/normalized_score"] = result.normalized_mean
        assert self.logger is not None
        self.logger.log(self.step, metrics)
        return {**result.to_dict(), "pass": passes_done, "step": self.step}


class _MetricAccumulator:
    """Sums metrics on the device and remembers, per term, the first step in the interval that was
    not finite — without reading anything back until :meth:`read`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[str] | None = None
        self.sums: Tensor | None = None
        self.first_bad: Tensor | None = None
        self.count = 0
        self.last_count = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        if self.keys is None:
            self.keys = list(metrics)
        vals = torch.stack([metrics[k].detach().float().reshape(()) for k in self.keys])
        bad = ~torch.isfinite(vals)
        if self.sums is None or self.first_bad is None:
            self.sums = torch.where(bad, torch.zeros_like(vals), vals)
            self.first_bad = torch.where(bad, 0, -1)
        else:
            self.sums += torch.where(bad, torch.zeros_like(vals), vals)
            self.first_bad = torch.where(bad & (self.first_bad < 0), self.count, self.first_bad)
        self.count += 1

    def read(self) -> tuple[dict[str, float], tuple[str, int] | None]:
        assert self.keys is not None and self.sums is not None and self.first_bad is not None
        sums = (self.sums / self.count).tolist()
        first_bad = self.first_bad.tolist()
        self.last_count = self.count
        self.sums, self.first_bad, self.count = None, None, 0
        bad = [(k, fb) for k, fb in zip(self.keys, first_bad) if fb >= 0]
        worst = min(bad, key=lambda kv: kv[1]) if bad else None
        return dict(zip(self.keys, sums)), worst


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
    """Train ``algo`` on a dataset file in full passes; ``settings`` are algorithm or ``train.``-prefixed
    trainer settings, e.g. ``fit("cql", "data.h5", "runs/cql", epochs=10, cql_alpha=5.0, eval_every=0)``.
    ``init_from`` (a run directory or checkpoint folder) warm-starts the networks from its weights."""
    from offrl.data.format import read_raw

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
    run_dir: str | os.PathLike[str], *, epochs: int | None = None, show_progress: bool | None = None
) -> RunResult:
    """Continue a run from its newest checkpoint up to its configured length (or ``epochs`` passes)."""
    from offrl.data.format import read_raw

    doc = cfgmod.read_toml(Path(run_dir) / "config.toml")
    cfg = load_run_config(run_dir, read_raw(doc["dataset"]).action_space)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, steps=None))
    return Trainer(cfg, run_dir).run(resume=True, show_progress=show_progress)
