"""Dataset format v1: one HDF5 file of flat transition arrays (see docs/dataset-format.md).

Reading and checking are split so that ``offrl validate`` and loading for training run exactly
the same checks on exactly the same arrays, with the same messages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from offrl.errors import DatasetError, OfflineRLError
from offrl.spaces import space_from_json

FORMAT_VERSION = 1
"""The version this offrl writes. Readers accept files whose ``format_version`` is a positive
integer no greater than their own; a new version is only introduced by a change that older
readers would misread. Optional keys may be added within a version."""

OBSERVATIONS = "observations"
ACTIONS = "actions"
REWARDS = "rewards"
NEXT_OBSERVATIONS = "next_observations"
TERMINALS = "terminals"
TIMEOUTS = "timeouts"
EPISODE_ENDS = "episode_ends"
ACTION_LOG_PROBS = "action_log_probs"
EPISODE_POLICY_IDS = "episode_policy_ids"
INFOS = "infos"

REQUIRED_KEYS = (OBSERVATIONS, ACTIONS, REWARDS, NEXT_OBSERVATIONS, TERMINALS, TIMEOUTS, EPISODE_ENDS)
PER_TRANSITION_KEYS = (OBSERVATIONS, ACTIONS, REWARDS, NEXT_OBSERVATIONS, TERMINALS, TIMEOUTS)

# Root attributes
ATTR_VERSION = "format_version"
ATTR_OBS_SPACE = "observation_space"
ATTR_ACT_SPACE = "action_space"
ATTR_ENV_ID = "env_id"
ATTR_ENV_SPEC = "env_spec"
ATTR_METADATA = "metadata"
ATTR_POLICIES = "policies"
ATTR_REF_MIN = "ref_min_return"
ATTR_REF_MAX = "ref_max_return"

MAX_ROWS_LISTED = 3  # offending rows named per problem; the count is always given


@dataclass
class RawDataset:
    """The arrays and attributes of a format-v1 file, as numpy, before any checking."""

    path: str
    observations: np.ndarray  # (N, *obs_shape)
    actions: np.ndarray  # (N, *act_shape) | (N,) integer for Discrete
    rewards: np.ndarray  # (N,)
    next_observations: np.ndarray  # (N, *obs_shape)
    terminals: np.ndarray  # (N,) bool
    timeouts: np.ndarray  # (N,) bool
    episode_ends: np.ndarray  # (E,) int64, exclusive end row of each episode; last == N
    observation_space: gym.Space
    action_space: gym.Space
    format_version: int = FORMAT_VERSION
    action_log_probs: np.ndarray | None = None  # (N,)
    episode_policy_ids: np.ndarray | None = None  # (E,) index into ``policies``
    policies: list[Any] = field(default_factory=list)
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    env_id: str | None = None
    env_spec: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    ref_min_return: float | None = None
    ref_max_return: float | None = None

    @property
    def num_transitions(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_raw(path: str | os.PathLike[str]) -> RawDataset:
    """Read a file's arrays and attributes; raises ``DatasetError`` for anything that prevents it.

    Only problems that stop reading are raised here (unreadable file, missing keys, missing or
    unparseable spaces, unknown version); everything else is found by :func:`check`.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DatasetError(path, "no such file")
    if os.path.isdir(path):
        raise DatasetError(path, "is a directory, not an HDF5 file")
    if os.path.getsize(path) == 0:
        raise DatasetError(path, "file is empty (0 bytes)")
    if not h5py.is_hdf5(path):
        raise DatasetError(path, "not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _read_open(path, f)
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DatasetError(path, f"unreadable or truncated HDF5 file ({exc})") from exc


def _read_open(path: str, f: h5py.File) -> RawDataset:
    problems: list[str] = []
    version = f.attrs.get(ATTR_VERSION)
    if version is None:
        raise DatasetError(path, f"root attribute '{ATTR_VERSION}' is missing: not an offrl dataset")
    # strictly an integer scalar: 1.0, "1" or True are refused, not coerced
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise DatasetError(path, f"'{ATTR_VERSION}' is {version!r}, expected an integer")
    version_int = int(version)
    if version_int < 1 or version_int > FORMAT_VERSION:
        raise DatasetError(
            path,
            f"unknown '{ATTR_VERSION}' {version_int}: this offrl reads versions 1..{FORMAT_VERSION}",
        )

    spaces: dict[str, gym.Space] = {}
    for attr in (ATTR_OBS_SPACE, ATTR_ACT_SPACE):
        if attr not in f.attrs:
            problems.append(f"root attribute '{attr}' is missing")
            continue
        try:
            spaces[attr] = space_from_json(_attr_str(f.attrs[attr]))
        except (OfflineRLError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"root attribute '{attr}' is not a valid space description ({exc})")
    for key in REQUIRED_KEYS:
        if key not in f:
            problems.append(f"required key '{key}' is missing")
        elif not isinstance(f[key], h5py.Dataset):
            problems.append(f"'{key}' is a group, expected an array")
    for key in (ACTION_LOG_PROBS, EPISODE_POLICY_IDS):
        if key in f and not isinstance(f[key], h5py.Dataset):
            problems.append(f"'{key}' is a group, expected an array")
    if INFOS in f and not isinstance(f[INFOS], h5py.Group):
        problems.append(f"'{INFOS}' is an array, expected a group of per-transition arrays")
    if problems:
        raise DatasetError(path, problems)

    def arr(key: str) -> np.ndarray:
        return np.asarray(f[key][()])

    infos: dict[str, np.ndarray] = {}
    if INFOS in f:
        for name, item in f[INFOS].items():
            if isinstance(item, h5py.Dataset):
                infos[name] = np.asarray(item[()])

    def opt_float(attr: str) -> float | None:
        if attr not in f.attrs:
            return None
        try:
            return float(f.attrs[attr])
        except (TypeError, ValueError):
            raise DatasetError(
                path, f"root attribute '{attr}' is {f.attrs[attr]!r}, expected a number"
            ) from None

    metadata: dict[str, Any] = {}
    if ATTR_METADATA in f.attrs:
        try:
            metadata = json.loads(_attr_str(f.attrs[ATTR_METADATA]))
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"root attribute '{ATTR_METADATA}' is not valid JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise DatasetError(path, f"root attribute '{ATTR_METADATA}' is not a JSON object")
    policies: list[Any] = []
    if ATTR_POLICIES in f.attrs:
        try:
            policies = json.loads(_attr_str(f.attrs[ATTR_POLICIES]))
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"root attribute '{ATTR_POLICIES}' is not a JSON list ({exc})") from None
        if not isinstance(policies, list):  # list() would silently split a string or a dict's keys
            raise DatasetError(path, f"root attribute '{ATTR_POLICIES}' is not a JSON list")

    return RawDataset(
        path=path,
        observations=arr(OBSERVATIONS),
        actions=arr(ACTIONS),
        rewards=arr(REWARDS),
        next_observations=arr(NEXT_OBSERVATIONS),
        terminals=arr(TERMINALS),
        timeouts=arr(TIMEOUTS),
        episode_ends=arr(EPISODE_ENDS),
        observation_space=spaces[ATTR_OBS_SPACE],
        action_space=spaces[ATTR_ACT_SPACE],
        format_version=version_int,
        action_log_probs=arr(ACTION_LOG_PROBS) if ACTION_LOG_PROBS in f else None,
        episode_policy_ids=arr(EPISODE_POLICY_IDS) if EPISODE_POLICY_IDS in f else None,
        policies=policies,
        infos=infos,
        env_id=_attr_str(f.attrs[ATTR_ENV_ID]) if ATTR_ENV_ID in f.attrs else None,
        env_spec=_attr_str(f.attrs[ATTR_ENV_SPEC]) if ATTR_ENV_SPEC in f.attrs else None,
        metadata=metadata,
        ref_min_return=opt_float(ATTR_REF_MIN),
        ref_max_return=opt_float(ATTR_REF_MAX),
    )


