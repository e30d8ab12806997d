"""Record a policy's episodes in a gymnasium environment into a format-v1 file.

Sub-environments run in a gymnasium ``SyncVectorEnv`` with same-step autoreset: the step that
ends an episode returns the final observation in ``infos["final_obs"]`` and the reset
observation as the next one. The default next-step autoreset would instead spend one step per
episode on a reset whose (obs, action, reward, next_obs) row is fake; a recorder that stored it
would cross episode boundaries once per episode.

Every sub-environment has its own quota of episodes (or steps), and its episodes are written
after those of lower-indexed sub-environments, so a file depends on the seed and the policy
only, never on which sub-environment happened to finish first. For a deterministic policy a
recording with ``num_envs=k`` equals the concatenation of ``k`` single-environment recordings
with seeds ``seed + i`` and quotas ``split_quota(total, k)[i]``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from offrl.data.writer import DatasetWriter
from offrl.errors import ConfigError, OfflineRLError
from offrl.types import Policy

EnvLike = str | gym.Env | Callable[[], gym.Env]


def split_quota(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as possible; lower indices get the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def progress_disabled(progress: bool) -> bool:
    """True when ``progress`` is off or the environment variable OFFRL_NO_PROGRESS is set (not 0)."""
    return not progress or os.environ.get("OFFRL_NO_PROGRESS", "") not in ("", "0")


@dataclass
class _Episode:
    """Rows of one episode in progress: per-step views into the batched arrays, stacked at the end."""

    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    next_obs: list[np.ndarray] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)


@dataclass
class _Finished:
    """A finished episode, compacted into arrays, waiting for its turn to be written."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: bool
    log_probs: np.ndarray | None


def _finish(ep: _Episode, terminated: bool, with_log_probs: bool) -> _Finished:
    return _Finished(
        obs=np.stack(ep.obs),
        actions=np.stack(ep.actions),
        rewards=np.asarray(ep.rewards, dtype=np.float64),
        next_obs=np.stack(ep.next_obs),
        terminated=terminated,
        log_probs=np.asarray(ep.log_probs, dtype=np.float32) if with_log_probs else None,
    )


def _make_vector_env(env: EnvLike, num_envs: int) -> tuple[gym.vector.SyncVectorEnv, bool]:
    """A same-step-autoreset SyncVectorEnv and whether the recorder owns (and so closes) its envs."""
    autoreset = getattr(gym.vector, "AutoresetMode", None)
    if autoreset is None:
        raise OfflineRLError(f"recording needs gymnasium>=1.1 (same-step autoreset); found {gym.__version__}")
    mode = autoreset.SAME_STEP
    if isinstance(env, str):
        venv = gym.make_vec(env, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode})
        if not isinstance(venv, gym.vector.SyncVectorEnv):  # make_vec wraps only when asked to
            raise OfflineRLError(
                f"gym.make_vec({env!r}) returned {type(venv).__name__}, expected SyncVectorEnv"
            )
        return venv, True
    if isinstance(env, gym.vector.VectorEnv):
        raise ConfigError("record: pass an env id, a gym.Env or a function making one, not a vector env")
    if isinstance(env, gym.Env):
        if num_envs != 1:
            raise ConfigError(
                f"record: num_envs={num_envs} needs an env id or a function making envs; one gym.Env instance "
                "cannot be several sub-environments"
            )
        instance = env
        return gym.vector.SyncVectorEnv([lambda: instance], autoreset_mode=mode), False
    if callable(env):
        return gym.vector.SyncVectorEnv([env] * num_envs, autoreset_mode=mode), True
    raise ConfigError(f"record: env must be an env id, a gym.Env or a function making one, got {env!r}")


def _spec_json(sub_env: gym.Env) -> str | None:
    spec = sub_env.spec
    if spec is None:
        return None
    try:
        return spec.to_json()
    except (ValueError, TypeError, gym.error.Error):  # env kwargs JSON cannot hold (callables, objects)
        return None


