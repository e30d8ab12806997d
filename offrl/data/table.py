"""Logs in a table (CSV or Parquet, one row per step) into format v1, read with pyarrow (``offrl[table]``).

Rows are sorted by episode and step; column globs expand in natural order (``obs_2`` before ``obs_10``).
Every rejected input names its column and its row: rows are counted from 0 in file order, the header
not counted. The arrays then go through :func:`offrl.data.arrays.build_raw`, as ``from_arrays`` does.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.data.arrays import build_raw
from offrl.data.convert import ConvertReport, write_imported
from offrl.errors import ConfigError, DatasetError, OfflineRLError

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def natural_key(name: str) -> list[Any]:
    """Sort key that orders the digit runs of a name as numbers: obs_2 before obs_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def expand_columns(src: str, flag: str, patterns: str, columns: Sequence[str]) -> list[str]:
    """Columns named by a comma list of names or globs; each glob's matches in natural order."""
    out: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matched = sorted(fnmatch.filter(columns, pattern), key=natural_key)
        if not matched:
            shown = ", ".join(columns[:12]) + (", …" if len(columns) > 12 else "")
            raise DatasetError(src, f"{flag} {pattern!r} matches no column (columns: {shown})")
        out.extend(c for c in matched if c not in out)
    if not out:
        raise DatasetError(src, f"{flag} names no column")
    return out


def read_table(src: str | os.PathLike[str]) -> Any:
    """The file as a ``pyarrow.Table`` (CSV or Parquet by suffix)."""
    path = Path(src)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(src, "--from table reads .csv, .parquet or .pq files")
    if not path.is_file():
        raise DatasetError(src, "no such file")
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise OfflineRLError('reading tables needs pyarrow: pip install "offrl[table]"') from None
    try:
        return pacsv.read_csv(path) if kind == "csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(src, f"unreadable {kind} file ({str(exc).splitlines()[0]})") from None


