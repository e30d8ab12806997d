"""Logs of a real system in: from_arrays, tables (CSV, Parquet), and docs/your-data.md's snippets."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl.cli import main
from offrl.data import from_arrays
from offrl.data.format import load_checked, validate
from offrl.data.table import natural_key
from offrl.errors import DatasetError

# Two episodes: rows 0-3 end by a termination, rows 4-6 are cut (the log ends).
OBS = np.arange(14, dtype=np.float32).reshape(7, 2)
ACT = np.array([[0.1], [0.2], [-0.3], [0.4], [0.5], [-0.6], [0.7]], dtype=np.float32)
REW = np.arange(7, dtype=np.float64)


def test_from_arrays_derives_next_observations_and_drops_last_steps(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "logs.h5"
    report = from_arrays(
        path,
        observations=OBS,
        actions=ACT,
        rewards=REW,
        terminals=[0, 0, 0, 1, 0, 0, 0],
        timeouts=[0, 0, 0, 0, 0, 0, 1],
        action_space=(-1.0, 1.0),
    )
    assert "dropped 1 row (last step of an episode without a next observation: 1)" in capsys.readouterr().out
    assert report.rows_kept == 6 and report.episodes == 2
    assert validate(path) == []
    raw = load_checked(path)
    np.testing.assert_array_equal(raw.observations, OBS[:6])
    np.testing.assert_array_equal(raw.next_observations[:3], OBS[1:4])
    np.testing.assert_array_equal(
        raw.next_observations[3], OBS[3]
    )  # terminal: placeholder, never bootstrapped
    np.testing.assert_array_equal(raw.next_observations[4:], OBS[5:7])
    assert raw.terminals.tolist() == [0, 0, 0, 1, 0, 0]
    assert raw.timeouts.tolist() == [0, 0, 0, 0, 0, 1]
    assert raw.episode_ends.tolist() == [4, 6]
    assert raw.action_space == gym.spaces.Box(-1, 1, (1,), np.float32)


def test_from_arrays_with_episode_ends_and_next_observations_keeps_every_row(tmp_path: Path) -> None:
    nxt = OBS + 2
    nxt[3] = -1  # the terminal's successor
    from_arrays(
        tmp_path / "a.h5",
        observations=OBS,
        actions=np.array([0, 1, 2, 1, 0, 2, 1]),
        rewards=REW,
        episode_ends=[4, 7],
        terminals=[0, 0, 0, 1, 0, 0, 0],
        next_observations=nxt,
        action_space=3,
        env_id="CartPole-v1",
        quiet=True,
    )
    raw = load_checked(tmp_path / "a.h5")
    assert raw.num_transitions == 7 and raw.timeouts.tolist() == [0] * 6 + [1]
    assert raw.action_space == gym.spaces.Discrete(3) and raw.env_id == "CartPole-v1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"action_space": gym.spaces.Box(-np.inf, np.inf, (1,))},
            "continuous actions need explicit finite bounds",
        ),
        ({"action_space": (-0.5, 0.5)}, "'actions' outside the action-space bounds"),
        ({"rewards": np.r_[REW[:5], np.nan, 0]}, "'rewards' has NaN or inf at row 5"),
        ({"terminals": [0, 0, 2, 0, 0, 0, 0]}, "'terminals' has a value other than 0/1 at row 2"),
        ({"terminals": None, "timeouts": None}, "to mark where episodes end"),
        ({"episode_ends": [4, 6]}, "'episode_ends' ends at 6, expected the row count 7"),
        ({"actions": ACT[:5]}, "'actions' has 5 rows, 'rewards' has 7"),
    ],
)
def test_from_arrays_refuses_in_one_line(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    args = {
        "observations": OBS,
        "actions": ACT,
        "rewards": REW,
        "terminals": [0, 0, 0, 1, 0, 0, 0],
        "action_space": (-1.0, 1.0),
        **kwargs,
    }
    if "episode_ends" in kwargs:
        args["terminals"] = None
    with pytest.raises(DatasetError) as exc:
        from_arrays(tmp_path / "x.h5", quiet=True, **args)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "x.h5").exists()


def test_natural_order() -> None:
    assert sorted(["obs_10", "obs_2", "obs_1"], key=natural_key) == ["obs_1", "obs_2", "obs_10"]


def _table_rows() -> dict[str, list]:  # type: ignore[type-arg]
    """12 columns so that obs_10 and obs_11 sort after obs_2; rows shuffled across episodes."""
    rows: dict[str, list] = {"episode": [], "t": [], "reward": [], "act_0": [], "done": []}  # type: ignore[type-arg]
    for j in range(12):
        rows[f"obs_{j}"] = []
    order = [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1), (1, 1), (0, 3)]
    for ep, t in order:
        rows["episode"].append(f"run-{ep}")
        rows["t"].append(t)
        rows["reward"].append(float(10 * ep + t))
        rows["act_0"].append(0.1 * t - 0.1)
        rows["done"].append(int(ep == 0 and t == 3))
        for j in range(12):
            rows[f"obs_{j}"].append(float(100 * ep + 10 * t + j))
    return rows


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_table_import_sorts_rows_and_orders_columns_naturally(tmp_path: Path, suffix: str) -> None:
    pa = pytest.importorskip("pyarrow")
    table = pa.table(_table_rows())
    src = tmp_path / f"logs.{suffix}"
    if suffix == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, src)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, src)
    out = tmp_path / "logs.h5"
    argv = f"convert {src} --from table --episode episode --step t --obs obs_* --action act_0 --reward reward --terminal done --action-low -1 --action-high 1 --out {out}"
    assert main(shlex.split(argv)) == 0
    raw = load_checked(out)
    # run-0: 4 steps ending in a terminal (kept whole); run-1: 3 steps cut, its last step dropped
    assert raw.episode_ends.tolist() == [4, 6]
    assert raw.terminals.tolist() == [0, 0, 0, 1, 0, 0] and raw.timeouts.tolist() == [0] * 5 + [1]
    np.testing.assert_array_equal(raw.observations[:, 0], [0, 10, 20, 30, 100, 110])
    np.testing.assert_array_equal(raw.observations[0], np.arange(12))  # obs_2 before obs_10
    np.testing.assert_array_equal(raw.rewards, [0, 1, 2, 3, 10, 11])


def _write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


HEADER = "ep,step,obs_a,obs_b,act,r,term"
GOOD = ["0,0,1,2,0.5,1,0", "0,1,1,2,0.5,1,1", "1,0,1,2,0.5,1,0", "1,1,1,2,0.5,1,0"]


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([*GOOD[:2], "1,0,1,x,0.5,1,0", GOOD[3]], "", "column 'obs_b' row 2: 'x' is not a number"),
        ([*GOOD[:2], "1,0,1,,0.5,1,0", GOOD[3]], "", "column 'obs_b' row 2: empty (no value)"),
        ([*GOOD[:3], "1,1,1,2,3.5,1,0"], "", "column 'act' row 3: 3.5 is outside [-1.0, 1.0]"),
        (
            ["0,0,1,2,0.5,1,1", *GOOD[1:]],
            "",
            "column 'term' row 0: set on a row that does not end its episode",
        ),
        ([*GOOD[:3], "1,1,1,2,0.5,1,2"], "", "column 'term' row 3: 2 is not 0/1"),
        ([*GOOD[:3], "1,0,1,2,0.5,1,0"], "", "column 'step' row 3: step 0 repeats row 2 in its episode"),
        (GOOD, "--obs 'pos_*'", "--obs 'pos_*' matches no column"),
        (GOOD, "--action-low none", "--action-low"),
    ],
)
def test_table_rejections_name_column_and_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[str], extra: str, message: str
) -> None:
    pytest.importorskip("pyarrow")
    src = _write_csv(tmp_path / "bad.csv", HEADER, *rows)
    argv = shlex.split(
        f"convert {src} --from table --episode ep --step step --obs 'obs_*' --action act --reward r "
        f"--terminal term --action-low -1 --action-high 1 --out {tmp_path / 'x.h5'}"
    )
    extra_args = shlex.split(extra)
    if extra_args:
        i = argv.index(extra_args[0])
        argv[i + 1] = extra_args[1]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.h5").exists()


def test_table_continuous_actions_need_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyarrow")
    src = _write_csv(tmp_path / "logs.csv", HEADER, *GOOD)
    argv = f"convert {src} --from table --episode ep --obs obs_a,obs_b --action act --reward r --out {tmp_path / 'x.h5'}"
    assert main(shlex.split(argv)) == 1
    assert "give --action-low and --action-high" in capsys.readouterr().err


def test_table_discrete_actions(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    src = _write_csv(
        tmp_path / "logs.csv", "ep,o,a,r", "5,0.0,1,1", "5,1.0,0,1", "5,2.0,2,1", "3,7.0,1,0", "3,8.0,1,0"
    )
    out = tmp_path / "x.h5"
    assert (
        main(
            shlex.split(
                f"convert {src} --from table --episode ep --obs o --action a --reward r --action-n 4 --out {out}"
            )
        )
        == 0
    )
    raw = load_checked(out)
    assert raw.action_space == gym.spaces.Discrete(4)
    np.testing.assert_array_equal(raw.observations[:, 0], [7.0, 0.0, 1.0])  # episode 3 sorts first
    assert raw.episode_ends.tolist() == [1, 3]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_your_data_doc_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/your-data.md: its Python snippets in order, then its `offrl` commands."""
    pytest.importorskip("pyarrow")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "your-data.md").read_text()
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "your_data_doc"}
    for block in _blocks(doc, "python"):
        exec(compile(block, "docs/your-data.md", "exec"), namespace)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does for the command line
    ran = 0
    for block in _blocks(doc, "bash"):
        for line in block.splitlines():
            line = line.removeprefix("PYTHONPATH=. ")
            if line.startswith("offrl "):
                assert main(shlex.split(line)[1:]) == 0, line
                ran += 1
    assert ran == 7
