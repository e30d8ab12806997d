"""Import and export of other dataset layouts; today the flat HDF5 layout of D4RL (docs/convert.md).

D4RL stores one flat array per key and marks episode ends with ``terminals`` and ``timeouts``;
older files lack ``timeouts`` and most lack ``next_observations``. Format v1 needs an explicit
next observation on every row and a flag on every episode's last row, so importing is mostly
about deciding which rows still have a recoverable successor and where episodes end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from offrl.data import format as fmt
from offrl.data.writer import write_raw
from offrl.errors import ConfigError, DatasetError
from offrl.spaces import space_from_json, space_to_json
from offrl.utils import atomic_path

DROP_TIMEOUT = "timeout row without next observation"
DROP_FINAL = "final row without next observation"

# Keys our exporter writes under ``metadata/`` so that a re-import restores the exact spaces.
_EXPORT_TAG = "offrl_format_version"
_EXPORT_OBS_SPACE = "offrl_observation_space"
_EXPORT_ACT_SPACE = "offrl_action_space"
_EXPORT_ENV_ID = "offrl_env_id"
_EXPORT_KEYS = (_EXPORT_TAG, _EXPORT_OBS_SPACE, _EXPORT_ACT_SPACE, _EXPORT_ENV_ID)

_FLAT_KEYS = (fmt.OBSERVATIONS, fmt.ACTIONS, fmt.REWARDS, fmt.TERMINALS, fmt.TIMEOUTS, fmt.NEXT_OBSERVATIONS)


def write_imported(
    raw: fmt.RawDataset,
    out: str | os.PathLike[str],
    *,
    src: str,
    rows_in: int,
    dropped: dict[str, int],
    notes: list[str] | tuple[str, ...],
    compression: str | None = None,
) -> ConvertReport:
    """Write an imported dataset to ``out`` (atomically) and report what the import kept and dropped."""
    write_raw(raw, out, compression=compression)
    return ConvertReport(
        src=src,
        out=str(out),
        rows_in=rows_in,
        rows_kept=raw.num_transitions,
        episodes=raw.num_episodes,
        dropped=dict(dropped),
        notes=tuple(notes),
    )


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(frozen=True)
class ConvertReport:
    """What an import kept, dropped and decided; ``describe()`` is what ``offrl convert`` prints."""

    src: str
    out: str
    rows_in: int
    rows_kept: int
    episodes: int
    dropped: dict[str, int]  # reason -> rows dropped (only reasons that dropped something)
    notes: tuple[str, ...] = field(default_factory=tuple)  # decisions that lost nothing

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def describe(self) -> str:
        text = (
            f"imported {plural(self.rows_in, 'row')} from {self.src} into {self.out}: "
            f"{self.rows_kept} kept in {plural(self.episodes, 'episode')}; "
        )
        if self.dropped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.dropped.items())
            text += f"dropped {plural(self.rows_dropped, 'row')} ({reasons})"
        else:
            text += "nothing dropped"
        return "\n".join([text, *(f"  note: {note}" for note in self.notes)])


@dataclass
class _Imported:
    raw: fmt.RawDataset
    rows_in: int
    dropped: dict[str, int]
    notes: list[str]


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _scalar_metadata(group: h5py.Group) -> dict[str, Any]:
    """Scalar and string datasets under ``group`` by relative path; arrays (e.g. policy weights) are skipped."""
    out: dict[str, Any] = {}

    def visit(name: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset) or item.shape != ():
            return
        value = _decode(item[()])
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, int, float, bool)):
            out[name] = value

    group.visititems(visit)
    return out


def _rows_of(a: np.ndarray) -> int:
    return int(a.shape[0]) if a.ndim else 0


def _flat_column(src: str, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """A per-row scalar key as shape (n,); D4RL sometimes stores these as (n, 1)."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape != (n,):
        raise DatasetError(src, f"'{key}' has shape {a.shape}, expected ({n},) or ({n}, 1)")
    return a


