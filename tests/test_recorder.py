"""Recording episodes into format-v1 files: flags, quotas, ordering, log-probs, atomicity, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl.cli import main as cli_main
from offrl.data import read_raw, validate
from offrl.data.format import RawDataset
from offrl.data.recorder import record, split_quota
from offrl.errors import ConfigError, OfflineRLError
from offrl.policies import RandomPolicy
from offrl.types import Policy

HELPER = Path(__file__).with_name("_killed_recorder.py")


class LinearCartPole:
    """Deterministic bang-bang controller: some episodes reach the 500-step time limit, some fall."""

    is_stochastic = False

    def __repr__(self) -> str:
        return "linear-cartpole"

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        # elementwise, not a matmul: a row's action must not depend on how many rows come with it
        score = -0.1 * obs[:, 1] + obs[:, 2] + 0.1 * obs[:, 3]
        return (score > 0).astype(np.int64)


class LinearPendulum:
    is_stochastic = False

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        torque = -1.5 * obs[:, 1] - 0.3 * obs[:, 2]
        return np.clip(torque, -2.0, 2.0).astype(np.float32)[:, None]


class CloseSpy(gym.Wrapper):
    was_closed = False

    def close(self) -> None:
        self.was_closed = True
        super().close()


def _random(env_id: str, seed: int = 0) -> RandomPolicy:
    return RandomPolicy(gym.make(env_id).action_space, seed=seed)


def _lengths(raw: RawDataset) -> list[int]:
    return np.diff(np.concatenate([[0], raw.episode_ends])).tolist()


def _assert_no_fake_transitions(raw: RawDataset, reset_bound: np.ndarray) -> None:
    """Rows chain inside episodes, and each episode starts from a fresh reset, not the last final obs."""
    starts, ends = raw.episode_starts, raw.episode_ends
    for s, e in zip(starts, ends):
        np.testing.assert_array_equal(raw.next_observations[s : e - 1], raw.observations[s + 1 : e])
        assert (np.abs(raw.observations[s]) <= reset_bound).all(), (
            f"episode at row {s} starts outside reset range"
        )
    for s in starts[1:]:
        assert not np.array_equal(raw.observations[s], raw.next_observations[s - 1])


def test_split_quota() -> None:
    assert split_quota(7, 3) == [3, 2, 2]
    assert split_quota(6, 3) == [2, 2, 2]
    assert split_quota(1, 1) == [1]


def test_cartpole_episodes_random_policy(tmp_path: Path) -> None:
    out = record("CartPole-v1", _random("CartPole-v1"), episodes=5, seed=3, num_envs=2, out=tmp_path / "c.h5")
    assert validate(out) == []
    raw = read_raw(out)
    assert raw.num_episodes == 5
    assert raw.actions.dtype == np.int64
    flags = raw.terminals | raw.timeouts
    assert flags[raw.episode_ends - 1].all() and flags.sum() == 5
    assert raw.terminals[raw.episode_ends - 1].all()  # random play never reaches CartPole's 500-step limit
    # CartPole resets every state variable uniformly in [-0.05, 0.05]
    _assert_no_fake_transitions(raw, np.full(4, 0.05))
    # random policy: exact log-probabilities of its uniform choice among 2
    assert raw.action_log_probs is not None
    np.testing.assert_array_equal(
        raw.action_log_probs, np.full(raw.num_transitions, -math.log(2), np.float32)
    )


def test_pendulum_steps_cut_with_timeout(tmp_path: Path) -> None:
    out = record("Pendulum-v1", _random("Pendulum-v1"), steps=450, seed=0, num_envs=2, out=tmp_path / "p.h5")
    assert validate(out) == []
    raw = read_raw(out)
    assert raw.num_transitions == 450
    # per sub-env 225 steps: one full 200-step episode (time limit), then 25 steps cut by the quota
    assert _lengths(raw) == [200, 25, 200, 25]
    assert raw.timeouts[raw.episode_ends - 1].all() and not raw.terminals.any()
    # Pendulum resets theta uniformly in [-pi, pi] and its velocity in [-1, 1]
    _assert_no_fake_transitions(raw, np.array([1.0, 1.0, 1.0]))
    assert raw.action_log_probs is not None  # uniform over [-2, 2]: -log 4
    np.testing.assert_array_equal(raw.action_log_probs, np.full(450, -math.log(4.0), np.float32))


def test_cartpole_steps_only_last_episode_cut(tmp_path: Path) -> None:
    out = record("CartPole-v1", _random("CartPole-v1"), steps=101, out=tmp_path / "c.h5", seed=1)
    raw = read_raw(out)
    assert validate(out) == [] and raw.num_transitions == 101
    ends = raw.episode_ends
    assert raw.timeouts[-1] and not raw.terminals[-1]
    assert raw.terminals[ends[:-1] - 1].all() and raw.timeouts.sum() == 1


@pytest.mark.parametrize(
    ("env_id", "policy", "quota"),
    [("CartPole-v1", LinearCartPole(), {"episodes": 7}), ("Pendulum-v1", LinearPendulum(), {"steps": 700})],
)
def test_vectorised_equals_concatenated_single_env(
    tmp_path: Path, env_id: str, policy: Policy, quota: dict[str, int]
) -> None:
    (key, total), k, seed = next(iter(quota.items())), 3, 11
    vec = read_raw(record(env_id, policy, seed=seed, num_envs=k, out=tmp_path / "vec.h5", **quota))
    singles = [
        read_raw(record(env_id, policy, seed=seed + i, out=tmp_path / f"s{i}.h5", **{key: q}))
        for i, q in enumerate(split_quota(total, k))
    ]
    assert vec.action_log_probs is None  # a deterministic policy has none
    for name in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(
            getattr(vec, name), np.concatenate([getattr(s, name) for s in singles]), name
        )
    assert _lengths(vec) == [n for s in singles for n in _lengths(s)]
    assert len(set(_lengths(vec))) > 1  # episodes of different lengths, so the order is really tested
    if env_id == "CartPole-v1":
        assert vec.num_episodes == 7 and vec.timeouts.any() and vec.terminals.any()


def test_metadata_spec_and_env_forms(tmp_path: Path) -> None:
    out = record(
        "CartPole-v1",
        LinearCartPole(),
        episodes=2,
        seed=5,
        out=tmp_path / "m.h5",
        metadata={"level": "medium", "seed": -1},
        policy_description={"kind": "linear"},
        ref_min_return=0.0,
        ref_max_return=500.0,
        obs_dtype="float64",
        compression="lzf",
    )
    assert validate(out) == []
    raw = read_raw(out)
    assert raw.env_id == "CartPole-v1" and raw.policies == [{"kind": "linear"}]
    assert raw.env_spec is not None and json.loads(raw.env_spec)["id"] == "CartPole-v1"
    m = raw.metadata
    assert m["level"] == "medium" and m["seed"] == 5  # the recorder's own keys win
    assert (m["episodes"], m["steps"], m["num_envs"], m["deterministic"]) == (2, None, 1, True)
    assert m["policy"] == {"kind": "linear"} and m["env_id"] == "CartPole-v1"
    assert (raw.ref_min_return, raw.ref_max_return) == (0.0, 500.0)
    assert raw.observations.dtype == np.float64 and m["original_observation_dtype"] == "float32"

    # an env instance and a factory give the id from the spec and the same data; the recorder
    # closes the envs it made, never one it was handed
    handed = CloseSpy(gym.make("CartPole-v1"))
    a = read_raw(record(handed, LinearCartPole(), episodes=2, seed=5, out=tmp_path / "a.h5"))
    made: list[CloseSpy] = []

    def factory() -> gym.Env:
        made.append(CloseSpy(gym.make("CartPole-v1")))
        return made[-1]

    b = read_raw(record(factory, LinearCartPole(), episodes=2, seed=5, out=tmp_path / "b.h5"))
    assert not handed.was_closed and len(made) == 1 and made[0].was_closed
    for r in (a, b):
        assert r.env_id == "CartPole-v1" and r.policies == ["linear-cartpole"]
        np.testing.assert_array_equal(r.observations, raw.observations.astype(np.float32))


def test_deterministic_flag_controls_log_probs(tmp_path: Path) -> None:
    raw = read_raw(
        record("CartPole-v1", _random("CartPole-v1"), episodes=1, deterministic=True, out=tmp_path / "d.h5")
    )
    assert raw.action_log_probs is None and raw.metadata["deterministic"] is True


def test_bad_arguments(tmp_path: Path) -> None:
    pol = LinearCartPole()
    with pytest.raises(ConfigError, match="exactly one"):
        record("CartPole-v1", pol, episodes=1, steps=5, out=tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="exactly one"):
        record("CartPole-v1", pol, out=tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        record("CartPole-v1", pol, steps=0, out=tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="num_envs=2"):
        record(gym.make("CartPole-v1"), pol, episodes=2, num_envs=2, out=tmp_path / "x.h5")
    assert list(tmp_path.iterdir()) == []


def test_error_mid_recording_leaves_destination(tmp_path: Path) -> None:
    class Failing(LinearCartPole):
        calls = 0

        def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
            self.calls += 1
            if self.calls > 300:  # after several episodes have been written
                raise RuntimeError("policy crashed")
            return super().act(obs)

    dest = tmp_path / "d.h5"
    dest.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="policy crashed"):
        record("CartPole-v1", Failing(), steps=10_000, out=dest)
    assert dest.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]  # temporary file removed


def test_discrete_actions_from_float_policy_stored_as_int64(tmp_path: Path) -> None:
    class FloatActions(LinearCartPole):
        def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
            return super().act(obs).astype(np.float64)

    raw = read_raw(record("CartPole-v1", FloatActions(), episodes=2, num_envs=2, out=tmp_path / "f.h5"))
    assert raw.actions.dtype == np.int64 and set(np.unique(raw.actions)) == {0, 1}


def test_policy_returning_wrong_batch_is_named(tmp_path: Path) -> None:
    class OneAction(LinearCartPole):
        def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
            return np.zeros(1, dtype=np.int64)

    with pytest.raises(OfflineRLError, match="shape"):
        record("CartPole-v1", OneAction(), episodes=4, num_envs=2, out=tmp_path / "x.h5")


def test_progress_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OFFRL_NO_PROGRESS", raising=False)
    record("CartPole-v1", LinearCartPole(), steps=20, out=tmp_path / "a.h5")
    assert "record CartPole-v1" in capsys.readouterr().err
    record("CartPole-v1", LinearCartPole(), steps=20, out=tmp_path / "b.h5", progress=False)
    monkeypatch.setenv("OFFRL_NO_PROGRESS", "1")
    record("CartPole-v1", LinearCartPole(), steps=20, out=tmp_path / "c.h5")
    assert capsys.readouterr().err == ""


def test_sigkill_leaves_destination_untouched(tmp_path: Path) -> None:
    existing, fresh = tmp_path / "old" / "data.h5", tmp_path / "new" / "data.h5"
    existing.parent.mkdir()
    fresh.parent.mkdir()
    before = b"an earlier recording" * 100
    existing.write_bytes(before)
    procs = {dest: subprocess.Popen([sys.executable, str(HELPER), str(dest)]) for dest in (existing, fresh)}

    def writing(dest: Path) -> bool:  # bytes in the temporary file, or (a defect) in the destination
        touched = dest.read_bytes() != before if dest == existing else dest.exists()
        return touched or any(p.stat().st_size > 0 for p in dest.parent.glob(".data.h5.*.tmp"))

    try:
        for dest, proc in procs.items():
            deadline = time.monotonic() + 60
            while not writing(dest):
                assert proc.poll() is None, f"recorder exited early with {proc.returncode}"
                assert time.monotonic() < deadline, "recorder never started writing"
                time.sleep(0.05)
        time.sleep(0.3)  # let it write episodes
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL  # killed mid-recording, not finished
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert existing.read_bytes() == before
    assert not fresh.exists()
    for dest in procs:  # the half-written file is only ever the temporary one
        assert next(p.name for p in dest.parent.iterdir() if p.name != "data.h5").endswith(".tmp")


def test_cli_record(tmp_path: Path) -> None:
    p = tmp_path / "cli.h5"
    assert (
        cli_main(
            ["record", "--env", "CartPole-v1", "--episodes", "3", "--seed", "1", "--out", str(p), "--quiet"]
        )
        == 0
    )
    raw = read_raw(p)
    assert validate(p) == [] and raw.num_episodes == 3 and raw.metadata["seed"] == 1
    assert raw.policies == ["random"]
    assert os.path.getsize(p) > 0
