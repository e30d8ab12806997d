"""Resolution of ``--dataset`` values: a file path, or the name of a dataset offrl can build or convert.

One function, :func:`resolve_dataset`, serves the CLI (train, ope, bench grids, info, validate) and the
Python API (``offrl.train.fit``); the data layer below it (``TransitionDataset.load``) takes paths only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from offrl.errors import DatasetError

MINARI_PREFIX = "minari:"


def known_names() -> list[str]:
    from offrl import builtin, suites

    return [*builtin.RECIPES, *suites.all_specs()]


def is_dataset_name(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` names a dataset (``minari:…``, ``builtin/…`` or a suite's) rather than a path."""
    text = str(value)
    if text.startswith(MINARI_PREFIX):
        return True
    if Path(text).exists():
        return False
    from offrl import builtin, suites

    return text in builtin.RECIPES or text in suites.all_specs()


def minari_cache_path(id_or_path: str) -> Path:
    """Where ``minari:ID`` is converted to: the data directory's ``minari/`` folder, one file per id and
    per state of the Minari dataset (its metadata, file sizes and modification times)."""
    from offrl.builtin import data_dir
    from offrl.data.minari_io import fingerprint

    key = json.dumps({"id": id_or_path, **fingerprint(id_or_path)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in id_or_path.strip("/"))
    return data_dir() / "minari" / f"{stem}-{digest}.h5"


def _resolve_minari(id_or_path: str, *, progress: bool) -> str:
    from offrl.data.minari_io import import_minari

    if not id_or_path:
        raise DatasetError(
            MINARI_PREFIX, "give a Minari dataset id after 'minari:', e.g. minari:D4RL/door/human-v2"
        )
    dest = minari_cache_path(id_or_path)
    if dest.exists():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    report = import_minari(id_or_path, dest)
    for stale in dest.parent.glob(f"{dest.name.rsplit('-', 1)[0]}-*.h5"):
        if stale != dest:  # conversions of an earlier state of the same Minari dataset
            stale.unlink(missing_ok=True)
    if progress:
        print(report.describe(), file=sys.stderr)
    return str(dest)


def resolve_dataset(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> str:
    """The file for a ``--dataset`` value: an existing path; ``minari:ID`` (or ``minari:FOLDER``), a Minari
    dataset of the local root converted once into the data directory's cache; or a named dataset
    (``builtin/…`` or a suite's, e.g. ``classic/pendulum-medium-replay``) built on first use into the data
    directory (``$OFFRL_DATA_DIR``)."""
    from offrl import builtin, suites

    name = str(name_or_path)
    if name.startswith(MINARI_PREFIX):
        return _resolve_minari(name[len(MINARI_PREFIX) :], progress=progress)
    path = Path(name_or_path)
    if path.exists():
        return str(path)
    if name in builtin.RECIPES:
        return str(builtin.ensure(name, progress=progress))
    if name in suites.all_specs():
        return str(suites.ensure(name, progress=progress))
    hint = suites.missing_manifests_hint()
    raise DatasetError(
        name,
        f"no such file, and not a named dataset (see `offrl datasets list`; e.g. {', '.join(known_names()[:4])}, "
        "or minari:ID)" + (f"; {hint}" if hint and "/" in name else ""),
    )