def _flag_column(src: str, key: str, a: np.ndarray, n: int) -> np.ndarray:
    a = _flat_column(src, key, a, n)
    if a.dtype == np.bool_:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise DatasetError(src, f"'{key}' has dtype {a.dtype}, expected bool or 0/1 numbers")
    bad = np.flatnonzero(~np.isin(a, (0, 1)))
    if bad.size:
        raise DatasetError(
            src, f"'{key}' has values other than 0/1 in {bad.size} rows (first at row {bad[0]})"
        )
    return a.astype(bool)


def make_env_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    try:
        env = gym.make(env_id)
    except gym.error.Error as exc:
        raise ConfigError(f"cannot make environment {env_id!r} to take its spaces from: {exc}") from exc
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def _box_with_dtype(space: gym.spaces.Box, dtype: np.dtype) -> gym.spaces.Box:
    with np.errstate(over="ignore"):  # finite float64 bounds beyond float32's range become inf
        low, high = space.low.astype(dtype), space.high.astype(dtype)
    return gym.spaces.Box(low, high, shape=space.shape, dtype=dtype.type)


def _infer_observation_space(src: str, obs: np.ndarray) -> gym.spaces.Box:
    dtype = obs.dtype
    if np.issubdtype(dtype, np.floating):
        low, high = np.full(obs.shape[1:], -np.inf, dtype), np.full(obs.shape[1:], np.inf, dtype)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = np.full(obs.shape[1:], info.min, dtype), np.full(obs.shape[1:], info.max, dtype)
    else:
        raise DatasetError(
            src, f"'{fmt.OBSERVATIONS}' has dtype {dtype}; only numeric observations can be imported"
        )
    return gym.spaces.Box(low, high, shape=obs.shape[1:], dtype=dtype.type)


def _infer_action_space(actions: np.ndarray) -> gym.Space:
    """Discrete for 1-D integers (``start`` = min, ``n`` = max - min + 1, i.e. Discrete(max+1) from 0);
    otherwise a Box whose dimensions that stay within [-1, 1] get those bounds and the others the observed
    min/max."""
    if np.issubdtype(actions.dtype, np.integer) and actions.ndim == 1:
        lo = min(0, int(actions.min()))
        return gym.spaces.Discrete(int(actions.max()) - lo + 1, start=lo)
    dtype = actions.dtype
    lo, hi = actions.min(axis=0), actions.max(axis=0)
    unit = (lo >= -1) & (hi <= 1)
    low = np.where(unit, -1, lo).astype(dtype)
    high = np.where(unit, 1, hi).astype(dtype)
    return gym.spaces.Box(low, high, shape=actions.shape[1:], dtype=dtype.type)


def fit_spaces(
    src: str,
    obs: np.ndarray,
    actions: np.ndarray,
    obs_space: gym.Space,
    act_space: gym.Space,
    origin: str,
    metadata: dict[str, Any],
) -> tuple[gym.Space, gym.Space, np.ndarray]:
    """Check the arrays against given spaces; adopt the stored dtype where only the dtype differs."""
    if not isinstance(obs_space, gym.spaces.Box):
        raise DatasetError(src, f"{origin} observation space {obs_space} is not a Box (format v1 stores Box)")
    if obs.shape[1:] != obs_space.shape:
        raise DatasetError(
            src, f"'{fmt.OBSERVATIONS}' rows have shape {obs.shape[1:]}, {origin} says {obs_space.shape}"
        )
    if obs.dtype != obs_space.dtype:
        metadata["original_observation_dtype"] = np.dtype(obs_space.dtype).name
        obs_space = _box_with_dtype(obs_space, obs.dtype)
    if isinstance(act_space, gym.spaces.Discrete):
        if actions.ndim == 2 and actions.shape[1] == 1:
            actions = actions[:, 0]
        if actions.ndim != 1:
            raise DatasetError(
                src,
                f"'{fmt.ACTIONS}' rows have shape {actions.shape[1:]}, {origin} is {act_space} (one integer)",
            )
        if not np.issubdtype(actions.dtype, np.integer):
            if not (np.isfinite(actions).all() and (actions == np.round(actions)).all()):
                raise DatasetError(src, f"'{fmt.ACTIONS}' holds non-integer values, {origin} is {act_space}")
            actions = actions.astype(np.int64)
    elif isinstance(act_space, gym.spaces.Box):
        if actions.shape[1:] != act_space.shape:
            raise DatasetError(
                src, f"'{fmt.ACTIONS}' rows have shape {actions.shape[1:]}, {origin} says {act_space.shape}"
            )
        if actions.dtype != act_space.dtype:
            metadata["original_action_dtype"] = np.dtype(act_space.dtype).name
            act_space = _box_with_dtype(act_space, actions.dtype)
    else:
        raise DatasetError(src, f"{origin} action space {act_space} is neither Box nor Discrete")
    return obs_space, act_space, actions


