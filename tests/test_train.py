"""The full-pass trainer: schedule, run directory, bitwise resume, guards and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offrl import cli
from offrl.data.writer import DatasetWriter
from offrl.errors import ConfigError
from offrl.runtime import Runtime
from offrl.train import Trainer, TrainingDiverged, fit, resolve_config, resume


def _synthetic(path: Path, discrete: bool, episodes: int = 6, length: int = 50, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act_space = gym.spaces.Discrete(2) if discrete else gym.spaces.Box(-1.0, 2.0, (2,), np.float32)
    with DatasetWriter(path, obs_space, act_space) as w:
        for e in range(episodes):
            o = rng.normal(size=(length + 1, 3)).astype(np.float32)
            a = rng.integers(0, 2, size=length) if discrete else rng.uniform(-1, 2, size=(length, 2))
            w.add_episode(o[:-1], a, rng.normal(size=length), o[1:], terminated=e % 2 == 0)
    return path


SMALL = {"hidden": "16,16", "batch_size": "32"}


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return load_file(str(run_dir / "checkpoints" / latest / "state.safetensors"))


@pytest.mark.parametrize("algo,discrete", [("bc", False), ("bc", True), ("cql", False), ("cql", True)])
def test_resume_is_bitwise_identical(tmp_path: Path, algo: str, discrete: bool) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete)
    settings = {"hidden": (16, 16), "batch_size": 32, "train.threads": 1}
    if algo == "cql" and not discrete:
        settings = {"actor_hidden": (16, 16), "critic_hidden": (16, 16), "batch_size": 32, "train.threads": 1}
    try:
        full = fit(algo, data, tmp_path / "full", epochs=4, seed=3, show_progress=False, **settings)
    except ConfigError as exc:  # a config without these field names
        pytest.skip(str(exc))
    fit(algo, data, tmp_path / "half", epochs=2, seed=3, show_progress=False, **settings)
    resumed = resume(tmp_path / "half", epochs=4, show_progress=False)
    assert full.steps == resumed.steps == 4 * 10  # 300 rows / 32 → 10 batches per pass
    a, b = _params(tmp_path / "full"), _params(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("algo,discrete", [("bc", False), ("bc", True), ("cql", True)])
def test_compiled_resume_is_bitwise_identical(tmp_path: Path, algo: str, discrete: bool) -> None:
    """On CPU the compiled hand-written steps resume bit for bit too (a resumed run compiles afresh)."""
    data = _synthetic(tmp_path / "d.h5", discrete)
    settings = {"hidden": (16, 16), "batch_size": 32, "train.threads": 1, "compile": "default"}
    fit(algo, data, tmp_path / "full", epochs=4, seed=3, show_progress=False, **settings)
    fit(algo, data, tmp_path / "half", epochs=2, seed=3, show_progress=False, **settings)
    torch._dynamo.reset()  # as in a new process
    resume(tmp_path / "half", epochs=4, show_progress=False)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_steps_round_up_to_whole_passes(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    cfg = resolve_config(
        "bc", data, action_space=gym.spaces.Discrete(2), overrides={"train.steps": 15, "batch_size": 32}
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.total_passes == 2
    assert "rounded up to whole passes" in trainer.describe_schedule()
    cfg = resolve_config(
        "bc",
        data,
        action_space=gym.spaces.Discrete(2),
        overrides={"train.epochs": 1, "batch_size": 32, "train.drop_last": "true"},
    )
    assert "skips 12 transitions per pass" in Trainer(cfg, tmp_path / "run2").describe_schedule()


def test_run_directory_and_metrics(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=False)
    fit("bc", data, tmp_path / "run", epochs=3, show_progress=False, **SMALL)
    run = tmp_path / "run"
    for name in (
        "config.toml",
        "run.json",
        "metrics.jsonl",
        "policy/policy.json",
        "policy/policy.safetensors",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30]  # flushed at each pass end
    assert all("time/steps_per_second" in r for r in train_rows)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and len(info["dataset_sha256"]) == 64
    # keep_checkpoints=2 by default
    assert sorted(p.name for p in (run / "checkpoints").glob("pass_*")) == ["pass_000002", "pass_000003"]
    # the config file alone reproduces the run
    assert "threads = 2" in (run / "config.toml").read_text()


def test_unknown_setting_lists_valid_keys(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    with pytest.raises(ConfigError, match=r"unknown setting 'nope'.*valid:.*train\.epochs.*hidden"):
        resolve_config("bc", data, action_space=gym.spaces.Discrete(2), overrides={"nope": 1})
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config("bc", data, action_space=gym.spaces.Discrete(2), overrides={"batch_size": "many"})


def test_configs_built_in_code_are_checked_like_files() -> None:
    """Every config validates its choices (Literal fields) and ranges in one error naming each bad field."""
    from offrl.algos.bc import BCConfig
    from offrl.algos.cql_discrete import DiscreteCQLConfig

    with pytest.raises(
        ConfigError, match=r"bc: invalid policy='mixture' \(one of 'deterministic', 'gaussian'\)"
    ):
        BCConfig(policy="mixture")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"runtime: invalid precision='fp16' \(one of 'fp32', 'bf16'\)"):
        Runtime(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"compile='fast'.*None\)"):
        Runtime(compile="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cql \(discrete\): invalid loss='l1'.*, lr=-1\.0"):
        DiscreteCQLConfig(loss="l1", lr=-1.0)  # type: ignore[arg-type]
    Runtime(compile=None, precision="bf16")  # valid choices pass


def test_resume_refuses_changed_dataset(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    fit("bc", data, tmp_path / "run", epochs=1, show_progress=False, **SMALL)
    _synthetic(data, discrete=True, seed=99)  # same path, different content
    with pytest.raises(ConfigError, match="has changed since this run started"):
        resume(tmp_path / "run", epochs=2, show_progress=False)


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    fit("bc", data, tmp_path / "run", epochs=1, show_progress=False, **SMALL)
    with pytest.raises(ConfigError, match="already holds a run"):
        fit("bc", data, tmp_path / "run", epochs=1, show_progress=False, **SMALL)


def test_non_finite_loss_stops_and_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    from offrl.algos import bc

    original = bc.DiscreteBC.update

    def poisoned(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        if self.num_updates == 25:  # the 5th step of pass 3
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(bc.DiscreteBC, "update", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite 'loss' at gradient step 25.*pass 2"):
        fit("bc", data, tmp_path / "run", epochs=4, show_progress=False, **SMALL)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "diverged"
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["pass"] == 2
    assert json.loads((tmp_path / "run" / "policy" / "policy.json").read_text())["pass"] == 2


def test_cli_train_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from offrl.data.recorder import record
    from offrl.policies.scripted import make_scripted

    env = gym.make("CartPole-v1")
    policy = make_scripted("cartpole-eps0.1", env.observation_space, env.action_space, seed=0)
    data = record("CartPole-v1", policy, episodes=3, seed=0, out=tmp_path / "cp.h5", progress=False)
    args = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(tmp_path / "run"), "--epochs", "2"]
    args += ["--set", "hidden=16,16", "--set", "eval_episodes=2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "steps per pass" in out and "final evaluation" in out
    assert cli.main(["evaluate", str(tmp_path / "run"), "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["returns"]) == 2
    assert (
        cli.main(
            ["train", "--algo", "bc", "--dataset", str(data), "--out", str(tmp_path / "r2"), "--set", "x=1"]
        )
        == 1
    )
    assert "unknown setting 'x'" in capsys.readouterr().err


def test_flush_denormal_is_a_recorded_run_setting(tmp_path: Path) -> None:
    """Subnormals flush to zero by default (Adam's moments of dead units would otherwise slow every
    step ~100×); the setting is in the run's config, so a run can turn it off."""
    data = _synthetic(tmp_path / "d.h5", discrete=True)
    for flush, run in ((False, "off"), (True, "on")):
        cfg = resolve_config(
            "bc",
            data,
            action_space=gym.spaces.Discrete(2),
            overrides={"train.steps": 1, "train.flush_denormal": str(flush).lower()},
        )
        Trainer(cfg, tmp_path / run)
        tiny = torch.tensor([1e-30]) * 1e-9  # a float32 subnormal, unless flushed
        assert bool((tiny == 0).item()) is flush
        assert cfg.runtime.flush_denormal is flush
