"""The one environment-interaction loop of the online baselines (SAC, DQN, PPO).

The loop owns the environments, the storage (replay or rollout buffer), evaluation, logging,
checkpoints and the run directory; an algorithm only answers three hooks:

    make_storage()                                   -> ReplayBuffer | RolloutBuffer
    act_for_collection(obs, env_steps, total_steps)  -> actions in learning units, extras to store
    learn(storage, env_steps, total_steps)           -> metrics of the updates now due (maybe none)

One iteration steps every sub-environment once, stores the transition, and calls ``learn``: an
off-policy algorithm updates every ``train_freq`` iterations from its replay buffer, an on-policy
one updates when its rollout is full and then empties it. Sub-environments run with gymnasium's
same-step autoreset: the step that ends an episode reports the true final observation in
``infos["final_obs"]`` (stored as ``next_obs``) and the reset observation as the next ``obs``, so
no stored transition crosses an episode boundary; time-limit truncations are stored as timeouts,
which targets bootstrap through. Evaluation and checkpoints happen only where the storage can be
saved (always for a replay buffer, between rollouts for PPO), logging against environment steps.

Run directory (the harness's, offrl.run, as the offline trainer's; see docs/online.md):

    RUN_DIR/config.toml  RUN_DIR/run.json  RUN_DIR/checkpoints/step_NNNNNNNNN/  RUN_DIR/policy/
    RUN_DIR/metrics.jsonl  RUN_DIR/tb/  RUN_DIR/eval.json
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from offrl import run
from offrl.algos import registry
from offrl.algos.base import Algorithm
from offrl.checkpoint import STATE_JSON, Fields, StateFileError, load_checkpoint, set_torch_rng_state
from offrl.config import option, validate
from offrl.errors import CheckpointError, ConfigError
from offrl.logger import Logger
from offrl.online.buffer import ReplayBuffer, RolloutBuffer, Transition
from offrl.online.mixed import MixedReplay
from offrl.run import MetricAccumulator, StepClock
from offrl.runtime import Runtime

Storage = ReplayBuffer | RolloutBuffer | MixedReplay


OnlineDiverged = run.TrainingDiverged  # the one divergence error, under its online name


class OnlineAlgorithm(Algorithm):
    """Base of the online baselines: networks, optimisers, generator, state and policy export come
    from :class:`Algorithm`; the loop calls the hooks below. Every config has ``num_envs``.
    """

    online: ClassVar[bool] = True
    on_policy: ClassVar[bool] = False

    @property
    def num_envs(self) -> int:
        return int(self.config.num_envs)

    @property
    def steps_per_iteration(self) -> int:
        """Environment steps between the points where the storage can be checkpointed."""
        return self.num_envs

    def make_storage(self) -> Storage:
        raise NotImplementedError

    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Exploratory actions for (N, obs_dim) observations, in learning units, plus per-step extras
        (e.g. log-probabilities) that the storage keeps with the transition."""
        raise NotImplementedError

    def learn(self, storage: Storage, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        """Run the updates due after ``env_steps`` environment steps; one metrics dict per update."""
        raise NotImplementedError


# -- algorithms by name ---------------------------------------------------------------------------
def algorithm_names() -> list[str]:
    return registry.names(online=True)


def algorithm_class(name: str, action_space: gym.Space) -> type[OnlineAlgorithm]:
    """The online algorithm ``name`` for an action space (PPO has both variants)."""
    return registry.algorithm_class(name, action_space, online=True)  # type: ignore[return-value]


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineTrainConfig:
    steps: int | None = option(None, "environment steps to train for (summed over sub-environments)", low=1)
    eval_every: int = option(5000, "evaluate every k environment steps (0: only at the end)", low=0)
    eval_episodes: int = option(10, "episodes per evaluation (deterministic actions)", low=1)
    eval_envs: int = option(
        5,
        "parallel environments used by evaluation: the same episodes and seeds at any count, though a "
        "greedy policy at a near-tie may act otherwise, since batch size moves float results in the last bits",
        low=1,
    )
    eval_seed: int = option(10_000, "seed of evaluation episodes (separate from the training seed)", low=0)
    checkpoint_every: int = option(
        50_000, "checkpoint and export the policy every k environment steps (0: only at the end)", low=0
    )
    keep_checkpoints: int = option(
        1, "how many most recent checkpoints to keep (each holds the replay buffer)", low=0
    )
    log_every: int = option(
        1000, "environment steps between metric reads (the loop's only metric syncs)", low=1
    )
    max_episode_steps: int | None = option(
        None, "time limit of training and evaluation episodes; none: the environment's own", low=1
    )
    stop_return: float | None = option(
        None, "stop once an evaluation's mean return reaches this value; none: run all steps"
    )
    snapshots: bool = option(
        False,
        "keep the policy of every evaluation in RUN_DIR/snapshots/step_N/ with that evaluation's "
        "result (the sequence behind medium-replay datasets)",
    )

    def __post_init__(self) -> None:
        validate(self, "train")


ONLINE_RUNTIME = Runtime(threads=1)  # the online default: small networks run fastest on one thread


@dataclass(frozen=True)
class OnlineRunConfig:
    """An online run: algorithm, environment, seed, device, the loop's and the algorithm's settings,
    the runtime."""

    algo: str
    env: str
    seed: int = 0
    device: str = "cpu"
    train: OnlineTrainConfig = OnlineTrainConfig()
    algo_config: Any = None
    runtime: Runtime = ONLINE_RUNTIME

    def to_toml(self) -> str:
        return run.dumps_run_config(self)


def env_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of ``env_id`` (a ConfigError if it cannot be made)."""
    from offrl.errors import OfflineRLError
    from offrl.evaluation import env_spaces as spaces_of

    try:
        return spaces_of(env_id)
    except OfflineRLError as exc:
        raise ConfigError(str(exc)) from None


_TOP_KEYS = ("algo", "env", "seed", "device")


def resolve_online_config(
    algo: str | None,
    env: str | None,
    *,
    seed: int | None = None,
    device: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> OnlineRunConfig:
    """Defaults ← config file ← arguments and ``overrides`` (``--set``), validated.

    Plain override keys are looked up in the runtime, the algorithm's config, then the loop's;
    ``train.k``, ``algo.k`` and ``runtime.k`` address one explicitly (see
    :func:`offrl.run.split_overrides`). Unknown keys are errors that list the valid ones.
    """
    s = run.Settings()
    if config_file is not None:
        s = run.read_config_file(config_file, _TOP_KEYS, algo)
    src = str(config_file) if config_file is not None else "arguments"
    s.top.update(
        {k: v for k, v in (("algo", algo), ("env", env), ("seed", seed), ("device", device)) if v is not None}
    )
    overrides = dict(overrides or {})
    s.top.update({k: overrides[k] for k in ("seed", "device", "env") if k in overrides})
    if "algo" not in s.top or "env" not in s.top:
        raise ConfigError(f"{src}: the algorithm and the environment are required (--algo, --env)")
    _, act_space = env_spaces(str(s.top["env"]))
    algo_cls = algorithm_class(str(s.top["algo"]), act_space)
    s.update(
        run.split_overrides(
            overrides,
            top_keys=("seed", "device", "env"),
            train_cls=OnlineTrainConfig,
            algo_cls=algo_cls.Config,
            who=f"online '{s.top['algo']}'",
        )
    )
    try:
        run_seed = int(s.top.get("seed", 0))
    except ValueError:
        raise ConfigError(f"{src}: seed must be an integer, got {s.top['seed']!r}") from None
    train_cfg, algo_cfg, runtime = run.build_tables(
        s,
        train_cls=OnlineTrainConfig,
        algo_cls=algo_cls.Config,
        runtime=ONLINE_RUNTIME,
        source=src,
        algo=str(s.top["algo"]),
    )
    return OnlineRunConfig(
        algo=str(s.top["algo"]),
        env=str(s.top["env"]),
        seed=run_seed,
        device=str(s.top.get("device", "cpu")),
        train=train_cfg,
        algo_config=algo_cfg,
        runtime=runtime,
    )


def load_online_config(run_dir: str | os.PathLike[str]) -> OnlineRunConfig:
    """The config a run directory was started with (older layouts included)."""
    return resolve_online_config(None, None, config_file=Path(run_dir) / run.CONFIG_TOML)


def reset_seed(seed: int, env_steps: int, index: int) -> int:
    """Reset seed of sub-environment ``index`` when episodes (re)start after ``env_steps`` steps."""
    return int(np.random.SeedSequence(seed, spawn_key=(env_steps, index)).generate_state(1)[0])


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class OnlineResult:
    run_dir: Path
    env_steps: int
    updates: int
    final_eval: dict[str, Any] | None
    steps_per_second: float
    stopped_early: bool


class OnlineTrainer:
    """Trains one online run. Construct with a config and a run directory; call :meth:`run`."""

    def __init__(self, cfg: OnlineRunConfig, run_dir: str | os.PathLike[str], *, algo: Any = None) -> None:
        """``algo``: an algorithm built elsewhere that answers the loop's hooks (fine-tuning's); by default
        the online algorithm ``cfg.algo``, built fresh."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rd = run.RunDirectory(self.run_dir, prefix="step", digits=9, unit="environment step")
        run.check_run_dir(self.run_dir, resume=None)
        self.device = run.run_device(cfg.device)
        self.target_given = False  # a resume with a new step target (--steps)
        if cfg.train.steps is None or cfg.train.steps <= 0:
            raise ConfigError(f"give a positive number of environment steps (--steps), got {cfg.train.steps}")
        cfg.runtime.apply()
        if algo is None:
            obs_space, act_space = env_spaces(cfg.env)
            algo_cls = algorithm_class(cfg.algo, act_space)
            algo = algo_cls(
                cfg.algo_config, obs_space, act_space, device=self.device, seed=cfg.seed, runtime=cfg.runtime
            )
        self.algo = algo
        self.evaluate_first = False  # also evaluate before the first step (fine-tuning's offline score)
        self.eval_refs: dict[str, Any] = {}  # reference returns that normalise evaluation scores
        self.extra_info: dict[str, Any] = {}  # more fields for run.json
        self.storage = self.algo.make_storage()
        unit = self.algo.steps_per_iteration
        self.total_steps = math.ceil(cfg.train.steps / unit) * unit
        self.env_steps = 0
        self.episodes = 0

    def describe_schedule(self) -> str:
        a, t = self.algo, self.cfg.train
        msg = f"{self.cfg.algo} on {self.cfg.env}: {self.total_steps} environment steps in {a.num_envs} sub-env(s)"
        if self.algo.on_policy:
            msg += f", rollouts of {a.steps_per_iteration} steps"
        if self.total_steps != t.steps:
            msg += (
                f" ({t.steps} asked for, rounded up to whole {'rollouts' if a.on_policy else 'vector steps'})"
            )
        return msg

    # -- environments ----------------------------------------------------------------------------------
    def _make_envs(self) -> gym.vector.SyncVectorEnv:
        kwargs: dict[str, Any] = {}
        if self.cfg.train.max_episode_steps is not None:
            kwargs["max_episode_steps"] = self.cfg.train.max_episode_steps
        env_id = self.cfg.env
        return gym.vector.SyncVectorEnv(
            [lambda: gym.make(env_id, **kwargs) for _ in range(self.algo.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )

    def _obs_tensor(self, obs: np.ndarray) -> Tensor:
        return torch.as_tensor(obs, dtype=torch.float32).reshape(obs.shape[0], -1).to(self.device)

    def _to_env(self, actions: Tensor) -> np.ndarray:
        space = self.algo.action_space
        if isinstance(space, gym.spaces.Discrete):
            return actions.cpu().numpy().astype(np.int64) + int(space.start)
        scaler = self.algo.action_scaler
        assert scaler is not None and isinstance(space, gym.spaces.Box)
        out = scaler.from_unit(actions).cpu().numpy().astype(space.dtype)
        return out.reshape(out.shape[0], *space.shape)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {
            "algo": self.algo.state_dict(),
            "storage": self.storage.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "env_steps": self.env_steps,
            "episodes": self.episodes,
        }
        self.rd.save(
            self.env_steps,
            state,
            {"algo": self.cfg.algo, "env_id": self.cfg.env, "env_steps": self.env_steps},
            latest={"env_steps": self.env_steps},
            policy=self.algo.policy(),
            policy_extra=self._policy_extra(),
            keep=self.cfg.train.keep_checkpoints,
        )

    def _policy_extra(self) -> dict[str, Any]:
        return {
            "algo": self.cfg.algo,
            "online": True,
            "env_id": self.cfg.env,
            "env_steps": self.env_steps,
            "max_episode_steps": self.cfg.train.max_episode_steps,
        }

    def _snapshot(self, evaluation: dict[str, Any]) -> None:
        folder = self.run_dir / "snapshots" / f"step_{self.env_steps:09d}"
        self.algo.policy().save(folder, extra={**self._policy_extra(), "evaluation": evaluation})

    def _restore(self, folder: Path) -> None:
        state, meta = load_checkpoint(folder, self.device)
        path = folder / STATE_JSON  # errors name the file and the field (StateFileError)
        s, m = Fields(state, path, StateFileError, "state"), Fields(meta, path, StateFileError, "meta")
        if m.text("algo") != self.cfg.algo:
            raise CheckpointError(f"{folder}: a checkpoint of '{meta.get('algo')}', not '{self.cfg.algo}'")
        env_steps, episodes = s.integer("env_steps", minimum=0), s.integer("episodes", minimum=0)
        s.use("algo", self.algo.load_state_dict)
        s.use("storage", self.storage.load_state_dict)
        s.use("torch_rng", set_torch_rng_state)
        self.env_steps, self.episodes = env_steps, episodes

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, show_progress: bool | None = None) -> OnlineResult:
        with self.rd.writing(resume=resume):
            return self._run(resume, show_progress)

    def _run(self, resume: bool, show_progress: bool | None) -> OnlineResult:
        cfg, rd = self.cfg, self.rd
        if resume:
            self._restore(rd.resume_point(cfg.runtime))
            if self.target_given and self.env_steps >= self.total_steps:
                raise ConfigError(
                    f"{self.run_dir}: {self.env_steps} environment steps are done; a target of "
                    f"{self.total_steps} is not beyond them, so there is nothing to train (the run is left "
                    "as it was)"
                )
        rd.last_saved = self.env_steps
        logger = rd.begin(
            resume=resume,
            config_toml=cfg.to_toml(),
            info={"env_id": cfg.env, "online": True, **self.extra_info},
            totals={"total_env_steps": self.total_steps},
        )
        bar = run.progress_bar(self.total_steps, self.env_steps, show_progress)
        envs = self._make_envs()
        try:
            final_eval, sps, stopped = self._loop(envs, bar, logger)
            extra = self.finishing(logger)
        except run.TrainingDiverged as exc:
            raise rd.diverged(exc) from None
        finally:
            envs.close()
            bar.close()
            rd.close()
        rd.finish(
            final_eval,
            env_steps_done=self.env_steps,
            updates_done=self.algo.num_updates,
            stopped_early=stopped,
            **extra,
        )
        return OnlineResult(self.run_dir, self.env_steps, self.algo.num_updates, final_eval, sps, stopped)

    def finishing(self, logger: Logger) -> dict[str, Any]:
        """After the last step, before the run is closed: more to log, and fields for ``run.json``."""
        return {}

    def _loop(
        self, envs: gym.vector.SyncVectorEnv, bar: tqdm, logger: Logger
    ) -> tuple[dict[str, Any] | None, float, bool]:
        t, algo, storage = self.cfg.train, self.algo, self.storage
        n = algo.num_envs
        # episodes (re)start here with seeds derived from the step, so a resume restarts them afresh
        obs_np, _ = envs.reset(seed=[reset_seed(self.cfg.seed, self.env_steps, i) for i in range(n)])
        obs = self._obs_tensor(obs_np)
        ep_return, ep_length = np.zeros(n), np.zeros(n, dtype=np.int64)
        finished_returns: list[float] = []
        finished_lengths: list[int] = []
        acc = run.MetricAccumulator(self.device)
        clock = run.StepClock(self.env_steps)
        last_eval = last_ckpt = self.env_steps
        final_eval: dict[str, Any] | None = None
        stopped = False
        if self.evaluate_first and self.env_steps == 0:
            with clock.paused():
                final_eval = self._evaluate(logger)
        algo.train_mode(True)
        while self.env_steps < self.total_steps:
            actions, extras = algo.act_for_collection(obs, self.env_steps, self.total_steps)
            next_obs_np, rewards, terminated, truncated, infos = envs.step(self._to_env(actions))
            ended = terminated | truncated
            true_next = next_obs_np
            if ended.any():
                true_next = np.array(next_obs_np)
                for i in np.flatnonzero(ended):
                    true_next[i] = infos["final_obs"][i]
            storage.add(
                Transition(
                    obs=obs,
                    actions=actions,
                    rewards=torch.as_tensor(rewards, dtype=torch.float32, device=self.device),
                    next_obs=self._obs_tensor(true_next),
                    terminals=torch.as_tensor(terminated, dtype=torch.float32, device=self.device),
                    timeouts=torch.as_tensor(
                        truncated & ~terminated, dtype=torch.float32, device=self.device
                    ),
                    extras=extras,
                )
            )
            obs = self._obs_tensor(next_obs_np)
            self.env_steps += n
            ep_return += rewards
            ep_length += 1
            if ended.any():
                for i in np.flatnonzero(ended):
                    finished_returns.append(float(ep_return[i]))
                    finished_lengths.append(int(ep_length[i]))
                ep_return[ended], ep_length[ended] = 0.0, 0
                self.episodes += int(ended.sum())
            for metrics in algo.learn(storage, self.env_steps, self.total_steps):
                acc.add(metrics)
            bar.update(n)

            if self.env_steps - clock.last_step >= t.log_every:
                self._log(acc, finished_returns, finished_lengths, clock, bar, logger)
                finished_returns, finished_lengths = [], []
            if not storage.can_checkpoint:
                continue
            is_last = self.env_steps >= self.total_steps
            with clock.paused():  # steps/s counts collection and learning only
                if (t.eval_every and self.env_steps // t.eval_every > last_eval // t.eval_every) or is_last:
                    final_eval = self._evaluate(logger)
                    last_eval = self.env_steps
                    if t.snapshots:
                        self._snapshot(final_eval)
                    stopped = t.stop_return is not None and final_eval["mean"] >= t.stop_return
                if (
                    stopped
                    or is_last
                    or (
                        t.checkpoint_every
                        and self.env_steps // t.checkpoint_every > last_ckpt // t.checkpoint_every
                    )
                ):
                    self._save()
                    last_ckpt = self.env_steps
            if stopped:
                break
        if acc.count or finished_returns:
            self._log(acc, finished_returns, finished_lengths, clock, bar, logger)
        return final_eval, clock.overall_rate(self.env_steps), stopped

    def _log(
        self,
        acc: MetricAccumulator,
        returns: Sequence[float],
        lengths: Sequence[int],
        clock: StepClock,
        bar: tqdm,
        logger: Logger,
    ) -> None:
        means = acc.read(self.algo.num_updates, "update")
        sps = clock.interval_rate(self.env_steps)
        out = {f"train/{k}": v for k, v in means.items()}
        out["train/updates"] = float(self.algo.num_updates)
        out["train/episodes"] = float(self.episodes)
        if returns:
            out["train/episode_return"] = float(np.mean(returns))
            out["train/episode_length"] = float(np.mean(lengths))
        out["time/steps_per_second"] = sps
        logger.log(self.env_steps, out)
        postfix = {"steps/s": f"{sps:.0f}"}
        if returns:
            postfix["return"] = f"{np.mean(returns):.1f}"
        bar.set_postfix(postfix, refresh=False)

    def _evaluate(self, logger: Logger) -> dict[str, Any]:
        t = self.cfg.train
        result = run.evaluate_and_log(
            self.algo,
            self.cfg.env,
            t,
            logger,
            self.env_steps,
            max_episode_steps=t.max_episode_steps,
            **self.eval_refs,
        )
        return {**result.to_dict(), "env_steps": self.env_steps}


# -- entry points ---------------------------------------------------------------------------------------
def train_online(
    algo: str | None,
    env: str | None,
    out: str | os.PathLike[str],
    *,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    show_progress: bool | None = None,
    **settings: Any,
) -> OnlineResult:
    """Train ``algo`` online in ``env``; ``settings`` are algorithm, ``train.``-prefixed loop or
    ``runtime.``-prefixed settings, e.g. ``train_online("sac", "Pendulum-v1", "runs/sac", steps=20_000,
    learning_starts=1000, **{"train.eval_every": 2000})``."""
    overrides = dict(settings)
    if steps is not None:
        overrides["train.steps"] = steps
    cfg = resolve_online_config(
        algo, env, seed=seed, device=device, config_file=config_file, overrides=overrides
    )
    return OnlineTrainer(cfg, out).run(show_progress=show_progress)


def resume_online(
    run_dir: str | os.PathLike[str], *, steps: int | None = None, show_progress: bool | None = None
) -> OnlineResult:
    """Continue a run from its newest checkpoint up to its configured length (or ``steps`` in total)."""
    run.check_run_dir(run_dir, resume=True)
    cfg = load_online_config(run_dir)
    if steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    trainer = OnlineTrainer(cfg, run_dir)
    trainer.target_given = steps is not None
    return trainer.run(resume=True, show_progress=show_progress)