def _read_arrays(src: str, f: h5py.File) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """The flat arrays, the per-row ``infos/*`` arrays, and notes on what was skipped."""
    notes: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for key in _FLAT_KEYS:
        if key in f:
            if not isinstance(f[key], h5py.Dataset):
                raise DatasetError(src, f"'{key}' is a group, expected an array")
            arrays[key] = np.asarray(f[key][()])
    missing = [k for k in (fmt.OBSERVATIONS, fmt.ACTIONS, fmt.REWARDS, fmt.TERMINALS) if k not in arrays]
    if missing:
        raise DatasetError(src, [f"required D4RL key '{k}' is missing" for k in missing])

    infos: dict[str, np.ndarray] = {}
    if fmt.ACTION_LOG_PROBS in f and isinstance(f[fmt.ACTION_LOG_PROBS], h5py.Dataset):
        infos[fmt.ACTION_LOG_PROBS] = np.asarray(f[fmt.ACTION_LOG_PROBS][()])
    skipped: list[str] = []
    if fmt.INFOS in f and isinstance(f[fmt.INFOS], h5py.Group):
        for name, item in f[fmt.INFOS].items():
            if name == fmt.ACTION_LOG_PROBS and name in infos:
                continue  # the top-level copy wins
            value = np.asarray(item[()]) if isinstance(item, h5py.Dataset) else None
            if value is None or value.dtype.kind not in "biuf":
                skipped.append(f"{fmt.INFOS}/{name}")
            else:
                infos[name] = value
    ignored = [k for k in f if k not in (*_FLAT_KEYS, fmt.INFOS, "metadata", fmt.ACTION_LOG_PROBS)]
    if ignored:
        notes.append("ignored keys outside the D4RL layout: " + ", ".join(repr(k) for k in sorted(ignored)))
    if skipped:
        notes.append("skipped non-numeric infos: " + ", ".join(repr(k) for k in skipped))
    return arrays, infos, notes


