"""Roll a policy out in gymnasium vector environments and summarise the returns.

Episode ``j`` is always reset with a seed derived from ``(seed, j)`` and its return is reported at
index ``j``, so for a deterministic policy the result does not depend on ``num_envs``. Each sub-env
runs a fixed quota of episodes (episodes ``i, i + n, i + 2n, …``): stopping at the first ``episodes``
finishes would over-represent short episodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.errors import OfflineRLError
from offrl.types import Policy


@dataclass(frozen=True)
class EvalResult:
    """Per-episode returns and lengths (in episode order) and their summary; ``std`` is the population std."""

    returns: list[float]
    lengths: list[int]
    seed: int
    env_id: str
    mean: float
    std: float
    min: float
    max: float
    normalized_mean: float | None  # 100·(R - ref_min)/(ref_max - ref_min), averaged over episodes
    normalized_std: float | None
    # with a policy carrying an OOD monitor (offrl.audit.ood): the share of visited states scoring above
    # its threshold, and the mean score of each episode's visited states (None otherwise)
    ood_fraction: float | None = None
    ood_episode_means: list[float] | None = None
    ood_threshold: float | None = None
    # Discrete actions: the share of all steps taken with the policy's most used action. Near 1, the
    # policy repeats one action whatever it sees (a greedy policy on a Q nearly flat in the action).
    action_top_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("ood_fraction", "ood_episode_means", "ood_threshold", "action_top_share"):
            if out[key] is None:
                del out[key]
        return out


def normalized_score(returns: Any, ref_min: float, ref_max: float) -> np.ndarray:
    """D4RL-style score: 0 at the reference minimum (e.g. random), 100 at the reference maximum (expert)."""
    if not np.isfinite(ref_min) or not np.isfinite(ref_max) or ref_max == ref_min:
        raise OfflineRLError(f"reference returns must be finite and differ, got min={ref_min} max={ref_max}")
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of episode ``episode``: independent streams per episode from one root seed."""
    return int(np.random.SeedSequence(seed, spawn_key=(episode,)).generate_state(1)[0])


