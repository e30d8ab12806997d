"""Named presets (offrl/presets): their settings sit below a config file and --set, their budget yields
to the run's, and a grid expands them into its cells; grids sweep settings into labelled cells."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl import cli, presets
from offrl.bench.grid import expand, load_grid, parse_grid
from offrl.errors import ConfigError
from offrl.train import resolve_config

DISCRETE = gym.spaces.Discrete(2)
BOX = gym.spaces.Box(-np.ones(1, np.float32), np.ones(1, np.float32))

PRESET = """# The test preset: made up for these tests.
# Second line of its story.

[bc]
hidden = [32, 32]
train = { steps = 500 }

[cql]
batch_size = 128
[cql.continuous]
actor_hidden = [16, 16]
cql_alpha = 2.0
[cql.discrete]
hidden = [8, 8]
"""


@pytest.fixture
def preset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "test.toml").write_text(PRESET)
    monkeypatch.setattr(presets, "PRESET_DIR", folder)
    presets._load.cache_clear()
    yield folder
    presets._load.cache_clear()


def test_preset_settings_by_variant(preset_dir: Path) -> None:
    assert presets.names() == ["test"]
    assert presets.preset_settings("test", "cql", discrete=True) == {"batch_size": 128, "hidden": [8, 8]}
    assert presets.preset_settings("test", "cql", discrete=False) == {
        "batch_size": 128,
        "actor_hidden": [16, 16],
        "cql_alpha": 2.0,
    }
    assert presets.preset_settings("test", "bc", discrete=True) == {"hidden": [32, 32], "train.steps": 500}
    assert presets.describe("test") == "The test preset: made up for these tests.\nSecond line of its story."
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; available: test"):
        presets.preset_settings("nope", "bc", discrete=True)
    with pytest.raises(ConfigError, match=r"no settings for 'iql'; it covers: bc, cql"):
        presets.preset_settings("test", "iql", discrete=True)


def test_preset_below_config_file_and_overrides(preset_dir: Path, tmp_path: Path) -> None:
    cfg = resolve_config("cql", "d.h5", action_space=BOX, overrides={"preset": "test"})
    assert cfg.algo_config.cql_alpha == 2.0 and cfg.algo_config.actor_hidden == (16, 16)
    assert cfg.algo_config.batch_size == 128
    # --set wins over the preset
    cfg = resolve_config("cql", "d.h5", action_space=BOX, overrides={"preset": "test", "cql_alpha": "7"})
    assert cfg.algo_config.cql_alpha == 7.0 and cfg.algo_config.actor_hidden == (16, 16)
    # a config file sits between them, and may name the preset itself
    conf = tmp_path / "c.toml"
    conf.write_text('preset = "test"\n[algo_config]\nbatch_size = 64\n')
    cfg = resolve_config("cql", "d.h5", action_space=DISCRETE, config_file=conf)
    assert cfg.algo_config.batch_size == 64 and cfg.algo_config.hidden == (8, 8)
    cfg = resolve_config(
        "cql", "d.h5", action_space=DISCRETE, config_file=conf, overrides={"batch_size": "32"}
    )
    assert cfg.algo_config.batch_size == 32


def test_preset_budget_yields_to_the_runs(preset_dir: Path) -> None:
    cfg = resolve_config("bc", "d.h5", action_space=DISCRETE, overrides={"preset": "test"})
    assert cfg.train.steps == 500 and cfg.train.epochs is None
    cfg = resolve_config("bc", "d.h5", action_space=DISCRETE, overrides={"preset": "test", "train.epochs": 3})
    assert cfg.train.epochs == 3 and cfg.train.steps is None


def test_cli_lists_shows_and_refuses_on_resume(preset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) == 0
    assert "test       The test preset" in capsys.readouterr().out
    assert cli.main(["presets", "test"]) == 0
    assert "cql_alpha = 2.0" in capsys.readouterr().out
    assert cli.main(["presets", "nope"]) == 1
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "runs/x", "--preset", "test"]) == 1
    assert "--preset cannot change" in capsys.readouterr().err


def test_cli_train_with_a_preset(preset_dir: Path, tmp_path: Path, builtin_dataset) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/cartpole-mixed")
    out = tmp_path / "run"
    args = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), "--preset", "test"]
    assert cli.main([*args, "--set", "train.eval_every=0"]) == 0
    text = (out / "config.toml").read_text()
    assert "hidden = [32, 32]" in text and "steps = 500" in text  # the resolved values, not the name


GRID = """
name = "sweep"
seeds = [0]
datasets = [{{ path = "{data}", name = "cp" }}]
preset = "test"
[budget]
epochs = 1
[algos.bc]
[algos.cql.continuous]
sweep = {{ cql_alpha = [1.0, 5.0] }}
[algos.cql.discrete]
sweep = {{ cql_alpha = [0.5, 1.0], target_update_interval = [10, 20] }}
[algos.iql]
preset = "none-such"
sweep = {{ beta = [1.0, 3.0] }}
"""


def test_grid_sweeps_and_presets(preset_dir: Path, tmp_path: Path, builtin_dataset) -> None:  # type: ignore[no-untyped-def]
    data = builtin_dataset("builtin/cartpole-mixed")
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(data=data).replace('preset = "none-such"\n', ""))
    grid = load_grid(path)
    labels = [a.label for a in grid.algos]
    assert labels[:3] == ["bc", "cql-cql_alpha=1.0", "cql-cql_alpha=5.0"]
    assert "cql-cql_alpha=0.5-target_update_interval=20" in labels and "iql-beta=3.0" in labels
    with pytest.raises(ConfigError, match="no settings for 'iql'"):
        expand(grid)  # the grid-wide preset covers bc and cql, not iql
    path.write_text(
        GRID.format(data=data)
        .replace('preset = "none-such"\n', 'preset = "test"\n')
        .replace("[algos.iql]\n", "[algos.iql]\nexpectile = 0.8\n")
    )
    presets_toml = preset_dir / "test.toml"
    presets_toml.write_text(PRESET + "\n[iql]\nhidden = [4, 4]\n")
    presets._load.cache_clear()
    cells = {c.cell_id: c for c in expand(load_grid(path))}
    # the continuous sweep has no cell on a discrete dataset; the discrete one has all four
    assert sorted(k for k in cells if k.startswith("cql")) == sorted(
        f"cql-cql_alpha={a}-target_update_interval={t}__cp__s0" for a in (0.5, 1.0) for t in (10, 20)
    )
    bc = cells["bc__cp__s0"].settings
    assert bc["hidden"] == [32, 32] and bc["train.epochs"] == 1 and "train.steps" not in bc
    cql = cells["cql-cql_alpha=1.0-target_update_interval=20__cp__s0"].settings
    assert cql["hidden"] == [8, 8] and cql["cql_alpha"] == 1.0 and cql["target_update_interval"] == 20
    iql = cells["iql-beta=1.0__cp__s0"].settings
    assert iql["hidden"] == [4, 4] and iql["beta"] == 1.0 and iql["expectile"] == 0.8
    # a changed preset changes the cells' identity, so a rerun does not reuse stale records
    before = cells["bc__cp__s0"].config_hash()
    presets_toml.write_text(PRESET.replace("[32, 32]", "[33, 33]") + "\n[iql]\nhidden = [4, 4]\n")
    presets._load.cache_clear()
    assert {c.cell_id: c for c in expand(load_grid(path))}["bc__cp__s0"].config_hash() != before

    with pytest.raises(ConfigError, match="must be a non-empty list"):
        parse_grid(
            {"seeds": 1, "datasets": ["x.h5"], "algos": {"bc": {"sweep": {"lr": 1}}}, "budget": {"epochs": 1}}
        )
    with pytest.raises(ConfigError, match="labels repeat"):
        parse_grid(
            {
                "seeds": 1,
                "datasets": ["x.h5"],
                "algos": {"bc": {"sweep": {"lr": [1, 1]}}},
                "budget": {"epochs": 1},
            }
        )