def _import(
    src: str | os.PathLike[str],
    *,
    env_id: str | None,
    observation_space: gym.Space | None,
    action_space: gym.Space | None,
) -> _Imported:
    src = str(src)
    if not os.path.isfile(src):
        raise DatasetError(src, "no such file")
    if not h5py.is_hdf5(src):
        raise DatasetError(src, "not an HDF5 file")
    try:
        with h5py.File(src, "r") as f:
            arrays, infos, notes = _read_arrays(src, f)
            d4rl_meta = _scalar_metadata(f["metadata"]) if isinstance(f.get("metadata"), h5py.Group) else {}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DatasetError(src, f"unreadable or truncated HDF5 file ({exc})") from exc

    obs = arrays[fmt.OBSERVATIONS]
    n = _rows_of(obs)
    if obs.ndim < 2 or n == 0:
        raise DatasetError(
            src, f"'{fmt.OBSERVATIONS}' has shape {obs.shape}, expected (N, *obs_shape) with N > 0"
        )
    per_row = dict(arrays)
    if fmt.ACTION_LOG_PROBS in infos:
        per_row[fmt.ACTION_LOG_PROBS] = infos[fmt.ACTION_LOG_PROBS]
    mismatched = [
        f"'{k}' has {_rows_of(a)} rows but '{fmt.OBSERVATIONS}' has {n}"
        for k, a in per_row.items()
        if _rows_of(a) != n
    ]
    if mismatched:
        raise DatasetError(src, mismatched)
    # other infos/* keys are per-row only if they have N rows; anything else is not ours to filter
    odd = sorted(k for k, v in infos.items() if k != fmt.ACTION_LOG_PROBS and _rows_of(v) != n)
    for k in odd:
        del infos[k]
    if odd:
        notes.append(f"skipped infos without {n} rows: " + ", ".join(f"'{fmt.INFOS}/{k}'" for k in odd))

    actions = arrays[fmt.ACTIONS]
    if actions.ndim == 0:
        raise DatasetError(src, f"'{fmt.ACTIONS}' is a scalar, expected one row per transition")
    rewards = _flat_column(src, fmt.REWARDS, arrays[fmt.REWARDS], n)
    if not np.issubdtype(rewards.dtype, np.number):
        raise DatasetError(src, f"'{fmt.REWARDS}' has dtype {rewards.dtype}, expected a number type")
    terminals = _flag_column(src, fmt.TERMINALS, arrays[fmt.TERMINALS], n)
    if fmt.TIMEOUTS in arrays:
        timeouts = _flag_column(src, fmt.TIMEOUTS, arrays[fmt.TIMEOUTS], n)
    else:
        timeouts = np.zeros(n, dtype=bool)
        notes.append(
            f"'{fmt.TIMEOUTS}' is missing (older D4RL files): treated as all zero, so time-limit "
            "episode boundaries that only it marked cannot be recovered"
        )
    log_probs = infos.pop(fmt.ACTION_LOG_PROBS, None)
    if log_probs is not None:
        log_probs = _flat_column(src, fmt.ACTION_LOG_PROBS, log_probs, n).astype(np.float32)

    both = terminals & timeouts
    if both.any():
        notes.append(
            f"{plural(int(both.sum()), 'row')} with both terminal and timeout set: kept as terminals"
        )
    timeouts = timeouts & ~terminals
    flagged = terminals | timeouts

    # -- rows, next observations and episode ends -----------------------------------------------
    dropped: dict[str, int] = {}
    if fmt.NEXT_OBSERVATIONS in arrays:
        next_obs = arrays[fmt.NEXT_OBSERVATIONS]
        if next_obs.shape != obs.shape or next_obs.dtype != obs.dtype:
            raise DatasetError(
                src,
                f"'{fmt.NEXT_OBSERVATIONS}' is {next_obs.dtype} {next_obs.shape}, "
                f"'{fmt.OBSERVATIONS}' is {obs.dtype} {obs.shape}",
            )
        keep = np.ones(n, dtype=bool)
        new_timeouts = timeouts.copy()
        # An unflagged row whose successor is not the next row's observation is an unrecorded reset.
        differs = (next_obs[:-1] != obs[1:]).reshape(n - 1, obs[0].size).any(axis=1)
        hidden = np.concatenate([differs & ~flagged[:-1], [False]])
        if hidden.any():
            new_timeouts |= hidden
            notes.append(
                f"{plural(int(hidden.sum()), 'unflagged row')} whose '{fmt.NEXT_OBSERVATIONS}' differs from "
                "the next row's observation: episodes split there with a timeout"
            )
        if not flagged[-1]:
            new_timeouts[-1] = True
            notes.append("the final episode has no end flag: ended with a timeout")
    else:
        next_obs = np.empty_like(obs)
        next_obs[:-1] = obs[1:]
        next_obs[-1] = obs[-1]
        # A terminal's successor is never bootstrapped from, but the format wants a row: repeat obs.
        next_obs[terminals] = obs[terminals]
        if terminals.any():
            notes.append(
                f"{plural(int(terminals.sum()), 'terminal row')} with a placeholder next observation "
                "(a copy of the observation; bootstrapping is masked by the terminal)"
            )
        drop_final = np.zeros(n, dtype=bool)
        drop_final[-1] = not flagged[-1]
        drop = timeouts | drop_final
        keep = ~drop
        for reason, mask in ((DROP_TIMEOUT, timeouts), (DROP_FINAL, drop_final)):
            if mask.any():
                dropped[reason] = int(mask.sum())
        # the row before a dropped one ends its episode with a timeout, unless it already ended one
        prev = np.flatnonzero(drop) - 1
        lone = prev[(prev < 0) | flagged[np.maximum(prev, 0)]]
        prev = prev[(prev >= 0) & ~flagged[np.maximum(prev, 0)]]
        new_timeouts = np.zeros(n, dtype=bool)
        new_timeouts[prev] = True
        if lone.size:
            notes.append(f"{plural(lone.size, 'episode')} of only a dropped row vanished")

    if not keep.any():
        raise DatasetError(src, "no transitions are left after dropping rows without a next observation")
    terminals_out, timeouts_out = terminals[keep], new_timeouts[keep]
    episode_ends = np.flatnonzero(terminals_out | timeouts_out).astype(np.int64) + 1
    assert episode_ends[-1] == int(keep.sum()), "the last kept row always ends an episode"

    # -- spaces --------------------------------------------------------------------------------
    metadata: dict[str, Any] = {"converted_from": "d4rl", "source_file": os.path.basename(src)}
    recorded_env = d4rl_meta.get(_EXPORT_ENV_ID)
    if observation_space is not None or action_space is not None:
        if observation_space is None or action_space is None:
            raise ConfigError("give both observation_space and action_space, or neither")
        origin = "the given space"
    elif env_id is not None:
        observation_space, action_space = make_env_spaces(env_id)
        origin = f"{env_id}'s space"
    elif _EXPORT_OBS_SPACE in d4rl_meta and _EXPORT_ACT_SPACE in d4rl_meta:
        observation_space = space_from_json(d4rl_meta[_EXPORT_OBS_SPACE])
        action_space = space_from_json(d4rl_meta[_EXPORT_ACT_SPACE])
        origin = "the space recorded by the offrl export"
        env_id = recorded_env if isinstance(recorded_env, str) else None
        notes.append("spaces taken from the offrl export metadata in the file")
    if observation_space is not None and action_space is not None:
        observation_space, action_space, actions = fit_spaces(
            src, obs, actions, observation_space, action_space, origin, metadata
        )
    else:
        observation_space = _infer_observation_space(src, obs)
        action_space = _infer_action_space(actions)
        notes.append(
            f"spaces inferred from the data: observations {observation_space}, actions {action_space}"
        )

    for key in _EXPORT_KEYS:
        d4rl_meta.pop(key, None)
    if d4rl_meta:
        metadata["d4rl_metadata"] = d4rl_meta
    metadata["d4rl_import"] = {"rows_in": n, "dropped": dict(dropped), "notes": list(notes)}

    raw = fmt.RawDataset(
        path=src,
        observations=obs[keep],
        actions=actions[keep],
        rewards=rewards[keep].astype(np.float32),
        next_observations=next_obs[keep],
        terminals=terminals_out,
        timeouts=timeouts_out,
        episode_ends=episode_ends,
        observation_space=observation_space,
        action_space=action_space,
        action_log_probs=None if log_probs is None else log_probs[keep],
        infos={k: v[keep] for k, v in infos.items()},
        env_id=env_id,
        metadata=metadata,
    )
    problems = fmt.check(raw)
    if problems:
        raise DatasetError(src, [f"after conversion: {p}" for p in problems])
    return _Imported(raw=raw, rows_in=n, dropped=dropped, notes=notes)


