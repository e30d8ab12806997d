"""Growing a dataset file: append the episodes of another file of the same environment, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py

from offrl.data.format import OBSERVATIONS, RawDataset, read_raw
from offrl.data.writer import write_merged
from offrl.errors import DatasetError


def read_checked_env(path: str | os.PathLike[str], env: str) -> RawDataset:
    """``path`` read, after checking that it was recorded in ``env`` and carries no per-step infos
    (which appended episodes recorded elsewhere could not supply)."""
    raw = read_raw(path)
    if raw.env_id != env:
        recorded = f"was recorded in {raw.env_id!r}" if raw.env_id else "names no environment"
        raise DatasetError(
            path, f"{recorded}, but --env is {env!r}; use a file of that environment or a new one"
        )
    if raw.infos:
        raise DatasetError(
            path,
            f"carries per-step infos ({', '.join(sorted(raw.infos))}) that deployed rounds cannot supply; "
            "start from a copy without them",
        )
    return raw


def _compression(path: Path) -> str | None:
    with h5py.File(path, "r") as f:
        comp = f[OBSERVATIONS].compression
    return comp if comp in ("lzf", "gzip") else None


def append_episodes(
    dest: str | os.PathLike[str],
    part: str | os.PathLike[str],
    env: str,
    *,
    marker_key: str,
    marker: dict[str, Any],
    description: str,
) -> int:
    """Merge the episodes of ``part`` after those of ``dest`` (created when missing, with
    ``description``) and replace ``dest`` in one rename, so a crash leaves the old file intact.
    ``marker`` is appended to the list in the file's metadata under ``marker_key``, so that an append
    is recognised after a crash. Returns the merged row count.

    Action log-probabilities are kept only when both sides carry them (the format wants all or none).
    """
    dest = Path(dest)
    new = read_raw(part)
    old = read_checked_env(dest, env) if dest.exists() else None
    raws = [new] if old is None else [old, new]
    base = raws[0]
    meta = {k: v for k, v in base.metadata.items() if k not in ("created", "package_versions")}
    if old is None:  # the recorder's keys describe the appended part, not the file
        meta = {"description": description}
    meta[marker_key] = [*meta.get(marker_key, []), marker]
    write_merged(
        dest,
        raws,
        env_id=base.env_id,
        env_spec=base.env_spec,
        metadata=meta,
        ref_min_return=base.ref_min_return,
        ref_max_return=base.ref_max_return,
        compression=_compression(dest) if old is not None else None,
    )
    return sum(r.num_transitions for r in raws)