def env_spaces(env_id: str, **make_kwargs: Any) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of ``env_id``, made once and closed: the check that an
    environment exists and can be built (its module imports, its dependencies are installed) before any
    work that needs it. An unknown id or a failing import is one :class:`OfflineRLError`."""
    try:
        probe = gym.make(env_id, **make_kwargs)
    except gym.error.Error as exc:
        raise OfflineRLError(f"environment {env_id!r}: {exc}") from None
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as exc:
        raise OfflineRLError(f"environment {env_id!r} cannot be made: {type(exc).__name__}: {exc}") from None
    try:
        return probe.observation_space, probe.action_space
    finally:
        probe.close()


def check_policy_spaces(
    policy: Any, observation_space: gym.Space, action_space: gym.Space, *, policy_name: str, other: str
) -> None:
    """Refuse a policy whose observation shape or action space differs from ``other``'s (e.g. "the
    dataset", "environment 'CartPole-v1'"); policies that declare no spaces pass. The one check where a
    policy meets an environment or a dataset (evaluate, record, ope)."""
    obs_space = getattr(policy, "observation_space", None)
    act_space = getattr(policy, "action_space", None)
    if isinstance(obs_space, gym.Space) and obs_space.shape != observation_space.shape:
        raise OfflineRLError(
            f"policy {policy_name}: observations of shape {obs_space.shape}, {other}'s have {observation_space.shape}"
        )
    if isinstance(act_space, gym.Space) and (
        type(act_space) is not type(action_space)
        or act_space.shape != action_space.shape
        or (
            isinstance(act_space, gym.spaces.Discrete)
            and isinstance(action_space, gym.spaces.Discrete)
            and act_space.n != action_space.n
        )
    ):
        raise OfflineRLError(f"policy {policy_name}: action space {act_space}, {other}'s is {action_space}")


def _neutral_action(space: gym.Space) -> Any:
    """An always-valid action for sub-envs that have finished their quota (their steps are discarded)."""
    if isinstance(space, gym.spaces.Discrete):
        return np.int64(space.start)
    if isinstance(space, gym.spaces.Box):
        return np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
    raise OfflineRLError(f"evaluation supports Discrete and Box action spaces, got {space}")


def evaluate(
    policy: Policy,
    env_id: str,
    episodes: int = 10,
    seed: int = 0,
    *,
    num_envs: int = 1,
    deterministic: bool = True,
    ref_min_return: float | None = None,
    ref_max_return: float | None = None,
    env_kwargs: dict[str, Any] | None = None,
    max_episode_steps: int | None = None,
) -> EvalResult:
    """Run ``episodes`` full episodes of ``policy`` in ``env_id`` and return their undiscounted returns.

    The policy sees a batch of the observations of the sub-envs that still have episodes to run.
    Discrete actions are cast to int64; continuous ones are passed through unchanged.
    """
    if episodes < 1 or num_envs < 1:
        raise OfflineRLError(f"evaluate: episodes and num_envs must be ≥ 1, got {episodes} and {num_envs}")
    if (ref_min_return is None) != (ref_max_return is None):
        raise OfflineRLError("evaluate: give both ref_min_return and ref_max_return, or neither")
    n = min(num_envs, episodes)
    make_kwargs = dict(env_kwargs or {})
    if max_episode_steps is not None:
        make_kwargs["max_episode_steps"] = max_episode_steps

    # Manual resets (autoreset disabled) so every episode starts from its own seed; gymnasium's default
    # next-step autoreset would also hand the policy one extra, meaningless step per episode.
    obs_space, act_space = env_spaces(env_id, **make_kwargs)
    check_policy_spaces(
        policy, obs_space, act_space, policy_name=repr(policy), other=f"the environment {env_id}"
    )
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id, **make_kwargs) for _ in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.DISABLED,
    )
    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    current = np.arange(n)  # episode index each sub-env is running; ≥ episodes once its quota is done
    discrete = isinstance(envs.single_action_space, gym.spaces.Discrete)
    neutral = _neutral_action(envs.single_action_space)
    monitor = getattr(policy, "ood_monitor", None)  # scores visited states; act never computes it
    ood_sum = np.zeros(episodes, dtype=np.float64)
    ood_above = np.zeros(episodes, dtype=np.int64)
    space = envs.single_action_space
    # counts of each discrete action taken (offset by the space's start), for action_top_share
    action_counts = np.zeros(int(space.n) if isinstance(space, gym.spaces.Discrete) else 0, dtype=np.int64)
    action_start = int(space.start) if isinstance(space, gym.spaces.Discrete) else 0
    try:
        obs, _ = envs.reset(seed=[episode_seed(seed, int(j)) for j in current])
        while True:
            active = current < episodes
            if not active.any():
                break
            chosen = np.asarray(policy.act(obs[active], deterministic=deterministic))
            if monitor is not None:
                scores = monitor.score(obs[active])
                np.add.at(ood_sum, current[active], scores)
                np.add.at(ood_above, current[active], scores > monitor.threshold)
            if chosen.shape[:1] != (int(active.sum()),):
                raise OfflineRLError(
                    f"evaluate: the policy returned actions of shape {chosen.shape} for {int(active.sum())} observations"
                )
            if discrete:
                chosen = chosen.astype(np.int64).reshape(-1)
                np.add.at(action_counts, chosen - action_start, 1)
            actions = np.empty((n, *chosen.shape[1:]), dtype=chosen.dtype)
            actions[:] = neutral
            actions[active] = chosen
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            returns[current[active]] += rewards[active]
            lengths[current[active]] += 1
            done = terminated | truncated
            if done.any():
                # Finished sub-envs move on to their next episode; idle ones are reset too, because the
                # vector API steps every sub-env and refuses to step one that has ended.
                current = np.where(done & active, current + n, current)
                seeds = [episode_seed(seed, int(j)) if j < episodes else None for j in current]
                obs, _ = envs.reset(seed=seeds, options={"reset_mask": done})
    finally:
        envs.close()

    normalized_mean = normalized_std = None
    if ref_min_return is not None and ref_max_return is not None:
        scores = normalized_score(returns, ref_min_return, ref_max_return)
        normalized_mean, normalized_std = float(scores.mean()), float(scores.std())
    return EvalResult(
        returns=[float(r) for r in returns],
        lengths=[int(x) for x in lengths],
        seed=seed,
        env_id=env_id,
        mean=float(returns.mean()),
        std=float(returns.std()),
        min=float(returns.min()),
        max=float(returns.max()),
        normalized_mean=normalized_mean,
        normalized_std=normalized_std,
        ood_fraction=None if monitor is None else float(ood_above.sum() / lengths.sum()),
        ood_episode_means=None if monitor is None else [float(v) for v in ood_sum / lengths],
        ood_threshold=None if monitor is None else float(monitor.threshold),
        action_top_share=float(action_counts.max() / action_counts.sum()) if action_counts.sum() else None,
    )
