"""Write → read round trips of format v1, writer atomicity, the full-pass sampler and batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from offrl.data import DatasetWriter, FullPassSampler, TransitionDataset, read_raw, validate, write_raw
from offrl.data import format as fmt
from offrl.spaces import space_from_json, space_to_json


def _episode(rng: np.random.Generator, space: gym.spaces.Box, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(observations, next_observations) of one episode: consecutive states of a random walk."""
    if np.issubdtype(space.dtype, np.integer):
        states = rng.integers(0, 256, (length + 1, *space.shape)).astype(space.dtype)
    else:
        states = rng.standard_normal((length + 1, *space.shape)).astype(space.dtype)
    return states[:-1], states[1:]


def _write(
    path: Path,
    obs_space: gym.spaces.Box,
    act_space: gym.Space,
    lengths: tuple[int, ...] = (5, 3, 4),
    **kw: Any,
) -> dict[str, np.ndarray]:
    """Write episodes of the given lengths (alternately terminated and truncated) and return the
    concatenated arrays that went in."""
    rng = np.random.default_rng(1)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "act", "rew", "next")}
    with DatasetWriter(path, obs_space, act_space, **kw) as w:
        for i, length in enumerate(lengths):
            obs, nxt = _episode(rng, obs_space, length)
            if isinstance(act_space, gym.spaces.Discrete):
                act = int(act_space.start) + rng.integers(0, int(act_space.n), length)
            else:
                act = rng.uniform(-1, 1, (length, *act_space.shape)).astype(act_space.dtype)
            rew = rng.standard_normal(length).astype(np.float32)
            w.add_episode(obs, act, rew, nxt, terminated=i % 2 == 0)
            for k, v in zip(("obs", "act", "rew", "next"), (obs, act, rew, nxt)):
                out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


BOX2 = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def test_box_float32_round_trip(tmp_path: Path) -> None:
    obs_space = gym.spaces.Box(-5.0, 5.0, (4,), np.float32)
    path = tmp_path / "d.h5"
    data = _write(path, obs_space, BOX2, env_id="Toy-v0", env_spec='{"id": "Toy-v0"}', metadata={"seed": 3})
    assert validate(path) == []
    raw = read_raw(path)
    assert raw.format_version == fmt.FORMAT_VERSION
    assert raw.observation_space == obs_space
    assert raw.action_space == BOX2
    np.testing.assert_array_equal(raw.observations, data["obs"])
    np.testing.assert_array_equal(raw.next_observations, data["next"])
    np.testing.assert_array_equal(raw.actions, data["act"])
    np.testing.assert_array_equal(raw.rewards, data["rew"])
    assert raw.observations.dtype == np.float32 and raw.rewards.dtype == np.float32
    assert raw.terminals.dtype == np.bool_ and raw.timeouts.dtype == np.bool_
    np.testing.assert_array_equal(raw.episode_ends, [5, 8, 12])
    assert raw.episode_ends.dtype == np.int64
    # episode 0 and 2 terminated, episode 1 truncated; exactly one flag, on the last row
    np.testing.assert_array_equal(np.flatnonzero(raw.terminals), [4, 11])
    np.testing.assert_array_equal(np.flatnonzero(raw.timeouts), [7])
    assert raw.env_id == "Toy-v0" and raw.env_spec == '{"id": "Toy-v0"}'
    assert raw.metadata["seed"] == 3
    assert "created" in raw.metadata and "numpy" in raw.metadata["package_versions"]
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1
        assert isinstance(f.attrs["format_version"], np.integer)
        assert f["observations"].chunks is not None and f["observations"].maxshape[0] is None


def test_uint8_images_stay_uint8(tmp_path: Path) -> None:
    obs_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    path = tmp_path / "img.h5"
    data = _write(path, obs_space, BOX2)
    with h5py.File(path) as f:
        assert f["observations"].dtype == np.uint8 and f["next_observations"].dtype == np.uint8
        assert f["observations"].shape == (12, 8, 8, 3)
    raw = read_raw(path)
    assert raw.observation_space == obs_space
    np.testing.assert_array_equal(raw.observations, data["obs"])
    ds = TransitionDataset(raw)
    assert ds.observations.dtype == torch.uint8  # held compactly, converted per batch
    batch = ds.batch(torch.tensor([0, 7]))
    assert batch.obs.dtype == torch.float32 and batch.obs.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batch.obs.numpy(), data["obs"][[0, 7]].astype(np.float32))


def test_float64_kept_unless_down_cast(tmp_path: Path) -> None:
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    kept = tmp_path / "f64.h5"
    data = _write(kept, obs_space, BOX2)
    raw = read_raw(kept)
    assert raw.observations.dtype == np.float64 and raw.observation_space.dtype == np.float64
    assert "original_observation_dtype" not in raw.metadata
    np.testing.assert_array_equal(raw.observations, data["obs"])

    cast = tmp_path / "f32.h5"
    _write(cast, obs_space, BOX2, obs_dtype="float32")
    assert validate(cast) == []
    raw = read_raw(cast)
    assert raw.observations.dtype == np.float32 and raw.next_observations.dtype == np.float32
    assert raw.observation_space.dtype == np.float32
    assert raw.metadata["original_observation_dtype"] == "float64"
    np.testing.assert_array_equal(raw.observations, data["obs"].astype(np.float32))


