"""The README's demo, on a small built-in dataset for one pass: it trains every algorithm it names from
the classic preset with the pinned runtime and prints its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offrl import demo


def test_demo_trains_each_algorithm_and_prints_the_table(
    tmp_path: Path, builtin_dataset, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    path = builtin_dataset("builtin/pendulum-mixed")
    monkeypatch.setattr(demo, "DATASET", "builtin/pendulum-mixed")
    monkeypatch.setattr(demo, "resolve_dataset", lambda name: path)
    monkeypatch.setattr(demo, "SETTINGS", {**demo.SETTINGS, "train.eval_episodes": 1})
    assert demo.main(["--out", str(tmp_path / "demo"), "--passes", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["algo"] for r in rows] == list(demo.ALGOS)
    assert all(r["passes"] == 1 and r["normalized"] is not None for r in rows)
    for algo in demo.ALGOS:
        run = json.loads((tmp_path / "demo" / f"{algo}-seed0" / "run.json").read_text())
        assert run["status"] == "finished"
        config = (tmp_path / "demo" / f"{algo}-seed0" / "config.toml").read_text()
        assert "threads = 1" in config and 'precision = "fp32"' in config
    assert set(demo.TABLE) == set(demo.ALGOS)  # the table's number beside each algorithm at demo.PASSES
    assert "after 1 pass (" in out and "table" in out


def test_demo_refuses_a_budget_below_one_pass(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--passes", "0"])
    assert exit_info.value.code == 2 and "--passes must be at least 1, got 0" in capsys.readouterr().err
