"""Shared test settings: fixed thread count (results differ between thread counts)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OFFRL_NO_PROGRESS", "1")
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``builtin_dataset(name) -> Path``: a built-in dataset built once per test session."""
    from offrl import builtin

    root = tmp_path_factory.mktemp("builtin-datasets")
    cache: dict[str, object] = {}

    def get(name: str):  # type: ignore[no-untyped-def]
        if name not in cache:
            cache[name] = builtin.build(name, root / f"{name.replace('/', '_')}.h5", progress=False)
        return cache[name]

    return get
