"""The training benchmark's offrl worker builds every benchmarked algorithm and steps it (a smoke test:
a renamed config field would otherwise only surface when someone runs the benchmark)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(autouse=True)
def _default_subnormals():  # type: ignore[no-untyped-def]
    yield
    torch.set_flush_denormal(False)  # the worker flushes subnormals process-wide, as the trainer does


@pytest.mark.parametrize(
    "algo,precision",
    [(a, "fp32") for a in bench.ALGOS] + [(a, "bf16") for a in sorted(bench.PRECISION_ALGOS)],
)
def test_offrl_worker_builds_and_steps(algo: str, precision: str) -> None:
    worker = bench.OfflineRLWorker(algo, precision, None)
    before = {k: v.clone() for k, v in worker.algo.nets.state_dict().items()}
    worker.step()
    after = worker.algo.nets.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "a step changed no parameter"
    assert worker.algo.discrete == (algo in bench.DISCRETE)
    assert worker.algo.runtime.precision == precision