def _column(src: str, table: Any, name: str) -> np.ndarray:
    """A numeric or boolean column as numpy; a null or non-number names its row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if col.null_count:
        row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise DatasetError(src, f"column '{name}' row {row}: empty (no value)")
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        values = col.to_pylist()
        for row, v in enumerate(values):
            try:
                float(v)
            except (TypeError, ValueError):
                raise DatasetError(src, f"column '{name}' row {row}: {v!r} is not a number") from None
        raise DatasetError(src, f"column '{name}' has type {t}, expected numbers")
    a = col.to_numpy(zero_copy_only=False)
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise DatasetError(src, f"column '{name}' row {bad[0]}: {a[bad[0]]} is not finite")
    return a


def _flag_column(src: str, table: Any, name: str) -> np.ndarray:
    a = _column(src, table, name)
    if a.dtype != np.bool_:
        bad = np.flatnonzero(~np.isin(a, (0, 1)))
        if bad.size:
            raise DatasetError(src, f"column '{name}' row {bad[0]}: {a[bad[0]].item()!r} is not 0/1")
    return a.astype(bool)


def _bounds(text: str | None, k: int, flag: str) -> np.ndarray | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected one number or a comma list of numbers") from None
    if len(values) not in (1, k) or not np.isfinite(values).all():
        raise ConfigError(f"{flag} {text!r}: give one finite number, or one per action column ({k})")
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (k,)).copy()


def import_table(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    episode: str,
    obs: str,
    action: str,
    reward: str,
    step: str | None = None,
    terminal: str | None = None,
    timeout: str | None = None,
    next_obs: str | None = None,
    action_low: str | None = None,
    action_high: str | None = None,
    action_n: int | None = None,
    env_id: str | None = None,
    compression: str | None = None,
) -> ConvertReport:
    """Convert a table of logged steps into a format-v1 file at ``out``, atomically.

    ``obs``, ``action`` and ``next_obs`` are comma lists of column names or globs. Continuous actions need
    ``action_low`` and ``action_high`` (one number, or one per action column); without them the action is
    one integer column, ``Discrete(action_n)`` (default: its largest value + 1). An episode's last row ends
    it with a termination when its ``terminal`` column is 1, else with a timeout.
    """
    src = str(src)
    table = read_table(src)
    columns = list(table.column_names)
    if table.num_rows == 0:
        raise DatasetError(src, "the table has no rows")
    if episode not in columns:
        raise DatasetError(src, f"--episode column {episode!r} is missing")
    obs_cols = expand_columns(src, "--obs", obs, columns)
    act_cols = expand_columns(src, "--action", action, columns)
    next_cols = expand_columns(src, "--next-obs", next_obs, columns) if next_obs else None
    if next_cols is not None and len(next_cols) != len(obs_cols):
        raise DatasetError(src, f"--next-obs names {len(next_cols)} columns, --obs {len(obs_cols)}")
    for flag, name in (
        ("--reward", reward),
        ("--step", step),
        ("--terminal", terminal),
        ("--timeout", timeout),
    ):
        if name is not None and name not in columns:
            raise DatasetError(src, f"{flag} column {name!r} is missing")

    ep_col = table.column(episode)
    if ep_col.null_count:
        import pyarrow.compute as pc

        row = int(np.flatnonzero(pc.is_null(ep_col).to_numpy(zero_copy_only=False))[0])
        raise DatasetError(src, f"column '{episode}' row {row}: empty (no value)")
    _, ep_code = np.unique(ep_col.to_numpy(zero_copy_only=False), return_inverse=True)
    if step is not None:
        steps = _column(src, table, step)
        order = np.lexsort((steps, ep_code))
        same = (ep_code[order][1:] == ep_code[order][:-1]) & (steps[order][1:] == steps[order][:-1])
        if same.any():
            i = int(np.flatnonzero(same)[0])
            rows = sorted((int(order[i]), int(order[i + 1])))
            raise DatasetError(
                src,
                f"column '{step}' row {rows[1]}: step {steps[order[i]]} repeats row {rows[0]} in its episode",
            )
    else:
        order = np.argsort(ep_code, kind="stable")
    codes = ep_code[order]
    last_sorted = np.ones(len(order), dtype=bool)
    last_sorted[:-1] = codes[1:] != codes[:-1]
    episode_ends = np.flatnonzero(last_sorted) + 1

    def matrix(cols: list[str]) -> np.ndarray:
        return np.stack([_column(src, table, c) for c in cols], axis=1).astype(np.float32)[order]

    observations = matrix(obs_cols)
    next_observations = matrix(next_cols) if next_cols else None
    rewards = _column(src, table, reward).astype(np.float32)[order]

    flags: dict[str, np.ndarray] = {}
    for name in (terminal, timeout):
        if name is not None:
            f = _flag_column(src, table, name)[order]
            inner = np.flatnonzero(f & ~last_sorted)
            if inner.size:
                raise DatasetError(
                    src, f"column '{name}' row {order[inner[0]]}: set on a row that does not end its episode"
                )
            flags[name] = f
    terminals = flags[terminal] if terminal is not None else np.zeros(len(order), dtype=bool)

    low = _bounds(action_low, len(act_cols), "--action-low")
    high = _bounds(action_high, len(act_cols), "--action-high")
    raw_actions = {c: _column(src, table, c) for c in act_cols}
    action_space: gym.Space
    actions: np.ndarray
    if low is not None or high is not None:
        if low is None or high is None:
            raise ConfigError("give both --action-low and --action-high, or neither")
        for j, c in enumerate(act_cols):
            if low[j] >= high[j]:
                raise ConfigError(f"--action-low must be below --action-high for column '{c}'")
            a = raw_actions[c]
            bad = np.flatnonzero((a < low[j]) | (a > high[j]))
            if bad.size:
                raise DatasetError(
                    src, f"column '{c}' row {bad[0]}: {a[bad[0]]} is outside [{low[j]}, {high[j]}]"
                )
        actions = np.stack([raw_actions[c] for c in act_cols], axis=1).astype(np.float32)[order]
        action_space = gym.spaces.Box(low, high, dtype=np.float32)
    elif env_id is not None:
        from offrl.data.convert import make_env_spaces

        action_space = make_env_spaces(env_id)[1]
        actions = np.stack([raw_actions[c] for c in act_cols], axis=1)[order]
    else:
        a = raw_actions[act_cols[0]]
        if len(act_cols) > 1 or a.dtype.kind not in "iu":
            names = ", ".join(f"'{c}'" for c in act_cols)
            raise ConfigError(
                f"{src}: column {names} holds continuous actions: give --action-low and --action-high "
                "(action scaling depends on them; offrl does not guess them from the data)"
            )
        neg = np.flatnonzero(a < 0)
        if neg.size:
            raise DatasetError(
                src, f"column '{act_cols[0]}' row {neg[0]}: {a[neg[0]]} is not a Discrete action"
            )
        n = action_n if action_n is not None else int(a.max()) + 1
        over = np.flatnonzero(a >= n)
        if over.size:
            raise DatasetError(
                src, f"column '{act_cols[0]}' row {over[0]}: {a[over[0]]} is outside Discrete({n})"
            )
        action_space = gym.spaces.Discrete(n)
        actions = a.astype(np.int64)[order]

    raw, rows_in, dropped, notes = build_raw(
        src,
        observations=observations,
        actions=actions,
        rewards=rewards,
        action_space=action_space,
        terminals=terminals,
        episode_ends=episode_ends,
        next_observations=next_observations,
        env_id=env_id,
        metadata={
            "converted_from": "table",
            "source_file": os.path.basename(src),
            "columns": {"episode": episode, "step": step, "observations": obs_cols, "actions": act_cols},
        },
    )
    return write_imported(
        raw, out, src=src, rows_in=rows_in, dropped=dropped, notes=notes, compression=compression
    )
