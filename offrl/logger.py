"""Metric sinks: a tiny protocol with JSON-lines, tensorboard and console implementations.

Keys are namespaced (``train/…``, ``eval/…``, ``time/…``) and logged against gradient steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class Logger(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per line: ``{"step": …, "train/loss": …}``; appends, so resumed runs continue."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 (held for the run)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else repr(v)) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


class TensorboardLogger:
    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class MultiLogger:
    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_enabled() -> bool:
    """Progress bars are on unless OFFRL_NO_PROGRESS is set (tests and CI logs)."""
    return not os.environ.get("OFFRL_NO_PROGRESS")