@pytest.mark.parametrize("start", [0, -1, 5])
def test_discrete_actions_round_trip(tmp_path: Path, start: int) -> None:
    act_space = gym.spaces.Discrete(3, start=start)
    path = tmp_path / "disc.h5"
    data = _write(path, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), act_space)
    assert validate(path) == []
    raw = read_raw(path)
    assert raw.action_space == act_space
    assert raw.actions.shape == (12,) and np.issubdtype(raw.actions.dtype, np.integer)
    np.testing.assert_array_equal(raw.actions, data["act"])  # stored in the env's own numbering
    ds = TransitionDataset(raw)
    assert ds.actions.dtype == torch.int64
    np.testing.assert_array_equal(ds.actions.numpy(), data["act"] - start)  # 0-based inside offrl


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
        gym.spaces.Box(np.array([-np.inf, 0.0, -1.0]), np.array([np.inf, 1.0, np.inf]), dtype=np.float64),
        gym.spaces.Box(
            np.full((2, 2), -np.inf, np.float32), np.array([[1.0, 2.0], [np.inf, 4.0]], np.float32)
        ),
    ],
    ids=["all-infinite", "mixed", "nested-2d"],
)
def test_infinite_bounds_are_strict_json(space: gym.spaces.Box) -> None:
    text = space_to_json(space)
    assert "Infinity" not in text and "NaN" not in text

    def refuse(const: str) -> None:
        raise AssertionError(f"non-standard JSON constant {const}")

    json.loads(text, parse_constant=refuse)
    back = space_from_json(text)
    assert back == space
    np.testing.assert_array_equal(back.low, space.low)
    np.testing.assert_array_equal(back.high, space.high)


def test_infinite_bounds_in_file(tmp_path: Path) -> None:
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    path = tmp_path / "inf.h5"
    _write(path, obs_space, BOX2)
    with h5py.File(path) as f:
        attr = f.attrs["observation_space"]
        assert "Infinity" not in attr
        assert json.loads(attr)["low"] == "-inf" and json.loads(attr)["high"] == "inf"
    assert read_raw(path).observation_space == obs_space


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_is_transparent(tmp_path: Path, compression: str) -> None:
    obs_space = gym.spaces.Box(-5.0, 5.0, (4,), np.float32)
    _write(tmp_path / "p.h5", obs_space, BOX2)
    plain = read_raw(tmp_path / "p.h5")
    path = tmp_path / "c.h5"
    _write(path, obs_space, BOX2, compression=compression)
    with h5py.File(path) as f:
        for key in fmt.PER_TRANSITION_KEYS:
            assert f[key].compression == compression
    assert validate(path) == []
    packed = read_raw(path)
    for key in fmt.PER_TRANSITION_KEYS:
        np.testing.assert_array_equal(getattr(packed, key), getattr(plain, key))


def test_log_probs_infos_policies_and_references(tmp_path: Path) -> None:
    path = tmp_path / "extra.h5"
    obs_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    rng = np.random.default_rng(0)
    policies = ["random", {"kind": "scripted", "name": "pd"}, "random"]
    with DatasetWriter(path, obs_space, BOX2, ref_min_return=-3.5, ref_max_return=120.0) as w:
        for i, pol in enumerate(policies):
            obs, nxt = _episode(rng, obs_space, 3 + i)
            n = len(obs)
            w.add_episode(
                obs,
                rng.uniform(-1, 1, (n, 2)),
                np.ones(n),
                nxt,
                terminated=False,
                action_log_probs=np.full(n, -1.25 - i),
                infos={"cost": np.arange(n, dtype=np.float32) + 10 * i, "success": np.zeros(n, bool)},
                policy=pol,
            )
    assert validate(path) == []
    raw = read_raw(path)
    assert raw.action_log_probs is not None and raw.action_log_probs.dtype == np.float32
    np.testing.assert_array_equal(raw.action_log_probs, np.repeat([-1.25, -2.25, -3.25], [3, 4, 5]))
    assert sorted(raw.infos) == ["cost", "success"]
    np.testing.assert_array_equal(raw.infos["cost"][:4], [0, 1, 2, 10])
    assert raw.infos["success"].dtype == np.bool_ and raw.infos["success"].shape == (12,)
    # repeated descriptions share one id
    assert raw.policies == ["random", {"kind": "scripted", "name": "pd"}]
    assert raw.episode_policy_ids is not None
    np.testing.assert_array_equal(raw.episode_policy_ids, [0, 1, 0])
    assert (raw.ref_min_return, raw.ref_max_return) == (-3.5, 120.0)
    ds = TransitionDataset(raw)
    assert ds.action_log_probs is not None and ds.action_log_probs.shape == (12,)


