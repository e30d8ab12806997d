"""Metric sinks: a tiny protocol with JSON-lines, tensorboard and console implementations.

Keys are namespaced (``train/…``, ``eval/…``, ``time/…``) and logged against gradient steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are handled when it ends. The tensorboard writer
    takes locks in Python code; an interrupt raised between taking one and the ``with`` that releases it
    leaves it held, and closing the writer on the way out then waits forever. (Masking the signals would
    not do: the writer's thread would receive them, and Python raises in the main thread all the same.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):  # a Python-level handler we can put back (not SIG_DFL/SIG_IGN/foreign)
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for held in dict.fromkeys(caught):
            signal.raise_signal(held)  # now to the handler the block deferred


class TensorboardLogger:
    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        with signals_deferred():
            for k, v in metrics.items():
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        with signals_deferred():
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
