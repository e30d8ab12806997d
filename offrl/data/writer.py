"""Streaming writer of format-v1 files: append whole episodes, finalise atomically."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from offrl.data import format as fmt
from offrl.errors import OfflineRLError
from offrl.spaces import space_to_json
from offrl.utils import atomic_path, package_versions

COMPRESSIONS = (None, "lzf", "gzip")


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes through (h5py's ``fileobj`` driver), which never lets a failed write reach
    HDF5: after the first ``OSError`` (disk full, file too large, I/O error) it keeps it in
    :attr:`error`, stops writing to disk, and holds later writes in memory (what HDF5 flushes while the
    writer closes, at most its caches) so that HDF5 reads back what it wrote. A write error inside HDF5
    itself is printed at length and can end in a segmentation fault when the file is closed.

    It also holds a POSIX lock on the file while it is open, so that a later writer can tell a
    temporary file left by a killed process (unlocked) from one being written (see
    :func:`sweep_temporaries`)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.raw = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed in close()
        fcntl.lockf(self.raw, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.error: OSError | None = None
        self.pos = 0
        self.size = 0
        self.held: dict[int, bytes] = {}  # offset -> bytes written after the error

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self.raw.seek(self.pos)
        got = self.raw.readinto(view) or 0
        view[got:] = bytes(len(view) - got)
        for off, data in self.held.items():  # writes after the error, over what the disk holds
            lo, hi = max(off, self.pos), min(off + len(data), self.pos + len(view))
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = data[lo - off : hi - off]
        n = max(0, min(len(view), self.size - self.pos))
        self.pos += n
        return n

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.error is None:
            try:
                self.raw.seek(self.pos)
                self.raw.write(data)
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            self.held[self.pos] = data
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                self.raw.truncate(size)
            except OSError as exc:
                self.error = exc
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()  # drops the lock
        super().close()


def temporaries(dest: Path) -> list[Path]:
    """The temporary files of writes to ``dest`` (``.NAME.XXXX.tmp`` beside it)."""
    return sorted(dest.parent.glob(f".{glob_escape(dest.name)}.*.tmp"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def sweep_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a killed writer left beside ``dest``; a file another writer still
    holds (locked) is left alone. Returns the files removed."""
    removed = []
    for tmp in temporaries(Path(dest)):
        try:
            with open(tmp, "r+b") as f:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink()
            removed.append(tmp)
        except OSError:  # held by a live writer, or gone
            continue
    return removed