def test_write_raw_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src.h5"
    _write(
        src, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), gym.spaces.Discrete(4, start=1), metadata={"a": 1}
    )
    raw = read_raw(src)
    dst = write_raw(raw, tmp_path / "dst.h5", compression="gzip")
    again = read_raw(dst)
    for key in (*fmt.PER_TRANSITION_KEYS, "episode_ends"):
        np.testing.assert_array_equal(getattr(again, key), getattr(raw, key))
    assert again.action_space == raw.action_space and again.metadata["a"] == 1


# -- writer atomicity ------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _fail_midway(path: Path) -> None:
    obs_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    with pytest.raises(Boom), DatasetWriter(path, obs_space, BOX2) as w:
        z = np.zeros((3, 2), np.float32)
        w.add_episode(z, z, np.zeros(3), z, terminated=True)
        raise Boom


def test_exception_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    _fail_midway(path)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary file


def test_exception_leaves_existing_destination_untouched(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    _write(path, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), BOX2)
    before = path.read_bytes()
    _fail_midway(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_no_episodes_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    w = DatasetWriter(path, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), BOX2)
    with pytest.raises(Exception, match="no episode was written"):
        w.close()
    assert list(tmp_path.iterdir()) == []


# -- full-pass sampler -----------------------------------------------------------------------


def _drain(sampler: FullPassSampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(batches)]


def test_every_index_once_per_pass() -> None:
    s = FullPassSampler(10, 3, seed=0)
    assert s.batches_per_pass == 4 and s.leftover == 0
    for pass_index in range(3):
        batches = [b.tolist() for b in s.iter_pass()]
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(i for b in batches for i in b) == list(range(10))
        assert s.pass_index == pass_index + 1 and s.position == 0


def test_drop_last_reports_leftover() -> None:
    s = FullPassSampler(10, 3, seed=0, drop_last=True)
    assert s.batches_per_pass == 3 and s.leftover == 1
    seen_per_pass = []
    for _ in range(4):
        batches = [b.tolist() for b in s.iter_pass()]
        assert [len(b) for b in batches] == [3, 3, 3]
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 9 and set(flat) <= set(range(10))
        seen_per_pass.append(set(flat))
    # a different index is left out in different passes (the permutation changes each pass)
    assert len({frozenset(range(10)) - p for p in map(frozenset, seen_per_pass)}) > 1


def test_sampler_seeds() -> None:
    a = _drain(FullPassSampler(50, 8, seed=7), 20)
    b = _drain(FullPassSampler(50, 8, seed=7), 20)
    c = _drain(FullPassSampler(50, 8, seed=8), 20)
    assert a == b
    assert a != c
    # consecutive passes are shuffled differently
    s = FullPassSampler(50, 50, seed=7)
    assert s.next_batch().tolist() != s.next_batch().tolist()


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_mid_pass_continues_exactly(drop_last: bool) -> None:
    reference = FullPassSampler(23, 5, seed=3, drop_last=drop_last)
    expected = _drain(reference, 17)  # crosses several pass boundaries

    first = FullPassSampler(23, 5, seed=3, drop_last=drop_last)
    got = _drain(first, 7)  # stop mid-pass
    assert first.position != 0
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = FullPassSampler(23, 5, seed=3, drop_last=drop_last)
    resumed.load_state_dict(state)
    got += _drain(resumed, 10)
    assert got == expected


def test_resume_refuses_a_different_sampler() -> None:
    state = FullPassSampler(23, 5, seed=3).state_dict()
    with pytest.raises(Exception, match="seed"):
        FullPassSampler(23, 5, seed=4).load_state_dict(state)


# -- TransitionDataset -----------------------------------------------------------------------


def test_batch_shapes_and_episode_returns(tmp_path: Path) -> None:
    obs_space = gym.spaces.Box(-5.0, 5.0, (4,), np.float32)
    path = tmp_path / "d.h5"
    data = _write(path, obs_space, BOX2)
    ds = TransitionDataset.load(path)
    assert len(ds) == 12 and ds.num_episodes == 3
    idx = torch.tensor([0, 4, 11])
    b = ds.batch(idx)
    assert b.obs.shape == (3, 4) and b.next_obs.shape == (3, 4)
    assert b.actions.shape == (3, 2) and b.rewards.shape == (3,) and b.terminals.shape == (3,)
    assert all(t.dtype == torch.float32 for t in (b.obs, b.actions, b.rewards, b.next_obs, b.terminals))
    np.testing.assert_array_equal(b.obs.numpy(), data["obs"][[0, 4, 11]])
    # row 4 ends a terminated episode, row 7 a truncated one (not a terminal), row 11 terminated
    np.testing.assert_array_equal(b.terminals.numpy(), [0.0, 1.0, 1.0])
    assert ds.batch(torch.tensor([7])).terminals.item() == 0.0
    rew = data["rew"].astype(np.float64)
    np.testing.assert_allclose(
        ds.episode_returns(), [rew[:5].sum(), rew[5:8].sum(), rew[8:].sum()], rtol=1e-6
    )
    np.testing.assert_array_equal(ds.episode_lengths(), [5, 3, 4])

    disc = tmp_path / "disc.h5"
    _write(disc, obs_space, gym.spaces.Discrete(3))
    db = TransitionDataset.load(disc).batch(idx)
    assert db.actions.shape == (3,) and db.actions.dtype == torch.int64
