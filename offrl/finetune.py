"""Pretrain offline, fine-tune online: an offline run's algorithm, continued by the online loop.

``offrl finetune RUN_DIR --env ENV --steps N --out DIR`` loads the newest checkpoint of an offline run
(critics, actor, normaliser and optimiser state), and runs its algorithm's online form (its
``online_form``: the same losses for CQL, Cal-QL, IQL and AWAC; TD3+BC decayed to TD3; discrete CQL as
double DQN) in :class:`offrl.online.loop.OnlineTrainer`, the loop of the online baselines, from a replay
that mixes the offline dataset with the new transitions (:class:`offrl.online.mixed.MixedReplay`). The
run folder is an online run's (docs/online.md), plus ``online.h5``: the fine-tuning's own transitions in
format v1, rewritten at every checkpoint and at the end. Evaluations start at step 0 (the offline
policy) and are normalised with the offline dataset's reference returns; ``finetune/…`` measures (the
dip, regret on CORL's scale, the area under the curve) are logged at the end. See docs/finetune.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from offrl import run
from offrl.algos import registry
from offrl.algos.base import Algorithm
from offrl.checkpoint import latest_checkpoint, load_checkpoint
from offrl.config import option, validate
from offrl.data.dataset import TransitionDataset
from offrl.errors import ConfigError
from offrl.logger import Logger, read_jsonl
from offrl.online.loop import OnlineResult, OnlineRunConfig, OnlineTrainConfig, OnlineTrainer
from offrl.online.mixed import MixedReplay
from offrl.runtime import Runtime

DIP_WINDOW = 0.1  # the dip is the lowest evaluation in this first fraction of fine-tuning
ONLINE_DATA = "online.h5"


@dataclass(frozen=True)
class FineTuneConfig:
    offline_data: Literal["keep", "drop"] = option(
        "keep", "keep the offline dataset in the replay (sampled at offline_ratio) or drop it"
    )
    offline_ratio: float | None = option(
        None,
        "fraction of each batch drawn from the offline dataset (offline_data=keep); none: the algorithm's "
        "own (0.5 for CQL and Cal-QL, as Cal-QL's mixing ratio; for the others uniform over the offline and "
        "online rows together, as when online rows join the dataset's buffer in CORL and d3rlpy)",
        low=0.0,
        high=1.0,
    )
    warm_start_steps: int = option(
        0,
        "environment steps the pretrained policy collects before the first update (WSRL: about 5000, "
        "with offline_data=drop)",
        low=0,
    )
    updates_per_step: int = option(1, "gradient updates per environment step (update-to-data ratio)", low=1)
    buffer_size: int = option(1_000_000, "capacity of the online replay", low=1)
    batch_size: int | None = option(None, "transitions per update; none: the offline run's", low=1)
    exploration: float | None = option(
        None, "TD3's Gaussian noise std, or the discrete forms' ε; none: the algorithm's default", low=0.0
    )

    def __post_init__(self) -> None:
        validate(self, "finetune")


class FineTuning:
    """The pretrained algorithm as the online loop drives it: exploring with its own policy, learning
    from the mixed replay, with the config changes its online form makes as fine-tuning progresses."""

    on_policy = False
    num_envs = 1
    steps_per_iteration = 1

    def __init__(self, algo: Algorithm, cfg: FineTuneConfig, offline: TransitionDataset | None) -> None:
        if algo.online_form is None:
            raise ConfigError(
                f"'{algo.name}' has no online form; algorithms that fine-tune: {', '.join(online_forms())}"
            )
        self.algo, self.cfg, self.offline = algo, cfg, offline
        self.batch_size = cfg.batch_size or int(algo.config.batch_size)
        self.offline_config = algo.config
        self._applied: dict[str, Any] = {}

    # what the loop reads off its algorithm
    @property
    def name(self) -> str:
        return self.algo.name

    @property
    def num_updates(self) -> int:
        return self.algo.num_updates

    @property
    def action_space(self) -> Any:
        return self.algo.action_space

    @property
    def action_scaler(self) -> Any:
        return self.algo.action_scaler

    def train_mode(self, mode: bool = True) -> None:
        self.algo.train_mode(mode)

    def policy(self) -> Any:
        return self.algo.policy()

    def make_storage(self) -> MixedReplay:
        a = self.algo
        offline = self.offline if self.cfg.offline_data == "keep" else None
        floor = float(self.offline.rewards.min()) if self.offline is not None and len(self.offline) else 0.0
        return MixedReplay(
            offline,
            self.cfg.buffer_size,
            a.obs_dim,
            a.act_dim,
            discrete=a.discrete,
            normalizer=a.normalizer,
            offline_ratio=self.cfg.offline_ratio
            if self.cfg.offline_ratio is not None
            else a.online_offline_ratio,
            returns_gamma=float(a.config.gamma) if a.needs_returns else None,
            reward_floor=floor,
            device=a.device,
        )

    @torch.no_grad()
    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.algo.explore(self.algo.normalizer(obs), self.cfg.exploration), {}

    def learn(self, storage: Any, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        warm = self.cfg.warm_start_steps
        if env_steps <= warm or (storage.offline is None and len(storage) == 0):
            return []
        self._apply_online_settings((env_steps - warm) / max(1, total_steps - warm))
        return [
            self.algo.update(storage.sample(self.batch_size, self.algo.generator))
            for _ in range(self.cfg.updates_per_step)
        ]

    def _apply_online_settings(self, progress: float) -> None:
        changes = self.algo.online_settings(min(1.0, progress))
        if changes and changes != self._applied:
            self.algo.config = dataclasses.replace(self.offline_config, **changes)
            self._applied = changes

    def state_dict(self) -> dict[str, Any]:
        return self.algo.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.algo.load_state_dict(state)


def online_forms() -> list[str]:
    """Names of the offline algorithms that can be fine-tuned online."""
    return sorted({name for name, _, cls in registry.variants(online=False) if cls.online_form is not None})


# -- measures ------------------------------------------------------------------------------------
def finetune_measures(evaluations: list[tuple[int, float]], total_steps: int) -> dict[str, float | None]:
    """From (environment step, normalised score) evaluations, the first at step 0 (the offline policy):
    ``score_start``, ``score_end``, ``auc`` (the curve's mean height over the steps, trapezoids),
    ``dip`` (the lowest score in the first 10% of fine-tuning minus the start; None without an evaluation
    there) and ``regret`` (CORL's: 1 − the mean score of the evaluations after step 0 / 100)."""
    if not evaluations or evaluations[0][0] != 0:
        raise ValueError("fine-tuning measures need the evaluation at step 0")
    steps = np.array([s for s, _ in evaluations], dtype=np.float64)
    scores = np.array([v for _, v in evaluations], dtype=np.float64)
    start, end = float(scores[0]), float(scores[-1])
    span = steps[-1] - steps[0]
    auc = float(np.trapezoid(scores, steps) / span) if span > 0 else start
    early = scores[(steps > 0) & (steps <= DIP_WINDOW * total_steps)]
    later = scores[steps > 0]
    return {
        "score_start": start,
        "score_end": end,
        "auc": auc,
        "dip": float(early.min() - start) if early.size else None,
        "regret": float(1.0 - later.mean() / 100.0) if later.size else None,
    }


def read_measures(run_dir: str | os.PathLike[str], total_steps: int) -> dict[str, float | None]:
    """:func:`finetune_measures` of a fine-tuning run's logged evaluations."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    evals: dict[int, float] = {}
    for r in rows:
        if "eval/normalized_score" in r:
            evals[int(r["step"])] = float(r["eval/normalized_score"])
    return finetune_measures(sorted(evals.items()), total_steps)


# -- entry points ----------------------------------------------------------------------------------
def _load_pretrained(source: Path, device: str, seed: int) -> tuple[Algorithm, TransitionDataset]:
    """The offline run's algorithm at its newest checkpoint, and its dataset."""
    from offrl.data.format import read_raw
    from offrl.train import build_algorithm, load_run_config, run_dataset_path

    if not (source / run.CONFIG_TOML).exists():
        if (source / "policy.json").exists() or (
            (source / "policy").is_dir() and not (source / "checkpoints").exists()
        ):
            raise ConfigError(
                f"{source}: a policy folder holds no critics or optimiser state to continue; pass the "
                "offline run's folder (the one with checkpoints/)"
            )
        raise ConfigError(f"{source}: not an offline run folder (no {run.CONFIG_TOML})")
    ck = latest_checkpoint(source / "checkpoints")
    if ck is None:
        raise ConfigError(f"{source}: the run has no complete checkpoint to continue from")
    dataset_path = run_dataset_path(source)
    cfg = load_run_config(source, read_raw(dataset_path).action_space)
    cls = registry.algorithm_class(cfg.algo, read_raw(dataset_path).action_space)
    if cls.online_form is None:
        raise ConfigError(
            f"{source}: '{cfg.algo}' has no online form; algorithms that fine-tune: {', '.join(online_forms())}"
        )
    dataset = TransitionDataset.load(dataset_path, device)
    cfg = dataclasses.replace(cfg, device=device)
    algo = build_algorithm(cfg, dataset)
    state, _ = load_checkpoint(ck, algo.device)
    algo.load_state_dict(state["algo"])
    algo.generator.manual_seed(seed)  # fine-tuning seeds draw their own noise
    return algo, dataset


_TOP_KEYS = ("seed", "device", "env")


def resolve_finetune_config(
    source_algo: str,
    env: str,
    *,
    seed: int,
    device: str,
    overrides: dict[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> OnlineRunConfig:
    """The online loop's settings (``train.…``) and :class:`FineTuneConfig` from overrides (``--set``)."""
    s = run.Settings(top={"seed": seed, "device": device, "env": env})
    if config_file is not None:
        s.update(run.read_config_file(config_file, ("algo", *_TOP_KEYS), None))
    s.update(
        run.split_overrides(
            dict(overrides or {}),
            top_keys=_TOP_KEYS,
            train_cls=OnlineTrainConfig,
            algo_cls=FineTuneConfig,
            who="finetune",
        )
    )
    train_cfg, ft_cfg, runtime = run.build_tables(
        s,
        train_cls=OnlineTrainConfig,
        algo_cls=FineTuneConfig,
        runtime=Runtime(threads=1),
        source=str(config_file or "settings"),
        algo="finetune",
    )
    return OnlineRunConfig(
        algo=source_algo,
        env=str(s.top["env"]),
        seed=int(s.top["seed"]),
        device=str(s.top["device"]),
        train=train_cfg,
        algo_config=ft_cfg,
        runtime=runtime,
    )


class FineTuneTrainer(OnlineTrainer):
    """The online loop around a :class:`FineTuning`: an evaluation at step 0, scores normalised with the
    offline dataset's references, ``online.h5`` at checkpoints, the measures at the end."""

    def __init__(
        self,
        cfg: OnlineRunConfig,
        run_dir: str | os.PathLike[str],
        tuning: FineTuning,
        dataset: TransitionDataset,
    ) -> None:
        self.tuning, self.dataset = tuning, dataset
        super().__init__(cfg, run_dir, algo=tuning)
        self.evaluate_first = True
        self.eval_refs = {"ref_min_return": dataset.ref_min_return, "ref_max_return": dataset.ref_max_return}

    def _save(self) -> None:
        super()._save()
        self._write_online_data()

    def _restore(self, folder: Path) -> None:
        super()._restore(folder)
        assert isinstance(self.storage, MixedReplay)
        self.storage.cut_episode()  # the loop restarts its episodes on resume

    def _write_online_data(self) -> None:
        from offrl.data.arrays import from_arrays

        assert isinstance(self.storage, MixedReplay)
        rows = self.storage.online_rows()
        if not len(rows["rewards"]):
            return
        actions = rows["actions"]
        scaler = self.tuning.action_scaler
        if scaler is not None:
            actions = scaler.from_unit(actions)
        from_arrays(
            self.run_dir / ONLINE_DATA,
            observations=rows["obs"].cpu().numpy(),
            next_observations=rows["next_obs"].cpu().numpy(),
            actions=actions.cpu().numpy(),
            rewards=rows["rewards"].cpu().numpy(),
            terminals=rows["terminals"].cpu().numpy().astype(bool),
            timeouts=rows["timeouts"].cpu().numpy().astype(bool),
            action_space=self.tuning.action_space,
            observation_space=self.dataset.observation_space,
            env_id=self.cfg.env,
            metadata={"source": "offrl finetune", "algo": self.cfg.algo},
            quiet=True,
        )

    def finishing(self, logger: Logger) -> dict[str, Any]:
        measures = read_measures(self.run_dir, self.total_steps)
        logger.log(self.env_steps, {f"finetune/{k}": v for k, v in measures.items() if v is not None})
        return {"finetune": measures}


def finetune(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    env: str | None = None,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
    offline_data: str | None = None,
    offline_ratio: float | None = None,
    show_progress: bool | None = None,
    overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> OnlineResult:
    """Fine-tune the offline run ``source`` online for ``steps`` environment steps into ``out``;
    ``settings`` (and ``overrides``, by their ``--set`` keys) are :class:`FineTuneConfig` fields or
    ``train.``-prefixed online-loop settings."""
    source = Path(source)
    algo, dataset = _load_pretrained(source, device, seed)
    env_id = env or dataset.env_id
    if not env_id:
        raise ConfigError(f"{source}: the dataset names no environment; give --env")
    overrides = {**(overrides or {}), **settings}
    overrides["train.steps"] = steps
    if offline_data is not None:
        overrides["offline_data"] = offline_data
    if offline_ratio is not None:
        overrides["offline_ratio"] = offline_ratio
    cfg = resolve_finetune_config(algo.name, env_id, seed=seed, device=device, overrides=overrides)
    _check_env(algo, env_id)
    tuning = FineTuning(algo, cfg.algo_config, algo.prepare_dataset(dataset))
    trainer = FineTuneTrainer(cfg, out, tuning, dataset)
    trainer.extra_info = {"finetune_source": str(source.resolve()), "online_form": algo.online_form}
    return trainer.run(show_progress=show_progress)


def resume_finetune(
    run_dir: str | os.PathLike[str], *, steps: int | None = None, show_progress: bool | None = None
) -> OnlineResult:
    """Continue a fine-tuning run from its newest checkpoint (as ``offrl online --resume``: not bitwise)."""
    run.check_run_dir(run_dir, resume=True)
    info = run.run_status(run_dir).info
    source = info.get("finetune_source")
    if not isinstance(source, str):
        raise ConfigError(f"{run_dir}: not a fine-tuning run (run.json names no finetune_source)")
    toml = Path(run_dir) / run.CONFIG_TOML
    doc = run.read_config_file(toml, ("algo", *_TOP_KEYS), None)
    seed, device = int(doc.top.get("seed", 0)), str(doc.top.get("device", "cpu"))
    algo, dataset = _load_pretrained(Path(source), device, seed)
    cfg = resolve_finetune_config(algo.name, str(doc.top["env"]), seed=seed, device=device, config_file=toml)
    if steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    tuning = FineTuning(algo, cfg.algo_config, algo.prepare_dataset(dataset))
    trainer = FineTuneTrainer(cfg, run_dir, tuning, dataset)
    trainer.extra_info = {"finetune_source": source, "online_form": algo.online_form}
    trainer.target_given = steps is not None
    return trainer.run(resume=True, show_progress=show_progress)


def _check_env(algo: Algorithm, env_id: str) -> None:
    from offrl.evaluation import check_policy_spaces, env_spaces

    obs_space, act_space = env_spaces(env_id)
    check_policy_spaces(
        algo.policy(), obs_space, act_space, policy_name=algo.name, other=f"the environment {env_id}"
    )
