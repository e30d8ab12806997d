"""Logs of a real system into format v1: numpy arrays in, a checked file out (docs/your-data.md)."""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.data import format as fmt
from offrl.data.convert import ConvertReport, plural, write_imported
from offrl.errors import DatasetError

DROP_LAST = "last step of an episode without a next observation"

ActionSpaceLike = gym.Space | int | tuple[Any, Any]


def action_space_of(spec: ActionSpaceLike, actions: np.ndarray, where: str) -> gym.Space:
    """A Box or Discrete action space from a space, ``n`` (Discrete) or ``(low, high)`` (Box bounds, scalars
    broadcast over the actions' row shape). Continuous actions need finite bounds: they set the scaling."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec < 1:
            raise DatasetError(where, f"action_space {spec}: a Discrete space needs n ≥ 1")
        return gym.spaces.Discrete(int(spec))
    if isinstance(spec, tuple) and len(spec) == 2:
        shape = actions.shape[1:]
        dtype = actions.dtype if np.issubdtype(actions.dtype, np.floating) else np.dtype(np.float32)
        try:
            low = np.broadcast_to(np.asarray(spec[0], dtype=dtype), shape).copy()
            high = np.broadcast_to(np.asarray(spec[1], dtype=dtype), shape).copy()
        except ValueError:
            raise DatasetError(
                where,
                f"action bounds do not fit the actions' row shape {shape}: one value or one per dimension",
            ) from None
        spec = gym.spaces.Box(low, high, shape=shape, dtype=dtype.type)
    if isinstance(spec, gym.spaces.Box):
        if not (np.isfinite(spec.low).all() and np.isfinite(spec.high).all()):
            raise DatasetError(
                where,
                f"action space {spec} has infinite bounds: continuous actions need explicit finite bounds "
                "(action scaling depends on them; offrl does not guess them from the data)",
            )
        if (spec.low >= spec.high).any():
            raise DatasetError(where, f"action space {spec}: every low bound must be below its high bound")
        return spec
    if isinstance(spec, gym.spaces.Discrete):
        return spec
    raise DatasetError(
        where, f"action_space {spec!r}: give a gymnasium Box or Discrete, n for Discrete(n), or (low, high)"
    )


def _flags(where: str, name: str, a: Any, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape != (n,):
        raise DatasetError(where, f"'{name}' has shape {a.shape}, expected ({n},)")
    if a.dtype == np.bool_:
        return a
    bad = np.flatnonzero(~np.isin(a, (0, 1)))
    if bad.size:
        raise DatasetError(
            where, f"'{name}' has a value other than 0/1 at row {bad[0]}: {a[bad[0]].item()!r}"
        )
    return a.astype(bool)


def _finite(where: str, name: str, a: np.ndarray) -> None:
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
        if bad.any():
            raise DatasetError(where, f"'{name}' has NaN or inf at row {np.flatnonzero(bad)[0]}")
    elif a.dtype.kind not in "biu":
        raise DatasetError(where, f"'{name}' has dtype {a.dtype}, expected numbers")


def build_raw(
    where: str,
    *,
    observations: Any,
    actions: Any,
    rewards: Any,
    action_space: ActionSpaceLike,
    terminals: Any = None,
    timeouts: Any = None,
    episode_ends: Any = None,
    next_observations: Any = None,
    observation_space: gym.Space | None = None,
    env_id: str | None = None,
    infos: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[fmt.RawDataset, int, dict[str, int], list[str]]:
    """The checked format-v1 dataset of whole arrays (see :func:`from_arrays`); with the rows given, the
    rows dropped per reason and notes."""
    obs = np.asarray(observations)
    rew = np.asarray(rewards)
    if rew.ndim == 2 and rew.shape[1] == 1:
        rew = rew[:, 0]
    n = int(rew.shape[0]) if rew.ndim == 1 else -1
    if n < 1:
        raise DatasetError(where, f"'rewards' has shape {rew.shape}, expected (N,) with N ≥ 1")
    act = np.asarray(actions)
    for name, a in (("observations", obs), ("actions", act)):
        if a.ndim == 0 or a.shape[0] != n:
            raise DatasetError(where, f"'{name}' has {a.shape[0] if a.ndim else 0} rows, 'rewards' has {n}")
    if obs.ndim < 2:
        raise DatasetError(where, f"'observations' has shape {obs.shape}, expected (N, *obs_shape)")
    for name, a in (("observations", obs), ("actions", act), ("rewards", rew)):
        _finite(where, name, a)
    nxt = None
    if next_observations is not None:
        nxt = np.asarray(next_observations)
        if nxt.shape != obs.shape:
            raise DatasetError(
                where, f"'next_observations' has shape {nxt.shape}, 'observations' {obs.shape}"
            )
        _finite(where, "next_observations", nxt)
        nxt = nxt.astype(obs.dtype, copy=False)

    notes: list[str] = []
    term = _flags(where, "terminals", terminals, n) if terminals is not None else np.zeros(n, dtype=bool)
    if episode_ends is not None:
        if timeouts is not None:
            raise DatasetError(
                where, "give 'timeouts' or 'episode_ends', not both (every other episode end is a timeout)"
            )
        ends = np.asarray(episode_ends)
        if ends.ndim != 1 or ends.size == 0 or ends.dtype.kind not in "iu":
            raise DatasetError(
                where, f"'episode_ends' must be a non-empty 1-D integer array, got {ends.dtype} {ends.shape}"
            )
        ends = ends.astype(np.int64)
        steps = np.diff(np.concatenate([[0], ends]))
        if (steps <= 0).any():
            i = int(np.flatnonzero(steps <= 0)[0])
            raise DatasetError(
                where, f"'episode_ends' must increase strictly from above 0: entry {i} is {ends[i]}"
            )
        if ends[-1] != n:
            raise DatasetError(where, f"'episode_ends' ends at {ends[-1]}, expected the row count {n}")
        last = np.zeros(n, dtype=bool)
        last[ends - 1] = True
        inner = np.flatnonzero(term & ~last)
        if inner.size:
            raise DatasetError(where, f"'terminals' is set at row {inner[0]}, which does not end an episode")
    else:
        if terminals is None and timeouts is None:
            raise DatasetError(
                where, "give 'terminals' and/or 'timeouts', or 'episode_ends', to mark where episodes end"
            )
        tout = _flags(where, "timeouts", timeouts, n) if timeouts is not None else np.zeros(n, dtype=bool)
        both = int((term & tout).sum())
        if both:
            notes.append(f"{plural(both, 'row')} with both a terminal and a timeout: kept as terminals")
        last = term | tout
        if not last[-1]:
            last[-1] = True
            notes.append("the last rows carry no end flag: their episode is closed as a timeout")
    term = term & last

    dropped: dict[str, int] = {}
    keep = np.ones(n, dtype=bool)
    timeouts_out = last & ~term
    if nxt is None:
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[last] = obs[last]  # a terminal's successor is never bootstrapped from: a placeholder copy
        drop = last & ~term
        if drop.any():
            dropped[DROP_LAST] = int(drop.sum())
        keep = ~drop
        prev = np.flatnonzero(drop) - 1
        prev = prev[(prev >= 0) & ~last[np.maximum(prev, 0)]]
        vanished = int(drop.sum()) - prev.size
        timeouts_out = np.zeros(n, dtype=bool)
        timeouts_out[prev] = True
        if vanished:
            notes.append(f"{plural(vanished, 'episode')} of one step without a next observation vanished")
        if term.any():
            notes.append(
                f"{plural(int(term.sum()), 'terminal row')} with a placeholder next observation (a copy of "
                "the observation; bootstrapping is masked by the terminal)"
            )
    if not keep.any():
        raise DatasetError(
            where, "no transitions are left: every episode was one step without a next observation"
        )
    terminals_out = term[keep]
    timeouts_out = timeouts_out[keep]
    ends_out = np.flatnonzero(terminals_out | timeouts_out).astype(np.int64) + 1

    act_space = action_space_of(action_space, act, where)
    if isinstance(act_space, gym.spaces.Discrete):
        if act.ndim == 2 and act.shape[1] == 1:
            act = act[:, 0]
        if act.ndim != 1:
            raise DatasetError(
                where, f"'actions' rows have shape {act.shape[1:]}, {act_space} takes one integer"
            )
        if act.dtype.kind == "f":
            frac = np.flatnonzero(act != np.round(act))
            if frac.size:
                raise DatasetError(
                    where, f"'actions' holds a non-integer value at row {frac[0]} for {act_space}"
                )
        act = act.astype(np.int64)
    else:
        assert isinstance(act_space, gym.spaces.Box)
        act = act.astype(act_space.dtype, copy=False).reshape(n, *act_space.shape)
    if observation_space is None:
        kind = obs.dtype.kind
        if kind not in "fiu":
            raise DatasetError(where, f"'observations' has dtype {obs.dtype}, expected numbers")
        big = np.inf if kind == "f" else np.iinfo(obs.dtype).max
        small = -np.inf if kind == "f" else np.iinfo(obs.dtype).min
        observation_space = gym.spaces.Box(small, big, shape=obs.shape[1:], dtype=obs.dtype.type)
    info_arrays = {}
    for key, value in (infos or {}).items():
        a = np.asarray(value)
        if a.ndim == 0 or a.shape[0] != n or a.dtype.kind not in "biuf":
            raise DatasetError(
                where, f"infos['{key}'] must be numeric with {n} rows, got {a.dtype} {a.shape}"
            )
        info_arrays[key] = a[keep]
    meta = {"converted_from": "arrays", **(metadata or {})}
    meta["arrays_import"] = {"rows_in": n, "dropped": dict(dropped), "notes": list(notes)}
    raw = fmt.RawDataset(
        path=where,
        observations=obs[keep],
        actions=act[keep],
        rewards=rew[keep].astype(np.float32),
        next_observations=nxt[keep],
        terminals=terminals_out,
        timeouts=timeouts_out,
        episode_ends=ends_out,
        observation_space=observation_space,
        action_space=act_space,
        infos=info_arrays,
        env_id=env_id,
        metadata=meta,
    )
    problems = fmt.check(raw)
    if problems:
        raise DatasetError(where, problems)
    return raw, n, dropped, notes


def from_arrays(
    path: str | os.PathLike[str],
    *,
    observations: Any,
    actions: Any,
    rewards: Any,
    action_space: ActionSpaceLike,
    terminals: Any = None,
    timeouts: Any = None,
    episode_ends: Any = None,
    next_observations: Any = None,
    observation_space: gym.Space | None = None,
    env_id: str | None = None,
    infos: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    compression: str | None = None,
    quiet: bool = False,
) -> ConvertReport:
    """Write logged transitions, row by row in time order, as a new format-v1 file at ``path`` (atomically).

    Arrays: ``observations`` (N, *obs_shape), ``actions`` (N, *act_shape) or (N,) integers, ``rewards`` (N,).
    Episodes end where ``terminals`` (a true termination) or ``timeouts`` (anything else: a time limit, the
    end of a log) are set, a terminal winning; or at ``episode_ends`` (exclusive end rows, the last one N),
    with ``terminals`` then saying which of those ends are terminations. Rows after the last flag form a
    final episode closed as a timeout.

    Without ``next_observations`` a row's next observation is the next row's observation inside its
    episode. An episode's last step has none: it is dropped (the report counts it) and the step before
    ends the episode with a timeout, unless it is a terminal, which keeps a copy of its observation (never
    bootstrapped from).

    ``action_space``: a gymnasium ``Discrete``/``Box``, ``n`` for ``Discrete(n)``, or ``(low, high)``
    bounds of a Box; continuous actions need finite bounds, never guessed from the data. Without
    ``observation_space`` observations get an unbounded Box of their dtype. ``env_id`` names the gymnasium
    env that evaluation uses. Prints the report (rows kept and dropped) unless ``quiet``; raises
    ``DatasetError`` naming the argument and row at fault. The file passes ``offrl validate``.
    """
    raw, rows_in, dropped, notes = build_raw(
        str(path),
        observations=observations,
        actions=actions,
        rewards=rewards,
        action_space=action_space,
        terminals=terminals,
        timeouts=timeouts,
        episode_ends=episode_ends,
        next_observations=next_observations,
        observation_space=observation_space,
        env_id=env_id,
        infos=infos,
        metadata=metadata,
    )
    report = write_imported(
        raw, path, src="arrays", rows_in=rows_in, dropped=dropped, notes=notes, compression=compression
    )
    if not quiet:
        print(report.describe())
    return report