def check_destination(path: str | os.PathLike[str], *, force: bool, flag: str = "--out") -> Path:
    """Refuse, before any work, a destination file that cannot be written: a folder, a path under a
    file, or (without ``force``) an existing file."""
    p = Path(path)
    if p.is_dir():
        raise OfflineRLError(f"{flag} {p}: is a folder; give the path of a file")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OfflineRLError(f"{flag} {p}: lies under {parent}, which is a file")
            break
    if p.exists() and not force:
        raise OfflineRLError(f"{flag} {p}: exists; --force replaces it")
    return p


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class DatasetWriter:
    """Write episodes into a new format-v1 file.

    Everything goes to a temporary file beside ``path``; :meth:`close` writes the episode index
    and attributes and renames it over ``path``. If the process dies first, ``path`` is untouched.
    Use it as a context manager: an exception inside the block discards the temporary file.

    ``obs_dtype`` down-casts stored observations (e.g. MuJoCo's float64 to float32); the stored
    observation space then carries that dtype, and the original one goes into the metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        observation_space: gym.Space,
        action_space: gym.Space,
        *,
        env_id: str | None = None,
        env_spec: str | None = None,
        metadata: dict[str, Any] | None = None,
        ref_min_return: float | None = None,
        ref_max_return: float | None = None,
        compression: str | None = None,
        obs_dtype: str | np.dtype | None = None,
        chunk_rows: int = 16384,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise OfflineRLError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if not isinstance(observation_space, gym.spaces.Box):
            raise OfflineRLError(f"format v1 stores Box observations, got {observation_space}")
        if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
            raise OfflineRLError(f"format v1 stores Box or Discrete actions, got {action_space}")
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        if obs_dtype is not None and np.dtype(obs_dtype) != observation_space.dtype:
            self.metadata.setdefault("original_observation_dtype", np.dtype(observation_space.dtype).name)
            observation_space = gym.spaces.Box(
                observation_space.low.astype(obs_dtype),
                observation_space.high.astype(obs_dtype),
                dtype=np.dtype(obs_dtype).type,
            )
        self.observation_space = observation_space
        self.action_space = action_space
        self.env_id, self.env_spec = env_id, env_spec
        self.ref_min_return, self.ref_max_return = ref_min_return, ref_max_return
        self.compression = compression
        self.chunk_rows = chunk_rows
        self._policies: list[Any] = []
        self._episode_ends: list[int] = []
        self._episode_policy_ids: list[int] = []
        self._rows = 0
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_rows = 0
        self._has_log_probs: bool | None = None
        self._info_keys: set[str] | None = None
        sweep_temporaries(self.path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._io = _GuardedFile(self._tmp)
            self._file: h5py.File | None = h5py.File(self._io, "w")
        except BaseException as exc:
            self._file = None
            self._closed = False
            self.abort(exc)
            raise
        self._closed = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)

    @property
    def num_transitions(self) -> int:
        return self._rows

    @property
    def num_episodes(self) -> int:
        return len(self._episode_ends)

    def _dataset(self, name: str, row_shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
        assert self._file is not None
        if name in self._file:
            return self._file[name]
        chunk = (max(1, min(self.chunk_rows, (1 << 20) // max(1, int(np.prod(row_shape)) * dtype.itemsize))),)
        return self._file.create_dataset(
            name,
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=chunk + row_shape,
            compression=self.compression,
        )

    def _append(self, name: str, values: np.ndarray) -> None:
        ds = self._dataset(name, values.shape[1:], values.dtype)
        if ds.shape[1:] != values.shape[1:] or ds.dtype != values.dtype:
            raise OfflineRLError(
                f"'{name}': episode rows have shape {values.shape[1:]} {values.dtype}, "
                f"earlier episodes {ds.shape[1:]} {ds.dtype}"
            )
        start = ds.shape[0]
        ds.resize(start + values.shape[0], axis=0)
        ds[start:] = values

    def policy_id(self, description: Any) -> int:
        """Id of a behaviour-policy description (any JSON value), registering it if new."""
        for i, p in enumerate(self._policies):
            if p == description:
                return i
        self._policies.append(description)
        return len(self._policies) - 1

    def add_episode(
        self,
        observations: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_observations: np.ndarray,
        terminated: bool,
        *,
        action_log_probs: np.ndarray | None = None,
        infos: dict[str, np.ndarray] | None = None,
        policy: Any = "unknown",
    ) -> None:
        """Append one episode of T transitions.

        ``terminated`` says how it ended: True for a true termination (its last row gets
        terminal=1), False for any truncation (a time limit or a cut-off recording: timeout=1).
        """
        if self._file is None:
            raise OfflineRLError(f"{self.path}: writer is already closed")
        t = int(np.asarray(rewards).shape[0])
        if t == 0:
            raise OfflineRLError(f"{self.path}: cannot add an empty episode")
        obs_dtype = np.dtype(self.observation_space.dtype)
        obs = np.asarray(observations).astype(obs_dtype, copy=False)
        nxt = np.asarray(next_observations).astype(obs_dtype, copy=False)
        if isinstance(self.action_space, gym.spaces.Discrete):
            act = np.asarray(actions).astype(np.int64, copy=False).reshape(t)
        else:
            act = (
                np.asarray(actions)
                .astype(self.action_space.dtype, copy=False)
                .reshape(t, *self.action_space.shape)
            )
        arrays = {
            fmt.OBSERVATIONS: obs,
            fmt.ACTIONS: act,
            fmt.REWARDS: np.asarray(rewards, dtype=np.float32).reshape(t),
            fmt.NEXT_OBSERVATIONS: nxt,
        }
        for name, a in arrays.items():
            if a.shape[0] != t:
                raise OfflineRLError(
                    f"{self.path}: episode '{name}' has {a.shape[0]} rows, 'rewards' has {t}"
                )
        if obs.shape[1:] != self.observation_space.shape:
            raise OfflineRLError(
                f"{self.path}: observations have shape {obs.shape[1:]}, space says {self.observation_space.shape}"
            )
        has_lp = action_log_probs is not None
        if self._has_log_probs is None:
            self._has_log_probs = has_lp
        elif self._has_log_probs != has_lp:
            raise OfflineRLError(f"{self.path}: every episode or none must carry action_log_probs")
        keys = set(infos or {})
        if self._info_keys is None:
            self._info_keys = keys
        elif keys != self._info_keys:
            raise OfflineRLError(
                f"{self.path}: info keys {sorted(keys)} differ from earlier {sorted(self._info_keys)}"
            )

        terminals = np.zeros(t, dtype=bool)
        timeouts = np.zeros(t, dtype=bool)
        (terminals if terminated else timeouts)[-1] = True
        arrays[fmt.TERMINALS] = terminals
        arrays[fmt.TIMEOUTS] = timeouts
        if action_log_probs is not None:
            arrays[fmt.ACTION_LOG_PROBS] = np.asarray(action_log_probs, dtype=np.float32).reshape(t)
        for key, value in (infos or {}).items():
            arrays[f"{fmt.INFOS}/{key}"] = np.asarray(value)
        self._write_rows(arrays, [t], [self.policy_id(policy)])

    def _write_rows(self, arrays: dict[str, np.ndarray], lengths: list[int], policy_ids: list[int]) -> None:
        """Queue already-checked rows of whole episodes (one array per key).

        Short episodes are buffered and written together once ``chunk_rows`` rows are pending (and at
        close): one HDF5 resize-and-write per key per episode costs milliseconds, which would
        otherwise dominate recording environments with short episodes.
        """
        for name, a in arrays.items():
            self._pending.setdefault(name, []).append(a)
        self._pending_rows += sum(int(n) for n in lengths)
        if self._pending_rows >= self.chunk_rows:
            self._flush()
        for length, pid in zip(lengths, policy_ids):
            self._rows += int(length)
            self._episode_ends.append(self._rows)
            self._episode_policy_ids.append(pid)

    def _flush(self) -> None:
        for name, parts in self._pending.items():
            self._append(name, parts[0] if len(parts) == 1 else np.concatenate(parts))
        self._pending.clear()
        self._pending_rows = 0
        self._check_io()

    def _check_io(self) -> None:
        """After the first failed write (e.g. a full disk): discard the temporary file and stop."""
        err = self._io.error
        if err is not None:
            problem = OfflineRLError(
                f"{self.path}: writing failed ({err.strerror or err}); nothing was saved and the "
                "destination is left as it was"
            )
            self.abort(problem)
            raise problem

    def add_raw(self, raw: fmt.RawDataset) -> None:
        """Append every episode of an in-memory dataset (e.g. another file), keeping its policy ids."""
        arrays = {
            fmt.OBSERVATIONS: raw.observations.astype(self.observation_space.dtype, copy=False),
            fmt.ACTIONS: raw.actions,
            fmt.REWARDS: raw.rewards.astype(np.float32, copy=False),
            fmt.NEXT_OBSERVATIONS: raw.next_observations.astype(self.observation_space.dtype, copy=False),
            fmt.TERMINALS: raw.terminals.astype(bool, copy=False),
            fmt.TIMEOUTS: raw.timeouts.astype(bool, copy=False),
        }
        has_lp = raw.action_log_probs is not None
        if self._has_log_probs is None:
            self._has_log_probs = has_lp
        elif self._has_log_probs != has_lp:
            raise OfflineRLError(f"{self.path}: every episode or none must carry action_log_probs")
        if raw.action_log_probs is not None:
            arrays[fmt.ACTION_LOG_PROBS] = raw.action_log_probs.astype(np.float32, copy=False)
        for key, value in raw.infos.items():
            arrays[f"{fmt.INFOS}/{key}"] = value
        lengths = np.diff(np.concatenate([[0], raw.episode_ends])).tolist()
        if raw.episode_policy_ids is not None and raw.policies:
            ids = [self.policy_id(raw.policies[int(i)]) for i in raw.episode_policy_ids]
        else:
            ids = [self.policy_id("unknown")] * len(lengths)
        self._write_rows(arrays, lengths, ids)

    def close(self) -> Path:
        """Write the episode index and attributes, then atomically move the file into place."""
        if self._closed:
            return self.path
        f = self._file
        assert f is not None
        if not self._episode_ends:
            self.abort(OfflineRLError("no episodes"))
            raise OfflineRLError(f"{self.path}: no episode was written; nothing saved")
        self._flush()
        f.create_dataset(fmt.EPISODE_ENDS, data=np.asarray(self._episode_ends, dtype=np.int64))
        f.create_dataset(fmt.EPISODE_POLICY_IDS, data=np.asarray(self._episode_policy_ids, dtype=np.int32))
        f.attrs[fmt.ATTR_VERSION] = np.int64(fmt.FORMAT_VERSION)
        f.attrs[fmt.ATTR_OBS_SPACE] = space_to_json(self.observation_space)
        f.attrs[fmt.ATTR_ACT_SPACE] = space_to_json(self.action_space)
        if self.env_id is not None:
            f.attrs[fmt.ATTR_ENV_ID] = self.env_id
        if self.env_spec is not None:
            f.attrs[fmt.ATTR_ENV_SPEC] = self.env_spec
        meta = {"created": _now(), "package_versions": package_versions(), **self.metadata}
        f.attrs[fmt.ATTR_METADATA] = json.dumps(meta, sort_keys=True, default=str)
        f.attrs[fmt.ATTR_POLICIES] = json.dumps(self._policies, default=str)
        if self.ref_min_return is not None and self.ref_max_return is not None:
            f.attrs[fmt.ATTR_REF_MIN] = float(self.ref_min_return)
            f.attrs[fmt.ATTR_REF_MAX] = float(self.ref_max_return)
        f.close()
        self._file = None
        self._check_io()
        self._io.close()
        self._closed = True
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the temporary file; the destination is left as it was."""
        if self._closed:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if getattr(self, "_io", None) is not None:
            self._io.close()
        self._closed = True
        err = exc or OfflineRLError("aborted")
        try:
            self._atomic.__exit__(type(err), err, None)
        except BaseException as raised:  # atomic_path re-raises what it was given
            if raised is not err:
                raise


