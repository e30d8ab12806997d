"""Every way a dataset file can violate format v1 has a fixture here, and its message is pinned.

Each case writes a valid file with ``DatasetWriter`` and corrupts it in place with h5py (or builds
a bad file directly), then checks that ``validate``, ``offrl validate`` and
``TransitionDataset.load`` all report the problem by name, never with an h5py traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from offrl.cli import main
from offrl.data import DatasetWriter, TransitionDataset, validate
from offrl.errors import DatasetError

# Three episodes: rows 0-3 (terminated), 4-6 (truncated), 7-11 (terminated); 12 transitions.
EPISODES = ((4, True), (3, False), (5, True))
N = 12


def write_valid(path: Path, *, discrete_start: int | None = None) -> Path:
    """A small valid file: Box(3,) float32 observations; Box(2,) actions or Discrete(3, start)."""
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-10.0, 10.0, (3,), np.float32)
    if discrete_start is None:
        act_space: gym.Space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    else:
        act_space = gym.spaces.Discrete(3, start=discrete_start)
    with DatasetWriter(
        path, obs_space, act_space, env_id="Toy-v0", ref_min_return=0.0, ref_max_return=10.0
    ) as w:
        for length, terminated in EPISODES:
            states = rng.uniform(-1, 1, (length + 1, 3)).astype(np.float32)
            if discrete_start is None:
                actions = rng.uniform(-0.5, 0.5, (length, 2))
            else:
                actions = discrete_start + rng.integers(0, 3, length)
            w.add_episode(states[:-1], actions, np.ones(length), states[1:], terminated)
    return path


def _replace(f: h5py.File, key: str, data: np.ndarray) -> None:
    del f[key]
    f.create_dataset(key, data=data)


def _set(key: str, index: tuple[int, ...] | int, value: object) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[key][index] = value

    return edit


def _set_attr(name: str, value: object) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[name] = value

    return edit


def _both_flags(f: h5py.File) -> None:
    f["timeouts"][3] = True  # row 3 already ends episode 0 with a terminal


def _nan_state(f: h5py.File) -> None:
    # a NaN state appears twice, as row 5's observation and row 4's next observation
    f["observations"][5, 1] = np.nan
    f["next_observations"][4, 1] = np.nan


# (id, edit of a valid Box-action file, the exact problem line after "<path>: ")
CORRUPTIONS: list[tuple[str, Callable[[h5py.File], None], str]] = [
    ("missing-key", lambda f: f.__delitem__("rewards"), "required key 'rewards' is missing"),
    (
        "length-mismatch",
        lambda f: _replace(f, "rewards", np.ones(N - 1, np.float32)),
        f"'rewards' has {N - 1} rows but 'observations' has {N}",
    ),
    (
        "obs-dtype",
        lambda f: _replace(f, "observations", f["observations"][()].astype(np.float64)),
        "'observations' has dtype float64, observation space says float32",
    ),
    (
        "obs-shape",
        lambda f: _replace(f, "next_observations", f["next_observations"][()][:, :2]),
        "'next_observations' rows have shape (2,), observation space says (3,)",
    ),
    ("inf-reward", _set("rewards", 2, np.inf), "'rewards' has NaN or inf in 1 row (at row 2)"),
    (
        "action-out-of-box",
        _set("actions", (7, 0), 1.5),
        "'actions' outside the action-space bounds in 1 row (at row 7)",
    ),
    (
        "terminal-and-timeout",
        _both_flags,
        "'terminals' and 'timeouts' both set in 1 row (at row 3) (a termination wins)",
    ),
    (
        "episode-without-flag",
        _set("terminals", 3, False),
        "1 episode(s) end without a terminal or timeout flag (first: episode 0, last row 3)",
    ),
    (
        "flag-inside-episode",
        _set("timeouts", 1, True),
        "terminal/timeout flags inside an episode (not on its last row) in 1 row (at row 1)",
    ),
    (
        "empty-episode",
        lambda f: _replace(f, "episode_ends", np.array([4, 4, 7, N])),
        "1 empty or out-of-order episode(s) in 'episode_ends' (first: episode 1, rows 4..4)",
    ),
    (
        "episode-ends-short",
        lambda f: _replace(f, "episode_ends", np.array([4, 7, N - 1])),
        f"'episode_ends' ends at row {N - 1} but there are {N} transitions",
    ),
    (
        "next-obs-inconsistent",
        _set("next_observations", (1, 0), 0.5),
        "'next_observations' differs from the next row's 'observations' inside an episode in 1 row (at row 1)",
    ),
    (
        "unknown-version",
        _set_attr("format_version", 99),
        "unknown 'format_version' 99: this offrl reads versions 1..1",
    ),
    (
        "float-version",
        _set_attr("format_version", 1.0),
        f"'format_version' is {np.float64(1.0)!r}, expected an integer",
    ),
    (
        "missing-observation-space",
        lambda f: f.attrs.__delitem__("observation_space"),
        "root attribute 'observation_space' is missing",
    ),
    (
        "reference-min-not-below-max",
        _set_attr("ref_min_return", 10.0),
        "reference returns must be finite with 'ref_min_return' < 'ref_max_return', got 10.0, 10.0",
    ),
    # Each of these used to crash inside read_raw with an h5py/Python exception instead of reporting.
    (
        "reference-not-a-number",
        _set_attr("ref_max_return", "high"),
        "root attribute 'ref_max_return' is 'high', expected a number",
    ),
    (
        "infos-not-a-group",
        lambda f: f.create_dataset("infos", data=np.arange(N)),
        "'infos' is an array, expected a group of per-transition arrays",
    ),
    (
        "log-probs-a-group",
        lambda f: f.create_group("action_log_probs"),
        "'action_log_probs' is a group, expected an array",
    ),
    (
        "policies-not-a-list",
        _set_attr("policies", '"random"'),
        "root attribute 'policies' is not a JSON list",
    ),
    (
        "metadata-not-an-object",
        _set_attr("metadata", "[1, 2]"),
        "root attribute 'metadata' is not a JSON object",
    ),
]


def _corrupt(tmp_path: Path, edit: Callable[[h5py.File], None], **kw: int) -> Path:
    path = write_valid(tmp_path / "data.h5", **kw)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def test_valid_file_has_no_problems(tmp_path: Path) -> None:
    assert validate(write_valid(tmp_path / "ok.h5")) == []
    assert validate(write_valid(tmp_path / "ok_discrete.h5", discrete_start=1)) == []


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_reported(tmp_path: Path, edit: Callable[[h5py.File], None], message: str) -> None:
    path = _corrupt(tmp_path, edit)
    assert validate(path) == [f"{path}: {message}"]


def test_nan_in_observations(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, _nan_state)
    # both copies of the NaN state are reported; the pair still counts as consistent
    assert validate(path) == [
        f"{path}: 'observations' has NaN or inf in 1 row (at row 5)",
        f"{path}: 'next_observations' has NaN or inf in 1 row (at row 4)",
    ]


@pytest.mark.parametrize(("start", "bad"), [(0, 3), (1, 0), (-2, 1)])
def test_discrete_action_out_of_range(tmp_path: Path, start: int, bad: int) -> None:
    path = _corrupt(tmp_path, _set("actions", 6, bad), discrete_start=start)
    assert validate(path) == [
        f"{path}: 'actions' outside the discrete range {start}..{start + 2} in 1 row (at row 6)"
    ]


def test_discrete_actions_must_be_integers(tmp_path: Path) -> None:
    path = _corrupt(
        tmp_path, lambda f: _replace(f, "actions", f["actions"][()].astype(np.float32)), discrete_start=0
    )
    assert validate(path) == [
        f"{path}: 'actions' has dtype float32, expected an integer type for a Discrete space"
    ]


def test_many_rows_are_counted_and_a_few_named(tmp_path: Path) -> None:
    def edit(f: h5py.File) -> None:
        r = f["rewards"][()]
        r[[0, 2, 5, 8, 11]] = np.nan
        _replace(f, "rewards", r)

    path = _corrupt(tmp_path, edit)
    assert validate(path) == [f"{path}: 'rewards' has NaN or inf in 5 rows (at rows 0, 2, 5, …)"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    def edit(f: h5py.File) -> None:
        f["rewards"][2] = np.inf
        f["actions"][7, 0] = 1.5
        _both_flags(f)

    path = _corrupt(tmp_path, edit)
    problems = validate(path)
    assert len(problems) == 3
    assert any("'actions' outside the action-space bounds" in p for p in problems)
    assert any("'rewards' has NaN or inf" in p for p in problems)
    assert any("both set in 1 row (at row 3)" in p for p in problems)


# -- files that are not datasets at all ------------------------------------------------------


def _nonexistent(tmp_path: Path) -> Path:
    return tmp_path / "missing.h5"


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.h5"
    path.write_text("observations,actions\n1,2\n")
    return path


def _truncated(tmp_path: Path) -> Path:
    path = write_valid(tmp_path / "cut.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_offrl(tmp_path: Path) -> Path:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.zeros((3, 2)))
    return path


UNREADABLE = [
    ("nonexistent", _nonexistent, "no such file"),
    ("empty", _empty, "file is empty (0 bytes)"),
    ("text", _text, "not an HDF5 file"),
    ("truncated", _truncated, "unreadable or truncated HDF5 file ("),
    ("not-offrl", _not_offrl, "root attribute 'format_version' is missing: not an offrl dataset"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_unreadable_file_is_reported(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)
    problems = validate(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: {message}")


# -- the same messages through the CLI and the loader ----------------------------------------


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_valid(tmp_path / "ok.h5")
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK (dataset format v1)\n"


def test_cli_validate_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(f: h5py.File) -> None:
        f["rewards"][2] = np.inf
        f["timeouts"][1] = True

    path = _corrupt(tmp_path, edit)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == validate(path)
    assert len(out) == 2
    assert all(line.startswith(f"{path}: ") for line in out)


def test_cli_validate_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _truncated(tmp_path)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"{path}: unreadable or truncated HDF5 file")


ALL_CASES = [(c[0], c[1]) for c in CORRUPTIONS] + [("nan", _nan_state)]


@pytest.mark.parametrize("edit", [c[1] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_load_raises_the_same_message(tmp_path: Path, edit: Callable[[h5py.File], None]) -> None:
    path = _corrupt(tmp_path, edit)
    with pytest.raises(DatasetError) as info:
        TransitionDataset.load(path)
    assert str(info.value) == "\n".join(validate(path))


@pytest.mark.parametrize("make", [c[1] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_load_unreadable_raises_dataset_error(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    with pytest.raises(DatasetError) as info:
        TransitionDataset.load(path)
    assert str(info.value) == "\n".join(validate(path))
