"""Resolution of ``--dataset`` values: a file path, or the name of a dataset offrl can build."""

from __future__ import annotations

import os
from pathlib import Path

from offrl.errors import DatasetError


def known_names() -> list[str]:
    from offrl import builtin, suites

    return [*builtin.RECIPES, *suites.all_specs()]


def resolve_dataset(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> str:
    """The file for a ``--dataset`` value: an existing path, or a named dataset (``builtin/…`` or a
    suite's, e.g. ``classic/pendulum-medium-replay``) built on first use into the data directory
    (``$OFFRL_DATA_DIR``)."""
    from offrl import builtin, suites

    path = Path(name_or_path)
    if path.exists():
        return str(path)
    name = str(name_or_path)
    if name in builtin.RECIPES:
        return str(builtin.ensure(name, progress=progress))
    if name in suites.all_specs():
        return str(suites.ensure(name, progress=progress))
    hint = suites.missing_manifests_hint()
    raise DatasetError(
        name,
        f"no such file, and not a named dataset (see `offrl datasets list`; e.g. {', '.join(known_names()[:4])})"
        + (f"; {hint}" if hint and "/" in name else ""),
    )