def record(
    env: EnvLike,
    policy: Policy,
    *,
    episodes: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str],
    num_envs: int = 1,
    compression: str | None = None,
    obs_dtype: str | None = None,
    progress: bool = True,
    deterministic: bool | None = None,
    ref_min_return: float | None = None,
    ref_max_return: float | None = None,
    metadata: dict[str, Any] | None = None,
    policy_description: Any = None,
) -> pathlib.Path:
    """Record ``episodes`` whole episodes, or exactly ``steps`` transitions, of ``policy`` into ``out``.

    ``env`` is a gymnasium id, a ``gym.Env`` (``num_envs=1`` only; it is not closed) or a function
    making one. Sub-environment ``i`` is reset with seed ``seed + i`` once, then without a seed.
    With ``steps``, each sub-environment's last episode is cut with a timeout when its share of
    the steps is reached. ``deterministic`` defaults to ``not policy.is_stochastic``; a policy
    acting stochastically that has ``log_prob`` also gets its actions' log-probabilities stored.

    ``num_envs`` is reduced to the quota when the quota is smaller. Finished episodes of a
    sub-environment are held in memory until those of all lower-indexed ones are written.
    ``metadata`` is stored with the recorder's own keys (``policy``, ``seed``, ``num_envs``,
    ``episodes``, ``steps``, ``deterministic``, ``env_id``) taking precedence. The file is written
    atomically: on any error or interruption ``out`` is left as it was.
    """
    if (episodes is None) == (steps is None):
        raise ConfigError("record: give exactly one of episodes or steps")
    total = episodes if episodes is not None else steps
    assert total is not None
    if total < 1:
        raise ConfigError(
            f"record: {'episodes' if episodes is not None else 'steps'} must be >= 1, got {total}"
        )
    if num_envs < 1:
        raise ConfigError(f"record: num_envs must be >= 1, got {num_envs}")
    num_envs = min(num_envs, total)
    quotas = split_quota(total, num_envs)
    if deterministic is None:
        deterministic = not bool(getattr(policy, "is_stochastic", False))
    log_prob_fn = getattr(policy, "log_prob", None)
    with_log_probs = not deterministic and callable(log_prob_fn)
    description = policy_description if policy_description is not None else repr(policy)

    venv, owns_envs = _make_vector_env(env, num_envs)
    try:
        sub_env = venv.envs[0]
        env_id = env if isinstance(env, str) else (sub_env.spec.id if sub_env.spec is not None else None)
        discrete = isinstance(venv.single_action_space, gym.spaces.Discrete)
        meta = {
            **(metadata or {}),
            "policy": description,
            "seed": seed,
            "num_envs": num_envs,
            "episodes": episodes,
            "steps": steps,
            "deterministic": deterministic,
            "env_id": env_id,
        }
        writer = DatasetWriter(
            out,
            venv.single_observation_space,
            venv.single_action_space,
            env_id=env_id,
            env_spec=_spec_json(sub_env),
            metadata=meta,
            ref_min_return=ref_min_return,
            ref_max_return=ref_max_return,
            compression=compression,
            obs_dtype=obs_dtype,
        )
        bar = tqdm(
            total=steps, unit="step", desc=f"record {env_id or 'env'}", disable=progress_disabled(progress)
        )
        with writer, bar:
            _run(
                venv,
                policy,
                writer,
                bar,
                quotas,
                cut_at_quota=steps is not None,
                seed=seed,
                deterministic=deterministic,
                log_prob_fn=log_prob_fn if with_log_probs else None,
                discrete=discrete,
                description=description,
            )
    finally:
        if owns_envs:
            venv.close()
    return pathlib.Path(out)


def _run(
    venv: gym.vector.SyncVectorEnv,
    policy: Policy,
    writer: DatasetWriter,
    bar: tqdm,
    quotas: list[int],
    *,
    cut_at_quota: bool,
    seed: int,
    deterministic: bool,
    log_prob_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    discrete: bool,
    description: Any,
) -> None:
    """The stepping loop: buffer rows per sub-env, write finished episodes in sub-env order."""
    k = len(quotas)
    episodes = [_Episode() for _ in range(k)]
    pending: list[list[_Finished]] = [[] for _ in range(k)]
    rows = [0] * k  # transitions recorded per sub-env
    finished = [0] * k  # episodes finished per sub-env
    active = [True] * k  # quota not yet met; inactive sub-envs keep stepping, unrecorded
    next_to_write = 0
    obs, _ = venv.reset(seed=seed)  # sub-env i gets seed + i
    while next_to_write < k:
        actions = np.asarray(policy.act(obs, deterministic=deterministic))
        if actions.shape[:1] != (k,):
            raise OfflineRLError(
                f"policy {description!r} returned actions of shape {actions.shape} for {k} observations"
            )
        if discrete:
            actions = actions.astype(np.int64, copy=False)
        log_probs = np.asarray(log_prob_fn(obs, actions)).reshape(k) if log_prob_fn is not None else None
        next_obs, rewards, terminations, truncations, infos = venv.step(actions)
        ended = terminations | truncations
        final_obs = infos["final_obs"] if ended.any() else None
        recorded = 0
        for i in range(k):
            if not active[i]:
                continue
            ep = episodes[i]
            ep.obs.append(obs[i])
            ep.actions.append(actions[i])
            ep.rewards.append(float(rewards[i]))
            # the sub-env hands over its own array; copy it so a later step cannot alter it
            ep.next_obs.append(np.array(final_obs[i]) if final_obs is not None and ended[i] else next_obs[i])
            if log_probs is not None:
                ep.log_probs.append(float(log_probs[i]))
            rows[i] += 1
            recorded += 1
            cut = cut_at_quota and rows[i] == quotas[i]
            if ended[i] or cut:
                # a step both terminated and truncated counts as terminated: the terminal wins
                pending[i].append(_finish(ep, bool(terminations[i]), log_probs is not None))
                episodes[i] = _Episode()
                finished[i] += 1
                active[i] = not (cut or (not cut_at_quota and finished[i] == quotas[i]))
                bar.set_postfix_str(f"{sum(finished)} episodes", refresh=False)
        bar.update(recorded)
        while next_to_write < k:
            for f in pending[next_to_write]:
                writer.add_episode(
                    f.obs,
                    f.actions,
                    f.rewards,
                    f.next_obs,
                    f.terminated,
                    action_log_probs=f.log_probs,
                    policy=description,
                )
            pending[next_to_write].clear()
            if active[next_to_write]:
                break
            next_to_write += 1
        obs = next_obs
