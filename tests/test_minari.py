"""Minari in and out through the minari package: datasets written by minari's own writer
(``create_dataset_from_buffers``; its ``DataCollector`` needs jax), converted array for array."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from offrl.cli import main
from offrl.data.format import load_checked, validate
from offrl.errors import DatasetError, OfflineRLError

minari = pytest.importorskip("minari")
from minari.data_collector.episode_buffer import EpisodeBuffer  # noqa: E402


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Minari root and offrl data directory for each test."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari-root"))
    monkeypatch.setenv("OFFRL_DATA_DIR", str(tmp_path / "offrl-data"))
    return tmp_path


def _episode(env: gym.Env, seed: int, steps: int, *, terminate: bool) -> EpisodeBuffer:
    """One episode of random actions, cut after ``steps`` steps with a truncation, or ended by the env's
    own termination (or, for an env that never terminates, a termination on the last step)."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    for t in range(10_000):
        action = env.action_space.sample()
        obs, reward, terminated, _, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        last = terminated or (t + 1 == steps)
        terms.append(bool(terminated or (terminate and last)))
        truncs.append(bool(last and not terminate))
        if last:
            break
    k = len(observations)
    return EpisodeBuffer(
        observations=np.asarray(observations),
        actions=np.asarray(actions),
        rewards=np.asarray(rewards),
        terminations=np.asarray(terms),
        truncations=np.asarray(truncs),
        infos={"step_index": np.arange(k, dtype=np.int64), "energy": np.linspace(0, 1, k)},
    )


