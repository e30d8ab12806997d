"""Resolution of ``--dataset`` values: a file path, or (once dataset suites exist) a named dataset."""

from __future__ import annotations

import os
from pathlib import Path

from offrl.errors import DatasetError


def resolve_dataset(name_or_path: str | os.PathLike[str]) -> str:
    """The file path for a ``--dataset`` value; a clear error when it names nothing."""
    path = Path(name_or_path)
    if path.exists():
        return str(path)
    raise DatasetError(str(name_or_path), "no such dataset file")
