"""experiments/d3rlpy/compare.py on hand-made records: offrl's run is read at d3rlpy's last step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "d3rlpy_compare", ROOT / "experiments" / "d3rlpy" / "compare.py"
)
assert spec is not None and spec.loader is not None
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _write(folder: Path, name: str, rec: dict[str, object]) -> None:
    (folder / "records").mkdir(parents=True, exist_ok=True)
    (folder / "records" / f"{name}.json").write_text(json.dumps({"status": "finished", **rec}))


def test_offrl_is_read_at_d3rlpys_last_step(tmp_path: Path) -> None:
    for seed, (at_30, at_52, theirs) in enumerate([(40.0, 80.0, 30.0), (50.0, 90.0, 20.0)]):
        evs = [{"step": 11730, "normalized_score": at_30}, {"step": 20332, "normalized_score": at_52}]
        _write(
            tmp_path,
            f"cql__p__s{seed}",
            {"cell": {"algo": "cql"}, "task": "p", "seed": seed, "evaluations": evs},
        )
        final = {"step": 11730, "normalized_score": theirs}
        _write(
            tmp_path,
            f"d3rlpy-cql__p__s{seed}",
            {
                "external": "d3rlpy",
                "cell_id": f"d3rlpy-cql__p__s{seed}",
                "task": "p",
                "seed": seed,
                "final": final,
            },
        )
    # an offrl run without an evaluation at that step is left out, not compared at another step
    _write(
        tmp_path,
        "bc__p__s0",
        {
            "cell": {"algo": "bc"},
            "task": "p",
            "seed": 0,
            "evaluations": [{"step": 20332, "normalized_score": 9.0}],
        },
    )
    _write(
        tmp_path,
        "d3rlpy-bc__p__s0",
        {
            "external": "d3rlpy",
            "cell_id": "d3rlpy-bc__p__s0",
            "task": "p",
            "seed": 0,
            "final": {"step": 11730, "normalized_score": 1.0},
        },
    )
    assert compare.pairs(tmp_path) == {("cql", "p"): {0: (40.0, 30.0, 11730), 1: (50.0, 20.0, 11730)}}
    lines = compare.section(tmp_path, "2.8.1")
    assert "| p | cql | 11730 | 2 | 45.0 | 25.0 |" in lines
    assert lines[0] == "## offrl beside d3rlpy 2.8.1 at equal gradient steps"


def test_same_settings_column_reads_the_other_folder_at_the_same_step(tmp_path: Path) -> None:
    table, alike = tmp_path / "table", tmp_path / "alike"
    for seed, (ours, theirs, same) in enumerate([(40.0, 80.0, 70.0), (50.0, 90.0, 96.0)]):
        evs = [{"step": 11730, "normalized_score": ours}]
        _write(
            table,
            f"cql__p__s{seed}",
            {"cell": {"algo": "cql"}, "task": "p", "seed": seed, "evaluations": evs},
        )
        _write(
            table,
            f"d3rlpy-cql__p__s{seed}",
            {
                "external": "d3rlpy",
                "cell_id": f"d3rlpy-cql__p__s{seed}",
                "task": "p",
                "seed": seed,
                "final": {"step": 11730, "normalized_score": theirs},
            },
        )
        evs = [{"step": 3910, "normalized_score": 0.0}, {"step": 11730, "normalized_score": same}]
        _write(
            alike,
            f"cql__p__s{seed}",
            {"cell": {"algo": "cql"}, "task": "p", "seed": seed, "evaluations": evs},
        )
    lines = compare.section(table, "2.8.1", alike)
    assert "| p | cql | 11730 | 2 | 45.0 | 85.0 | 83.0 |" in lines
    # one seed missing on the third side: no mean of fewer seeds than the row says
    (alike / "records" / "cql__p__s1.json").unlink()
    assert "| p | cql | 11730 | 2 | 45.0 | 85.0 | |" in compare.section(table, "2.8.1", alike)
    (alike / "records" / "cql__p__s1.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "cell": {"algo": "cql"},
                "task": "p",
                "seed": 1,
                "evaluations": [{"step": 11730, "normalized_score": 96.0}],
            }
        )
    )
    assert lines[4].endswith("| offrl at d3rlpy's settings |")
    iqm_row = next(line for line in lines if line.startswith("| cql | 1 |"))
    assert iqm_row.count("[") == 3  # a CI in each of the three columns
    # without the folder, the table has its two columns
    assert "| p | cql | 11730 | 2 | 45.0 | 85.0 |" in compare.section(table, "2.8.1")


def test_discrete_and_continuous_forms_are_apart(tmp_path: Path) -> None:
    for task, discrete in (("c", False), ("d", True)):
        evs = [{"step": 100, "normalized_score": 10.0}]
        _write(
            tmp_path,
            f"cql__{task}__s0",
            {"cell": {"algo": "cql"}, "task": task, "seed": 0, "evaluations": evs},
        )
        _write(
            tmp_path,
            f"d3rlpy-cql__{task}__s0",
            {
                "external": "d3rlpy",
                "cell_id": f"d3rlpy-cql__{task}__s0",
                "cell": {"info": {"discrete": discrete}},
                "task": task,
                "seed": 0,
                "final": {"step": 100, "normalized_score": 5.0},
            },
        )
    assert set(compare.pairs(tmp_path)) == {("cql (continuous)", "c"), ("cql (discrete)", "d")}


def test_more_d3rlpy_folders_add_rows_at_their_own_step(tmp_path: Path) -> None:
    """d3rlpy runs at another budget pair with the same offrl runs, read at that budget's last step."""
    table, full = tmp_path / "table", tmp_path / "full"
    evs = [{"step": 11730, "normalized_score": 40.0}, {"step": 20332, "normalized_score": 80.0}]
    _write(table, "cql__d__s0", {"cell": {"algo": "cql"}, "task": "d", "seed": 0, "evaluations": evs})
    for folder, step, theirs in ((table, 11730, 30.0), (full, 20332, 90.0)):
        _write(
            folder,
            "d3rlpy-cql__d__s0",
            {
                "external": "d3rlpy",
                "cell_id": "d3rlpy-cql__d__s0",
                "cell": {"info": {"discrete": True}},
                "task": "d",
                "seed": 0,
                "final": {"step": step, "normalized_score": theirs},
            },
        )
    assert compare.pairs(table, (full,)) == {
        ("cql (discrete)", "d"): {0: (40.0, 30.0, 11730)},
        ("cql (discrete) at 20,332 steps", "d"): {0: (80.0, 90.0, 20332)},
    }
    assert compare.pairs(table) == {("cql (discrete)", "d"): {0: (40.0, 30.0, 11730)}}
    # the third column reads offrl's run at d3rlpy's settings at each row's own step
    alike = tmp_path / "alike"
    evs = [{"step": 11730, "normalized_score": 70.0}, {"step": 20332, "normalized_score": 95.0}]
    _write(alike, "cql__d__s0", {"cell": {"algo": "cql"}, "task": "d", "seed": 0, "evaluations": evs})
    assert compare.same_settings(compare.pairs(table, (full,)), alike) == {
        ("cql (discrete)", "d"): {0: 70.0},
        ("cql (discrete) at 20,332 steps", "d"): {0: 95.0},
    }
    with pytest.raises(SystemExit, match="missing: no records folder"):
        compare.pairs(table, (tmp_path / "missing",))
