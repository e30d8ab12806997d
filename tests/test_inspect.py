"""``offrl info``: the summary's numbers against hand computations, its text and JSON, the plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from offrl.cli import main
from offrl.data import DatasetWriter, RawDataset, validate, write_raw
from offrl.data.inspect import PER_DIM_LIMIT, format_summary, plot_returns, summarize
from offrl.errors import DatasetError

OBS = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)


def _write_known(path: Path, *, references: bool = True, metadata: dict | None = None) -> Path:
    """Three episodes with returns 4, 6, 2 (lengths 2, 3, 1) from two policies.

    Observations of episode e, step t are [e, 10 * t]; actions are [t, -t] in Box(-5, 5).
    """
    act = gym.spaces.Box(-5.0, 5.0, (2,), np.float32)
    refs = {"ref_min_return": 0.0, "ref_max_return": 8.0} if references else {}
    with DatasetWriter(path, OBS, act, env_id="Toy-v0", metadata=metadata or {"seed": 11}, **refs) as w:
        for e, (length, terminated, policy) in enumerate(
            [(2, True, "random"), (3, False, "expert"), (1, True, "random")]
        ):
            states = np.array([[e, 10 * t] for t in range(length + 1)], np.float32)
            actions = np.array([[t, -t] for t in range(length)], np.float32)
            rewards = np.full(length, 2.0)
            w.add_episode(states[:-1], actions, rewards, states[1:], terminated, policy=policy)
    return path


@pytest.fixture
def known(tmp_path: Path) -> Path:
    return _write_known(tmp_path / "toy-random.h5")


def test_summary_numbers(known: Path) -> None:
    s = summarize(known)
    assert s["path"] == str(known) and s["name"] == "toy-random"
    assert s["format_version"] == 1 and s["env_id"] == "Toy-v0"
    assert s["num_episodes"] == 3 and s["num_transitions"] == 6
    returns = np.array([4.0, 6.0, 2.0])
    assert s["returns"]["min"] == 2.0 and s["returns"]["max"] == 6.0
    assert s["returns"]["mean"] == pytest.approx(4.0)
    assert s["returns"]["std"] == pytest.approx(returns.std())
    for q in (5, 25, 50, 75, 95):
        assert s["returns"][f"q{q:02d}"] == pytest.approx(np.percentile(returns, q))
    assert s["lengths"]["min"] == 1 and s["lengths"]["max"] == 3 and s["lengths"]["q50"] == 2
    assert s["num_terminals"] == 2 and s["num_timeouts"] == 1
    assert sum(s["return_histogram"]["counts"]) == 3

    obs = s["observations"]
    assert obs["per_dim"] and obs["shape"] == [2] and obs["dtype"] == "float32"
    rows = np.array([[0, 0], [0, 10], [1, 0], [1, 10], [1, 20], [2, 0]], np.float64)
    assert obs["min"] == [0.0, 0.0] and obs["max"] == [2.0, 20.0]
    assert obs["mean"] == pytest.approx(rows.mean(0).tolist())
    assert obs["std"] == pytest.approx(rows.std(0).tolist())
    acts = s["actions"]
    assert acts["kind"] == "continuous" and acts["min"] == [0.0, -2.0] and acts["max"] == [2.0, 0.0]
    assert acts["mean"] == pytest.approx([4 / 6, -4 / 6])
    assert s["action_log_probs"] is False and s["infos"] == []

    assert s["reference"] == {"min_return": 0.0, "max_return": 8.0, "normalized_score": pytest.approx(50.0)}
    assert s["observation_space"]["type"] == "Box" and s["action_space"]["high"] == 5.0
    assert s["policies"] == [
        {"id": 0, "policy": "random", "episodes": 2, "mean_return": pytest.approx(3.0)},
        {"id": 1, "policy": "expert", "episodes": 1, "mean_return": pytest.approx(6.0)},
    ]
    assert s["metadata"]["seed"] == 11 and "created" in s["metadata"]


def test_summary_is_strict_json(tmp_path: Path) -> None:
    # Python's json writes NaN into metadata by default; the summary must not pass it on
    path = _write_known(tmp_path / "d.h5", metadata={"temperature": float("nan"), "limit": float("inf")})
    s = summarize(path)
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["metadata"]["temperature"] == "nan"


def test_discrete_counts(tmp_path: Path) -> None:
    path = tmp_path / "disc.h5"
    act = gym.spaces.Discrete(4, start=-1)
    with DatasetWriter(path, OBS, act) as w:
        states = np.zeros((6, 2), np.float32)
        w.add_episode(states[:-1], np.array([-1, -1, 2, 0, -1]), np.ones(5), states[1:], True)
    s = summarize(path)
    assert s["actions"] == {"kind": "discrete", "counts": {"-1": 3, "0": 1, "1": 0, "2": 1}}
    assert s["reference"] is None
    assert s["policies"] == [{"id": 0, "policy": "unknown", "episodes": 1, "mean_return": 5.0}]
    text = format_summary(s)
    assert "normalised" not in text
    assert "Discrete(4, start=-1)" in text


def test_image_observations_get_overall_stats(tmp_path: Path) -> None:
    path = tmp_path / "img.h5"
    space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    assert PER_DIM_LIMIT < 8 * 8 * 3
    rng = np.random.default_rng(0)
    states = rng.integers(10, 200, (5, 8, 8, 3)).astype(np.uint8)
    with DatasetWriter(path, space, gym.spaces.Discrete(2)) as w:
        w.add_episode(states[:-1], np.zeros(4), np.ones(4), states[1:], False)
    obs = summarize(path)["observations"]
    assert obs == {
        "shape": [8, 8, 3],
        "dtype": "uint8",
        "per_dim": False,
        "min": float(states[:-1].min()),
        "max": float(states[:-1].max()),
        "mean": pytest.approx(states[:-1].mean()),
    }


def test_large_dataset_summary_stays_small(tmp_path: Path) -> None:
    episodes = 5000
    n = 2 * episodes
    rng = np.random.default_rng(0)
    states = rng.standard_normal((episodes, 3, 2)).astype(np.float32)
    raw = RawDataset(
        path="",
        observations=states[:, :2].reshape(n, 2),
        actions=np.zeros(n, np.int64),
        rewards=rng.standard_normal(n).astype(np.float32),
        next_observations=states[:, 1:].reshape(n, 2),
        terminals=np.tile([False, True], episodes),
        timeouts=np.zeros(n, bool),
        episode_ends=np.arange(2, n + 1, 2),
        observation_space=gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
        action_space=gym.spaces.Discrete(2),
    )
    path = write_raw(raw, tmp_path / "big.h5")
    s = summarize(path)
    assert s["num_episodes"] == episodes
    assert len(s["return_histogram"]["counts"]) <= 50
    assert sum(s["return_histogram"]["counts"]) == episodes
    assert len(json.dumps(s)) < 8000  # no per-episode list in the JSON


def test_format_summary_aligned(known: Path) -> None:
    text = format_summary(summarize(known))
    lines = text.splitlines()
    for needle in ("Toy-v0", "transitions", "2 terminal, 1 timeout", "normalised", "50.0", "expert", "seed"):
        assert needle in text
    # the statistics table: header and rows right-aligned to the same width
    i = lines.index("episodes")
    header, returns_row, lengths_row = lines[i + 1 : i + 4]
    assert returns_row.split()[0] == "returns" and lengths_row.split()[0] == "lengths"
    assert len(header) == len(returns_row) == len(lengths_row)
    assert header.index("mean") + len("mean") == returns_row.index("4.000") + len("4.000")
    # head block: every value starts in the same column
    head = lines[1 : lines.index("episodes")]
    starts = {m.start(1) for m in (re.match(r"^  \S.*?\s{2,}(\S)", line) for line in head) if m}
    assert len(head) >= 8 and len(starts) == 1


def test_plot_returns_writes_png_atomically(known: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "returns.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    plot_returns(summarize(known), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.parent.iterdir()) == [out]  # the temporary file was renamed, not left behind


def test_cli_info_text_json_and_plot(known: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(known)]) == 0
    assert "transitions" in capsys.readouterr().out

    png = tmp_path / "h.png"
    assert main(["info", str(known), "--json", "--plot", str(png)]) == 0
    parsed = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert parsed["num_transitions"] == 6 and parsed["reference"]["normalized_score"] == pytest.approx(50.0)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_info_refuses_invalid_file(known: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with h5py.File(known, "r+") as f:
        f["rewards"][1] = np.nan
    with pytest.raises(DatasetError) as info:
        summarize(known)
    assert str(info.value) == "\n".join(validate(known))
    assert main(["info", str(known)]) == 1
    err = capsys.readouterr().err
    assert "'rewards' has NaN or inf in 1 row (at row 1)" in err