def read_d4rl(
    src: str | os.PathLike[str],
    *,
    env_id: str | None = None,
    observation_space: gym.Space | None = None,
    action_space: gym.Space | None = None,
) -> fmt.RawDataset:
    """Read a D4RL flat HDF5 file into an in-memory, checked format-v1 dataset (rules in docs/convert.md).

    Episodes end at rows with ``terminals`` or ``timeouts`` set (a terminal wins when both are). With
    ``next_observations`` every row is kept and an unflagged tail is ended with a timeout. Without it,
    ``next_observations[i] = observations[i + 1]`` inside an episode; timeout rows and an unflagged last
    row have no recoverable successor and are dropped, the row before each then ending its episode with
    a timeout; terminal rows get a copy of their own observation as a placeholder.

    Spaces come from ``observation_space``/``action_space`` if given, else from ``gym.make(env_id)``,
    else from spaces an offrl export recorded in ``metadata/``, else they are inferred: observations
    an unbounded Box of the stored dtype; 1-D integer actions Discrete(max + 1); other actions a Box of
    the stored dtype, bounded per dimension by [-1, 1] when the data stays inside it, else by the
    data's min/max. Where only the dtype of a given Box differs, the stored dtype is kept and the
    original recorded in the metadata. Raises ``DatasetError`` naming the file and key at fault.
    """
    return _import(src, env_id=env_id, observation_space=observation_space, action_space=action_space).raw