def make_minari(dataset_id: str, env_id: str, **kwargs: Any) -> Any:
    """A Minari dataset written by minari: one terminated and two truncated episodes (Pendulum never
    terminates by itself, so its first episode ends with a termination flag)."""
    env = gym.make(env_id)
    episodes = [
        _episode(env, 0, 500, terminate=True),
        _episode(env, 1, 7, terminate=False),
        _episode(env, 2, 5, terminate=False),
    ]
    if env_id.startswith("Pendulum"):
        episodes[0] = _episode(env, 0, 9, terminate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(dataset_id, episodes, env=env, **kwargs)


CASES = [("test/cartpole/random-v0", "CartPole-v1"), ("test/pendulum/random-v0", "Pendulum-v1")]


@pytest.mark.parametrize(("dataset_id", "env_id"), CASES)
def test_minari_import_equals_minari_array_for_array(
    roots: Path, dataset_id: str, env_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_minari(dataset_id, env_id, ref_min_score=-10.0, ref_max_score=10.0)
    out = roots / "out.h5"
    assert main(["convert", dataset_id, "--from", "minari", "--out", str(out)]) == 0
    assert "nothing dropped" in capsys.readouterr().out
    assert validate(out) == []
    raw = load_checked(out)
    ds = minari.load_dataset(dataset_id)
    assert raw.num_episodes == ds.total_episodes == 3
    assert raw.num_transitions == ds.total_steps
    assert raw.env_id == env_id and raw.env_spec is not None
    assert (raw.ref_min_return, raw.ref_max_return) == (-10.0, 10.0)
    assert raw.action_space == ds.action_space
    starts = raw.episode_starts
    flags = []
    for ep, s, e in zip(ds.iterate_episodes(), starts, raw.episode_ends):
        np.testing.assert_array_equal(raw.observations[s:e], ep.observations[:-1])
        np.testing.assert_array_equal(raw.next_observations[s:e], ep.observations[1:])
        np.testing.assert_array_equal(raw.actions[s:e], ep.actions)
        np.testing.assert_array_equal(raw.rewards[s:e], ep.rewards.astype(np.float32))
        np.testing.assert_array_equal(raw.terminals[s:e], ep.terminations)
        np.testing.assert_array_equal(raw.timeouts[s:e], ep.truncations & ~ep.terminations)
        for key in ("step_index", "energy"):
            np.testing.assert_array_equal(raw.infos[key][s:e], ep.infos[key][1:])
        flags.append("terminal" if raw.terminals[e - 1] else "timeout")
    assert flags == ["terminal", "timeout", "timeout"]


def _record_offrl(path: Path) -> Path:
    """A format-v1 file with every optional part: infos, log-probabilities, reference returns, env spec."""
    from offrl.data.writer import DatasetWriter

    env = gym.make("Pendulum-v1")
    with DatasetWriter(
        path,
        env.observation_space,
        env.action_space,
        env_id="Pendulum-v1",
        env_spec=env.spec.to_json() if env.spec else None,
        ref_min_return=-1200.0,
        ref_max_return=-150.0,
    ) as w:
        rng = np.random.default_rng(0)
        for i, t in enumerate((6, 4, 9)):
            obs = rng.normal(size=(t + 1, 3)).astype(np.float32)
            w.add_episode(
                obs[:-1],
                rng.uniform(-2, 2, size=(t, 1)).astype(np.float32),
                rng.normal(size=t),
                obs[1:],
                terminated=i == 1,
                action_log_probs=rng.normal(size=t),
                infos={"cost": rng.normal(size=(t, 2))},
            )
    return path


def test_round_trip_offrl_minari_offrl_gives_identical_arrays(roots: Path) -> None:
    src = _record_offrl(roots / "src.h5")
    assert main(["convert", str(src), "--to", "minari", "--id", "offrl/pendulum/rt-v0"]) == 0
    ds = minari.load_dataset("offrl/pendulum/rt-v0")  # minari opens what offrl wrote
    a = load_checked(src)
    for ep, s, e in zip(ds.iterate_episodes(), a.episode_starts, a.episode_ends):
        np.testing.assert_array_equal(ep.observations[:-1], a.observations[s:e])
        np.testing.assert_array_equal(ep.observations[-1], a.next_observations[e - 1])
        np.testing.assert_array_equal(ep.actions, a.actions[s:e])
        np.testing.assert_array_equal(ep.rewards, a.rewards[s:e])
        np.testing.assert_array_equal(ep.terminations, a.terminals[s:e])
        np.testing.assert_array_equal(ep.truncations, a.timeouts[s:e])
    meta = ds.storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-1200.0, -150.0)
    assert ds.env_spec.id == "Pendulum-v1"

    back = roots / "back.h5"
    assert main(["convert", "offrl/pendulum/rt-v0", "--from", "minari", "--out", str(back)]) == 0
    b = load_checked(back)
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
        assert x.dtype == y.dtype and x.shape == y.shape, key
        np.testing.assert_array_equal(x, y, err_msg=key)
    np.testing.assert_array_equal(a.action_log_probs, b.action_log_probs)
    assert a.infos.keys() == b.infos.keys()
    np.testing.assert_array_equal(a.infos["cost"], b.infos["cost"])
    assert (a.observation_space, a.action_space) == (b.observation_space, b.action_space)
    assert (a.env_id, a.ref_min_return, a.ref_max_return) == (b.env_id, b.ref_min_return, b.ref_max_return)


def test_export_without_env_keeps_reference_returns(roots: Path) -> None:
    from offrl.data import from_arrays
    from offrl.data.minari_io import export_minari, read_minari

    path = roots / "logs.h5"
    from_arrays(
        path,
        observations=np.arange(12, dtype=np.float32).reshape(6, 2),
        actions=np.array([0, 1, 1, 0, 1, 0]),
        rewards=np.ones(6),
        episode_ends=[3, 6],
        terminals=[0, 0, 1, 0, 0, 0],
        next_observations=np.arange(2, 14, dtype=np.float32).reshape(6, 2),
        action_space=2,
        quiet=True,
    )
    export_minari(path, "offrl/logs-v0")
    ds = minari.load_dataset("offrl/logs-v0")
    assert ds.env_spec is None
    b, *_ = read_minari("offrl/logs-v0")
    assert b.env_id is None and b.env_spec is None
    np.testing.assert_array_equal(b.observations, load_checked(path).observations)


def test_missing_dataset_names_root_and_download_command(
    roots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", "D4RL/door/human-v2", "--from", "minari", "--out", str(roots / "x.h5")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(roots / "minari-root") in err[0] and "`minari download D4RL/door/human-v2`" in err[0]
    assert not (roots / "minari-root" / "D4RL").exists()  # nothing downloaded


def test_dict_observation_space_refused_in_one_line(roots: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,)), "b": gym.spaces.Box(-1, 1, (1,))})
    ep = EpisodeBuffer(
        observations={"a": np.zeros((3, 2), np.float32), "b": np.zeros((3, 1), np.float32)},
        actions=np.array([0, 1]),
        rewards=np.zeros(2),
        terminations=np.array([False, True]),
        truncations=np.array([False, False]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/dict-v0", [ep], observation_space=space, action_space=gym.spaces.Discrete(2)
        )
    assert main(["convert", "test/dict-v0", "--from", "minari", "--out", str(roots / "x.h5")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "observation space Dict(" in err[0] and "not supported" in err[0]


def test_episode_without_end_flag_is_closed_as_timeout_and_counted(roots: Path) -> None:
    from offrl.data.minari_io import import_minari

    ep = EpisodeBuffer(
        observations=np.arange(8, dtype=np.float32).reshape(4, 2),
        actions=np.array([[0.5], [0.1], [-0.2]], dtype=np.float32),
        rewards=np.ones(3),
        terminations=np.zeros(3, bool),
        truncations=np.zeros(3, bool),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/open-v0",
            [ep],
            observation_space=gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
            action_space=gym.spaces.Box(-1, 1, (1,), np.float32),
        )
    report = import_minari("test/open-v0", roots / "open.h5")
    assert (
        "1 episode ended with neither a termination nor a truncation: closed as timeouts" in report.describe()
    )
    raw = load_checked(roots / "open.h5")
    assert raw.timeouts.tolist() == [False, False, True] and raw.env_id is None


def test_minari_name_resolves_through_a_cache(roots: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from offrl.datasets_registry import resolve_dataset

    make_minari("test/cartpole/random-v0", "CartPole-v1")
    first = Path(resolve_dataset("minari:test/cartpole/random-v0", progress=False))
    assert first.parent == roots / "offrl-data" / "minari" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert Path(resolve_dataset("minari:test/cartpole/random-v0")) == first  # reused, not converted again
    assert first.stat().st_mtime_ns == stamp
    # the Minari dataset changes (a file's modification time): a new conversion replaces the old one
    data = roots / "minari-root" / "test" / "cartpole" / "random-v0" / "data" / "main_data.hdf5"
    os.utime(data, ns=(stamp + 10**9, stamp + 10**9))
    second = Path(resolve_dataset("minari:test/cartpole/random-v0", progress=False))
    assert second != first and second.exists() and not first.exists()

    assert main(["validate", "minari:test/cartpole/random-v0"]) == 0
    assert main(["info", "minari:test/cartpole/random-v0"]) == 0
    assert str(second) in capsys.readouterr().out


def test_iterate_refuses_minari() -> None:
    from offrl.iterate import IterateConfig

    with pytest.raises(OfflineRLError, match="iterate appends to its dataset file"):
        IterateConfig(env="CartPole-v1", algo="bc", dataset="minari:x/y-v0", rounds=1, steps_per_round=10)


def test_fit_and_evaluate_on_minari_without_env_flag(roots: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from offrl.train import fit

    make_minari("test/cartpole/random-v0", "CartPole-v1")
    result = fit(
        "bc", "minari:test/cartpole/random-v0", roots / "run", epochs=1, eval_every=0, show_progress=False
    )
    assert main(["evaluate", str(result.run_dir), "--episodes", "1"]) == 0
    assert capsys.readouterr().out.startswith("CartPole-v1: return")


def test_unknown_minari_folder_is_one_line(tmp_path: Path) -> None:
    from offrl.data.minari_io import data_folder

    with pytest.raises(DatasetError, match="not a Minari dataset"):
        data_folder(str(tmp_path))