def write_merged(path: str | os.PathLike[str], raws: Sequence[fmt.RawDataset], **writer_options: Any) -> Path:
    """Write the episodes of ``raws``, in order, as one new file (atomically). Log-probabilities are kept
    only if every part has them (the format wants all rows or none). ``writer_options`` go to
    :class:`DatasetWriter`; the spaces come from the first part."""
    if not raws:
        raise OfflineRLError(f"{path}: nothing to merge")
    keep_log_probs = all(r.action_log_probs is not None for r in raws)
    with DatasetWriter(path, raws[0].observation_space, raws[0].action_space, **writer_options) as w:
        for r in raws:
            w.add_raw(r if keep_log_probs else dataclasses.replace(r, action_log_probs=None))
    return Path(path)


def write_raw(raw: fmt.RawDataset, path: str | os.PathLike[str], *, compression: str | None = None) -> Path:
    """Write a whole in-memory dataset (e.g. after a conversion) as a new format-v1 file."""
    meta = dict(raw.metadata)
    meta.pop("created", None)
    meta.pop("package_versions", None)
    w = DatasetWriter(
        path,
        raw.observation_space,
        raw.action_space,
        env_id=raw.env_id,
        env_spec=raw.env_spec,
        metadata=meta,
        ref_min_return=raw.ref_min_return,
        ref_max_return=raw.ref_max_return,
        compression=compression,
    )
    with w:
        w.add_raw(raw)
    return Path(path)
