"""D4RL import/export: which rows survive, where episodes end, what the report says, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import pytest

from offrl.cli import main
from offrl.data import convert
from offrl.data.format import load_checked, read_raw, validate
from offrl.data.writer import DatasetWriter
from offrl.errors import DatasetError

N = 10
# Episode A: rows 0-2 ends with a terminal; B: rows 3-6 ends with a timeout; C: rows 7-9 has no end flag.
TERMINAL_ROWS = [2]
TIMEOUT_ROWS = [6]


def d4rl_arrays(n: int = N) -> dict[str, Any]:
    i = np.arange(n, dtype=np.float32)
    terminals = np.zeros(n, dtype=bool)
    timeouts = np.zeros(n, dtype=bool)
    terminals[TERMINAL_ROWS] = True
    timeouts[TIMEOUT_ROWS] = True
    return {
        "observations": np.stack([i, i], axis=1),  # obs[i] = [i, i] identifies the row
        "actions": np.stack([0.05 * i, -0.05 * i], axis=1).astype(np.float32),
        "rewards": 10 * i,
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/action_log_probs": -i,
        "infos/qpos": np.stack([i, i + 0.5, i + 0.25], axis=1).astype(np.float64),
        "metadata/algorithm": "SAC",
        "metadata/seed": np.int64(7),
        "metadata/policy/fc0/weight": np.ones((4, 2), dtype=np.float32),
    }


def write_d4rl(path: Path, arrays: dict[str, Any]) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def kept_rows(raw: Any) -> list[int]:
    return [int(v) for v in raw.observations[:, 0]]


def test_import_without_next_observations_drops_rows_without_a_successor(tmp_path: Path) -> None:
    src = write_d4rl(tmp_path / "d4rl.hdf5", d4rl_arrays())
    out = tmp_path / "out.h5"
    report = convert.import_d4rl(src, out)
    assert validate(out) == []
    raw = read_raw(out)

    # row 6 (timeout) and row 9 (final, unflagged) are dropped; rows 5 and 8 then end their episodes
    assert kept_rows(raw) == [0, 1, 2, 3, 4, 5, 7, 8]
    assert raw.next_observations[:, 0].tolist() == [1, 2, 2, 4, 5, 6, 8, 9]  # row 2: placeholder copy
    assert raw.terminals.tolist() == [False, False, True, False, False, False, False, False]
    assert raw.timeouts.tolist() == [False, False, False, False, False, True, False, True]
    assert raw.episode_ends.tolist() == [3, 6, 8]
    assert raw.rewards.tolist() == [0, 10, 20, 30, 40, 50, 70, 80]
    assert raw.action_log_probs is not None
    assert raw.action_log_probs.tolist() == [0, -1, -2, -3, -4, -5, -7, -8]
    assert raw.infos["qpos"][:, 0].tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    np.testing.assert_allclose(raw.actions[:, 0], 0.05 * np.array([0, 1, 2, 3, 4, 5, 7, 8]), rtol=1e-6)

    assert (report.rows_in, report.rows_kept, report.episodes) == (10, 8, 3)
    assert report.dropped == {convert.DROP_TIMEOUT: 1, convert.DROP_FINAL: 1}
    lines = report.describe().splitlines()
    assert lines[0] == (
        f"imported 10 rows from {src} into {out}: 8 kept in 3 episodes; dropped 2 rows "
        "(timeout row without next observation: 1, final row without next observation: 1)"
    )
    assert any("1 terminal row with a placeholder next observation" in line for line in lines[1:])
    assert any("spaces inferred" in line for line in lines[1:])

    assert isinstance(raw.action_space, gym.spaces.Box)
    assert raw.action_space.low.tolist() == [-1, -1] and raw.action_space.high.tolist() == [1, 1]
    assert raw.observation_space == gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    assert raw.metadata["converted_from"] == "d4rl"
    assert raw.metadata["source_file"] == "d4rl.hdf5"
    assert raw.metadata["d4rl_metadata"] == {"algorithm": "SAC", "seed": 7}  # the weight array is skipped
    assert raw.metadata["d4rl_import"]["dropped"] == report.dropped


def test_import_with_next_observations_keeps_every_row(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    obs = arrays["observations"]
    nxt = np.concatenate([obs[1:], [[10, 10]]]).astype(np.float32)
    nxt[2] = [100, 100]  # a terminal's successor is whatever the env returned
    nxt[6] = [6.5, 6.5]  # the true successor of the timeout row, not the next episode's reset
    arrays["next_observations"] = nxt
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    out = tmp_path / "out.h5"
    report = convert.import_d4rl(src, out)
    assert validate(out) == []
    raw = read_raw(out)

    assert kept_rows(raw) == list(range(10))
    np.testing.assert_array_equal(raw.next_observations, nxt)
    assert np.flatnonzero(raw.terminals).tolist() == [2]
    assert np.flatnonzero(raw.timeouts).tolist() == [6, 9]  # the unflagged tail ends with a timeout
    assert raw.episode_ends.tolist() == [3, 7, 10]
    assert report.dropped == {}
    assert report.describe().splitlines()[0].endswith("10 kept in 3 episodes; nothing dropped")
    assert any("final episode has no end flag" in note for note in report.notes)


def test_unflagged_reset_with_next_observations_splits_the_episode(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    nxt = np.concatenate([arrays["observations"][1:], [[10, 10]]]).astype(np.float32)
    nxt[4] = [-1, -1]  # row 4's successor is not row 5: an unrecorded episode boundary
    arrays["next_observations"] = nxt
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    raw = convert.read_d4rl(src)
    assert np.flatnonzero(raw.timeouts).tolist() == [4, 6, 9]
    assert raw.episode_ends.tolist() == [3, 5, 7, 10]


def test_terminal_and_timeout_on_the_same_row_is_a_terminal(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["timeouts"][2] = True  # row 2 already has terminal=1
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    report = convert.import_d4rl(src, tmp_path / "out.h5")
    raw = read_raw(tmp_path / "out.h5")
    assert kept_rows(raw) == [0, 1, 2, 3, 4, 5, 7, 8]  # row 2 is kept, not dropped as a timeout
    assert raw.terminals[2] and not raw.timeouts[2]
    assert report.dropped == {convert.DROP_TIMEOUT: 1, convert.DROP_FINAL: 1}
    assert any("1 row with both terminal and timeout set" in note for note in report.notes)


def test_missing_timeouts_are_treated_as_zero_and_reported(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    del arrays["timeouts"]
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    out = tmp_path / "out.h5"
    report = convert.import_d4rl(src, out)
    assert validate(out) == []
    raw = read_raw(out)
    # without timeouts, rows 3-9 are one episode; only the final row lacks a successor
    assert kept_rows(raw) == list(range(9))
    assert raw.episode_ends.tolist() == [3, 9]
    assert report.dropped == {convert.DROP_FINAL: 1}
    assert "'timeouts' is missing" in report.describe()


def test_episode_of_only_a_timeout_row_vanishes(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["timeouts"][3] = True  # row 3 follows a terminal, so its episode is just itself
    arrays["timeouts"][6] = False
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    report = convert.import_d4rl(src, tmp_path / "out.h5")
    raw = read_raw(tmp_path / "out.h5")
    assert kept_rows(raw) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert raw.episode_ends.tolist() == [3, 8]
    assert report.episodes == 2
    assert any("1 episode of only a dropped row vanished" in note for note in report.notes)


def test_rewards_of_shape_n_by_1_and_float_flags_are_accepted(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["rewards"] = arrays["rewards"].reshape(N, 1)
    arrays["terminals"] = arrays["terminals"].astype(np.float32)
    raw = convert.read_d4rl(write_d4rl(tmp_path / "d4rl.hdf5", arrays))
    assert raw.rewards.shape == (8,)
    assert raw.terminals.dtype == np.bool_


def test_missing_rewards_is_a_dataset_error(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    del arrays["rewards"]
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    with pytest.raises(DatasetError, match="required D4RL key 'rewards' is missing") as info:
        convert.import_d4rl(src, tmp_path / "out.h5")
    assert info.value.path == str(src)
    assert not (tmp_path / "out.h5").exists()


def test_length_mismatch_names_the_key(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["actions"] = arrays["actions"][:-1]
    src = write_d4rl(tmp_path / "d4rl.hdf5", arrays)
    with pytest.raises(DatasetError, match="'actions' has 9 rows but 'observations' has 10"):
        convert.read_d4rl(src)


def test_flags_other_than_zero_or_one_are_rejected(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["terminals"] = arrays["terminals"].astype(np.float32)
    arrays["terminals"][4] = 0.5
    with pytest.raises(
        DatasetError, match=r"'terminals' has values other than 0/1 in 1 rows \(first at row 4\)"
    ):
        convert.read_d4rl(write_d4rl(tmp_path / "d4rl.hdf5", arrays))


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    src = tmp_path / "d4rl.hdf5"
    src.write_text("hello")
    with pytest.raises(DatasetError, match="not an HDF5 file"):
        convert.read_d4rl(src)


def test_inferred_action_spaces(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["actions"][:, 1] *= 40  # dimension 1 leaves [-1, 1]: its bounds come from the data
    raw = convert.read_d4rl(write_d4rl(tmp_path / "a.hdf5", arrays))
    assert isinstance(raw.action_space, gym.spaces.Box)
    assert raw.action_space.low.tolist() == pytest.approx([-1, -0.05 * 40 * 9])
    assert raw.action_space.high.tolist() == [1, 0]

    arrays = d4rl_arrays()
    arrays["actions"] = np.array([0, 1, 3, 1, 0, 1, 2, 1, 0, 1], dtype=np.int64)
    raw = convert.read_d4rl(write_d4rl(tmp_path / "b.hdf5", arrays))
    assert raw.action_space == gym.spaces.Discrete(4)


def test_spaces_from_env_id(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["observations"] = np.repeat(arrays["observations"][:, :1], 3, axis=1).astype(np.float64)
    arrays["actions"] = arrays["actions"][:, :1]
    raw = convert.read_d4rl(write_d4rl(tmp_path / "p.hdf5", arrays), env_id="Pendulum-v1")
    assert raw.env_id == "Pendulum-v1"
    assert isinstance(raw.action_space, gym.spaces.Box)
    assert raw.action_space.high.tolist() == [2.0]
    # Pendulum's space is float32; the stored float64 is kept and the original dtype recorded
    assert raw.observation_space.dtype == np.float64
    assert raw.metadata["original_observation_dtype"] == "float32"

    arrays = d4rl_arrays()
    arrays["actions"] = (np.arange(N) % 2).astype(np.float32)  # CartPole actions stored as floats
    arrays["observations"] = np.repeat(arrays["observations"][:, :1], 4, axis=1)
    raw = convert.read_d4rl(write_d4rl(tmp_path / "c.hdf5", arrays), env_id="CartPole-v1")
    assert raw.action_space == gym.spaces.Discrete(2)
    assert raw.actions.dtype == np.int64

    with pytest.raises(
        DatasetError, match=r"'observations' rows have shape \(2,\), Pendulum-v1's space says \(3,\)"
    ):
        convert.read_d4rl(write_d4rl(tmp_path / "d.hdf5", d4rl_arrays()), env_id="Pendulum-v1")


def test_cli_import_then_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_d4rl(tmp_path / "d4rl.hdf5", d4rl_arrays())
    out = tmp_path / "out.h5"
    assert main(["convert", str(src), "--from", "d4rl", "--out", str(out)]) == 0
    assert validate(out) == []
    assert "imported 10 rows" in capsys.readouterr().out
    back = tmp_path / "back.hdf5"
    assert main(["convert", str(out), "--to", "d4rl", "--out", str(back)]) == 0
    assert "D4RL layout" in capsys.readouterr().out
    assert back.exists()

    assert (
        main(["convert", str(tmp_path / "missing.hdf5"), "--from", "d4rl", "--out", str(tmp_path / "x.h5")])
        == 1
    )
    assert "no such file" in capsys.readouterr().err
    # an existing destination is replaced only with --force
    assert main(["convert", str(src), "--from", "d4rl", "--out", str(back)]) == 1
    assert "--force" in capsys.readouterr().err and back.exists()
    assert main(["convert", str(src), "--from", "d4rl", "--out", str(back), "--force"]) == 0
    assert validate(back) == []


def assert_same_dataset(a: Any, b: Any) -> None:
    for key in (
        "observations",
        "actions",
        "rewards",
        "next_observations",
        "terminals",
        "timeouts",
        "episode_ends",
    ):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)
    if a.action_log_probs is None:
        assert b.action_log_probs is None
    else:
        np.testing.assert_array_equal(a.action_log_probs, b.action_log_probs)
    assert a.infos.keys() == b.infos.keys()
    for key in a.infos:
        np.testing.assert_array_equal(a.infos[key], b.infos[key], err_msg=key)
    assert a.observation_space == b.observation_space
    assert a.action_space == b.action_space
    assert a.env_id == b.env_id


def test_export_then_import_round_trip(tmp_path: Path) -> None:
    first = tmp_path / "first.h5"
    convert.import_d4rl(write_d4rl(tmp_path / "d4rl.hdf5", d4rl_arrays()), first)
    exported = convert.export_d4rl(first, tmp_path / "exported.hdf5")
    with h5py.File(exported, "r") as f:
        assert f["observations"].dtype == np.float32
        assert f["terminals"].dtype == np.bool_ and f["timeouts"].dtype == np.bool_
        assert f["next_observations"].shape == (8, 2)
        assert "infos/action_log_probs" in f and "infos/qpos" in f
    second = tmp_path / "second.h5"
    report = convert.import_d4rl(exported, second)
    assert report.dropped == {}
    assert_same_dataset(load_checked(first), load_checked(second))


def test_round_trip_restores_discrete_space_and_env_id(tmp_path: Path) -> None:
    src = tmp_path / "ours.h5"
    obs_space = gym.spaces.Box(-5, 5, (3,), np.float32)
    with DatasetWriter(src, obs_space, gym.spaces.Discrete(5), env_id="MyEnv-v0") as w:
        for ep, terminated in enumerate((True, False)):
            obs = np.arange(12, dtype=np.float32).reshape(4, 3) + ep
            w.add_episode(
                observations=obs[:3],
                actions=np.array([0, 2, 1]),
                rewards=np.ones(3),
                next_observations=obs[1:],
                terminated=terminated,
                infos={"cost": np.array([0.5, 1.5, 2.5], dtype=np.float32)},
            )
    exported = convert.export_d4rl(src, tmp_path / "exported.hdf5")
    again = tmp_path / "again.h5"
    report = convert.import_d4rl(exported, again)
    assert validate(again) == []
    # the space comes from the export's metadata, not inferred (which would say Discrete(3))
    assert_same_dataset(load_checked(src), load_checked(again))
    assert any("offrl export metadata" in note for note in report.notes)
    meta = read_raw(again).metadata
    assert "offrl_observation_space" not in meta.get("d4rl_metadata", {})
    assert json.loads(meta["d4rl_metadata"]["offrl_metadata"])["package_versions"]