def _rows(mask: np.ndarray) -> str:
    """'3 rows, first at rows 4, 9, 12' for a boolean mask over rows."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:MAX_ROWS_LISTED])
    more = ", …" if idx.size > MAX_ROWS_LISTED else ""
    noun = "row" if idx.size == 1 else "rows"
    return f"{idx.size} {noun} (at {noun} {shown}{more})"


def _check_flag_array(name: str, a: np.ndarray, n: int, problems: list[str]) -> bool:
    if a.shape != (n,):
        problems.append(f"'{name}' has shape {a.shape}, expected ({n},)")
        return False
    integer_01 = np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()
    if a.dtype != np.bool_ and not integer_01:
        problems.append(f"'{name}' has dtype {a.dtype} with values other than 0/1, expected bool")
        return False
    return True


def _check_finite(name: str, a: np.ndarray, problems: list[str]) -> None:
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1) if a.ndim > 1 else ~np.isfinite(a)
        if bad.any():
            problems.append(f"'{name}' has NaN or inf in {_rows(bad)}")


def check(raw: RawDataset) -> list[str]:
    """All format-v1 problems of a dataset read by :func:`read_raw`, one line each; [] if valid."""
    problems: list[str] = []
    n = raw.rewards.shape[0] if raw.rewards.ndim >= 1 else 0
    obs_space, act_space = raw.observation_space, raw.action_space

    lengths = {k: getattr(raw, k).shape[0] if getattr(raw, k).ndim else 0 for k in PER_TRANSITION_KEYS}
    if len(set(lengths.values())) > 1:
        ref_key = OBSERVATIONS
        for k, v in lengths.items():
            if v != lengths[ref_key]:
                problems.append(f"'{k}' has {v} rows but '{ref_key}' has {lengths[ref_key]}")
        return problems  # row-wise checks are meaningless past a length mismatch
    n = lengths[OBSERVATIONS]
    if n == 0:
        problems.append("the dataset has no transitions")
        return problems

    if raw.rewards.ndim != 1:
        problems.append(f"'{REWARDS}' has shape {raw.rewards.shape}, expected ({n},)")
    elif not np.issubdtype(raw.rewards.dtype, np.floating):
        problems.append(f"'{REWARDS}' has dtype {raw.rewards.dtype}, expected a float type")

    # observations vs the declared space
    if not isinstance(obs_space, gym.spaces.Box):
        problems.append(f"observation space {obs_space} is not a Box (format v1 stores Box observations)")
    else:
        for key in (OBSERVATIONS, NEXT_OBSERVATIONS):
            a = getattr(raw, key)
            if a.shape[1:] != obs_space.shape:
                problems.append(
                    f"'{key}' rows have shape {a.shape[1:]}, observation space says {obs_space.shape}"
                )
            if a.dtype != obs_space.dtype:
                problems.append(f"'{key}' has dtype {a.dtype}, observation space says {obs_space.dtype}")

    # actions vs the declared space
    acts = raw.actions
    if isinstance(act_space, gym.spaces.Discrete):
        if acts.shape != (n,):
            problems.append(
                f"'{ACTIONS}' has shape {acts.shape}, expected ({n},) for a Discrete action space"
            )
        elif not np.issubdtype(acts.dtype, np.integer):
            problems.append(
                f"'{ACTIONS}' has dtype {acts.dtype}, expected an integer type for a Discrete space"
            )
        else:
            first, last_act = int(act_space.start), int(act_space.start + act_space.n - 1)
            bad = (acts < first) | (acts > last_act)
            if bad.any():
                problems.append(f"'{ACTIONS}' outside the discrete range {first}..{last_act} in {_rows(bad)}")
    elif isinstance(act_space, gym.spaces.Box):
        if acts.shape[1:] != act_space.shape:
            problems.append(
                f"'{ACTIONS}' rows have shape {acts.shape[1:]}, action space says {act_space.shape}"
            )
        elif acts.dtype != act_space.dtype:
            problems.append(f"'{ACTIONS}' has dtype {acts.dtype}, action space says {act_space.dtype}")
        else:
            _check_finite(ACTIONS, acts, problems)
            flat = acts.reshape(n, -1)
            low = np.asarray(act_space.low, dtype=np.float64).reshape(-1)
            high = np.asarray(act_space.high, dtype=np.float64).reshape(-1)
            with np.errstate(invalid="ignore"):
                out_of_box = np.asarray(((flat < low) | (flat > high)).any(axis=1))
            if out_of_box.any():
                problems.append(f"'{ACTIONS}' outside the action-space bounds in {_rows(out_of_box)}")
    else:
        problems.append(f"action space {act_space} is neither Box nor Discrete")

    for key in (OBSERVATIONS, NEXT_OBSERVATIONS, REWARDS):
        _check_finite(key, getattr(raw, key), problems)
    if raw.action_log_probs is not None:
        lp = raw.action_log_probs
        if lp.shape != (n,):
            problems.append(f"'{ACTION_LOG_PROBS}' has shape {lp.shape}, expected ({n},)")
        else:
            _check_finite(ACTION_LOG_PROBS, lp, problems)
    for name, info in raw.infos.items():
        if info.ndim == 0 or info.shape[0] != n:
            problems.append(f"'{INFOS}/{name}' has {info.shape[0] if info.ndim else 0} rows, expected {n}")

    # flags and episodes
    flags_ok = _check_flag_array(TERMINALS, raw.terminals, n, problems)
    flags_ok &= _check_flag_array(TIMEOUTS, raw.timeouts, n, problems)
    term = raw.terminals.astype(bool) if flags_ok else None
    tout = raw.timeouts.astype(bool) if flags_ok else None
    if term is not None and tout is not None:
        both = term & tout
        if both.any():
            problems.append(f"'{TERMINALS}' and '{TIMEOUTS}' both set in {_rows(both)} (a termination wins)")

    ends = raw.episode_ends
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        problems.append(f"'{EPISODE_ENDS}' must be a 1-D integer array, got {ends.dtype} {ends.shape}")
        return problems
    if ends.size == 0:
        problems.append(f"'{EPISODE_ENDS}' is empty but there are {n} transitions")
        return problems
    ends = ends.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    empty = ends <= starts
    if empty.any():
        idx = np.flatnonzero(empty)
        problems.append(
            f"{idx.size} empty or out-of-order episode(s) in '{EPISODE_ENDS}' (first: episode {idx[0]}, "
            f"rows {starts[idx[0]]}..{ends[idx[0]]})"
        )
        return problems
    if ends[-1] != n:
        problems.append(f"'{EPISODE_ENDS}' ends at row {ends[-1]} but there are {n} transitions")
        return problems

    if term is not None and tout is not None:
        flagged = term | tout
        last = np.zeros(n, dtype=bool)
        last[ends - 1] = True
        unflagged = last & ~flagged
        if unflagged.any():
            ep = np.searchsorted(ends, np.flatnonzero(unflagged), side="right")
            problems.append(
                f"{ep.size} episode(s) end without a terminal or timeout flag "
                f"(first: episode {ep[0]}, last row {ends[ep[0]] - 1})"
            )
        inner = flagged & ~last
        if inner.any():
            problems.append(
                f"terminal/timeout flags inside an episode (not on its last row) in {_rows(inner)}"
            )

    # next_observations[i] must equal observations[i+1] inside an episode
    if raw.observations.shape == raw.next_observations.shape and n > 1:
        inside = np.ones(n - 1, dtype=bool)
        inside[ends[:-1] - 1] = False
        a = raw.next_observations[:-1].reshape(n - 1, -1)
        b = raw.observations[1:].reshape(n - 1, -1)
        # NaN on both sides is the same observation (the finite check reports it), not a mismatch
        mismatch = inside & ((a != b) & ~((a != a) & (b != b))).any(axis=1)
        if mismatch.any():
            problems.append(
                f"'{NEXT_OBSERVATIONS}' differs from the next row's '{OBSERVATIONS}' inside an episode in "
                f"{_rows(np.concatenate([mismatch, [False]]))}"
            )

    if raw.episode_policy_ids is not None:
        ids = raw.episode_policy_ids
        if ids.shape != ends.shape:
            problems.append(
                f"'{EPISODE_POLICY_IDS}' has shape {ids.shape}, expected {ends.shape} (one per episode)"
            )
        elif raw.policies and ((ids < 0) | (ids >= len(raw.policies))).any():
            problems.append(
                f"'{EPISODE_POLICY_IDS}' refers to policies outside the {len(raw.policies)} listed"
            )

    lo, hi = raw.ref_min_return, raw.ref_max_return
    if (lo is None) != (hi is None):
        problems.append(f"only one of '{ATTR_REF_MIN}' and '{ATTR_REF_MAX}' is set")
    elif lo is not None and hi is not None and (not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi):
        problems.append(
            f"reference returns must be finite with '{ATTR_REF_MIN}' < '{ATTR_REF_MAX}', got {lo}, {hi}"
        )
    return problems


def load_checked(path: str | os.PathLike[str]) -> RawDataset:
    """Read and check a file; raise ``DatasetError`` listing every problem."""
    raw = read_raw(path)
    problems = check(raw)
    if problems:
        raise DatasetError(path, problems)
    return raw


def validate(path: str | os.PathLike[str]) -> list[str]:
    """Problems of a file as ``'<path>: <problem>'`` lines; [] for a valid file."""
    try:
        raw = read_raw(path)
    except DatasetError as exc:
        return [f"{exc.path}: {p}" for p in exc.problems]
    return [f"{Path(path)}: {p}" for p in check(raw)]