def import_d4rl(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    env_id: str | None = None,
    compression: str | None = None,
    observation_space: gym.Space | None = None,
    action_space: gym.Space | None = None,
) -> ConvertReport:
    """Convert a D4RL file (see :func:`read_d4rl`) into a format-v1 file at ``out``, written atomically."""
    imported = _import(src, env_id=env_id, observation_space=observation_space, action_space=action_space)
    return write_imported(
        imported.raw,
        out,
        src=str(src),
        rows_in=imported.rows_in,
        dropped=imported.dropped,
        notes=imported.notes,
        compression=compression,
    )


def export_d4rl(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a valid format-v1 file as one flat D4RL-layout HDF5 file at ``out``, atomically.

    Float arrays are written as float32 (D4RL's convention), flags as bool, ``next_observations``
    always. ``metadata/`` records the source's spaces and env id so that :func:`import_d4rl` restores
    them; an export followed by an import gives back identical arrays for float32 data.
    """
    raw = fmt.load_checked(src)

    def as_stored(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a

    arrays: dict[str, np.ndarray] = {
        fmt.OBSERVATIONS: as_stored(raw.observations),
        fmt.ACTIONS: as_stored(raw.actions),
        fmt.REWARDS: raw.rewards.astype(np.float32),
        fmt.TERMINALS: raw.terminals.astype(bool),
        fmt.TIMEOUTS: raw.timeouts.astype(bool),
        fmt.NEXT_OBSERVATIONS: as_stored(raw.next_observations),
    }
    if raw.action_log_probs is not None:
        arrays[f"{fmt.INFOS}/{fmt.ACTION_LOG_PROBS}"] = raw.action_log_probs.astype(np.float32)
    for key, value in raw.infos.items():
        arrays[f"{fmt.INFOS}/{key}"] = as_stored(value)

    obs_space, act_space = raw.observation_space, raw.action_space
    if isinstance(obs_space, gym.spaces.Box) and obs_space.dtype != arrays[fmt.OBSERVATIONS].dtype:
        obs_space = _box_with_dtype(obs_space, arrays[fmt.OBSERVATIONS].dtype)
    if isinstance(act_space, gym.spaces.Box) and act_space.dtype != arrays[fmt.ACTIONS].dtype:
        act_space = _box_with_dtype(act_space, arrays[fmt.ACTIONS].dtype)
    meta: dict[str, Any] = {
        _EXPORT_TAG: raw.format_version,
        _EXPORT_OBS_SPACE: space_to_json(obs_space),
        _EXPORT_ACT_SPACE: space_to_json(act_space),
        "offrl_metadata": json.dumps(raw.metadata, sort_keys=True, default=str),
    }
    if raw.env_id is not None:
        meta[_EXPORT_ENV_ID] = raw.env_id

    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in meta.items():
            f.create_dataset(f"metadata/{key}", data=value)
    return out
