"""The run harness both trainers share: runtime settings under every spelling, runs written before the
[runtime] table existed, the runtime kept across a resume, run status, and the divergence diagnosis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offrl import cli
from offrl import config as cfgmod
from offrl.data.writer import DatasetWriter
from offrl.errors import ConfigError
from offrl.online import loop
from offrl.run import MetricAccumulator, TrainingDiverged, run_status
from offrl.runtime import Runtime
from offrl.train import Trainer, fit, resolve_config, resume

DISCRETE = gym.spaces.Discrete(2)


def _data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    with DatasetWriter(path, obs_space, DISCRETE) as w:
        for e in range(6):
            o = rng.normal(size=(51, 3)).astype(np.float32)
            w.add_episode(
                o[:-1], rng.integers(0, 2, size=50), rng.normal(size=50), o[1:], terminated=e % 2 == 0
            )
    return path


SMALL = {"hidden": (16, 16), "batch_size": 32, "train.threads": 1}


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return load_file(str(run_dir / "checkpoints" / latest / "state.safetensors"))


def _to_old_layout(config_toml: Path) -> None:
    """Rewrite a run's config.toml as offrl wrote it before [runtime]: threads, flush_denormal and
    cuda_graphs in [train], precision and compile in [algo_config]."""
    doc = cfgmod.read_toml(config_toml)
    runtime = doc.pop("runtime")
    for key in ("threads", "flush_denormal", "cuda_graphs"):
        doc["train"][key] = runtime[key]
    for key in ("precision", "compile"):
        doc["algo_config"][key] = runtime[key] if runtime[key] is not None else "none"
    config_toml.write_text(cfgmod.dumps_toml(doc))


@pytest.mark.parametrize(
    "overrides",
    [
        {"precision": "bf16", "compile": "default", "threads": 1, "flush_denormal": "false"},
        {"algo.precision": "bf16", "algo_config.compile": "default", "train.threads": 1},
        {"runtime.precision": "bf16", "runtime.compile": "default", "runtime.threads": "1"},
        {"train.flush_denormal": "false", "train.cuda_graphs": "false", "runtime.fast_paths": "false"},
    ],
)
def test_every_spelling_of_a_runtime_key_reaches_the_runtime(tmp_path: Path, overrides: dict) -> None:
    data = _data(tmp_path / "d.h5")
    cfg = resolve_config("bc", data, action_space=DISCRETE, overrides={"train.epochs": 1, **overrides})
    want = cfgmod.replace(Runtime(), {k.rpartition(".")[2]: v for k, v in overrides.items()})
    assert cfg.runtime == want
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    doc = cfgmod.read_toml(tmp_path / "config.toml")
    assert cfgmod.replace(Runtime(), doc["runtime"]) == want
    assert not set(doc["runtime"]) & (set(doc["train"]) | set(doc["algo_config"]))


def test_config_file_runtime_table_and_legacy_places(tmp_path: Path) -> None:
    data = _data(tmp_path / "d.h5")
    new = tmp_path / "new.toml"
    new.write_text('[train]\nepochs = 1\n[runtime]\nthreads = 3\nprecision = "bf16"\n')
    old = tmp_path / "old.toml"
    old.write_text('[train]\nepochs = 1\nthreads = 3\n[algo_config]\nprecision = "bf16"\n')
    for path in (new, old):
        cfg = resolve_config("bc", data, action_space=DISCRETE, config_file=path)
        assert (cfg.runtime.threads, cfg.runtime.precision) == (3, "bf16"), path.name
    with pytest.raises(ConfigError, match=r"\[runtime\]: unknown key\(s\) 'nope'"):
        bad = tmp_path / "bad.toml"
        bad.write_text("[runtime]\nnope = 1\n")
        resolve_config("bc", data, action_space=DISCRETE, config_file=bad)


def test_online_runtime_defaults_to_one_thread_and_takes_the_same_spellings() -> None:
    cfg = loop.resolve_online_config("dqn", "CartPole-v1", overrides={"train.steps": 10})
    assert cfg.runtime == Runtime(threads=1)
    cfg = loop.resolve_online_config(
        "dqn", "CartPole-v1", overrides={"train.steps": 10, "train.threads": 2, "flush_denormal": "false"}
    )
    assert cfg.runtime == Runtime(threads=2, flush_denormal=False)


def test_a_run_written_before_the_runtime_table_resumes_bitwise(tmp_path: Path) -> None:
    data = _data(tmp_path / "d.h5")
    fit("bc", data, tmp_path / "full", epochs=4, seed=3, show_progress=False, **SMALL)
    fit("bc", data, tmp_path / "half", epochs=2, seed=3, show_progress=False, **SMALL)
    _to_old_layout(tmp_path / "half" / "config.toml")
    assert "[runtime]" not in (tmp_path / "half" / "config.toml").read_text()
    torch.set_num_threads(2)
    try:
        resumed = resume(tmp_path / "half", epochs=4, show_progress=False)
        assert torch.get_num_threads() == 1  # the saved runtime, applied again
    finally:
        torch.set_num_threads(1)
    assert resumed.steps == 40
    a, b = _params(tmp_path / "full"), _params(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = (tmp_path / "half" / "config.toml").read_text()
    assert "[runtime]" in text and "threads = 1" in text


def test_an_online_run_written_before_the_runtime_table_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = {"hidden": "16,16", "batch_size": 16, "learning_starts": 50, "train.eval_every": 0}
    settings |= {"train.eval_episodes": 1, "train.eval_envs": 1}
    loop.train_online("dqn", "CartPole-v1", run, steps=100, show_progress=False, **settings)
    _to_old_layout(run / "config.toml")
    more = loop.resume_online(run, steps=200, show_progress=False)
    assert more.env_steps == 200
    assert loop.load_online_config(run).runtime == Runtime(threads=1)


def test_a_resume_keeps_the_runtime_it_started_with(tmp_path: Path) -> None:
    data = _data(tmp_path / "d.h5")
    fit("bc", data, tmp_path / "run", epochs=1, show_progress=False, **SMALL)
    cfg = resolve_config(
        "bc", data, action_space=DISCRETE, overrides={**SMALL, "train.epochs": 2, "runtime.threads": 3}
    )
    with pytest.raises(ConfigError, match=r"config\.toml: the run was started with runtime threads=1"):
        Trainer(cfg, tmp_path / "run").run(resume=True, show_progress=False)
    torch.set_num_threads(1)


def test_run_status(tmp_path: Path) -> None:
    assert run_status(tmp_path / "none").status is None
    data = _data(tmp_path / "d.h5")
    fit("bc", data, tmp_path / "run", epochs=1, show_progress=False, **SMALL)
    status = run_status(tmp_path / "run")
    assert status.status == "finished" and not status.resumable and status.info["passes_done"] == 1
    info = {**status.info, "status": "running"}
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    assert run_status(tmp_path / "run").resumable


def test_accumulator_names_the_first_non_finite_update() -> None:
    acc = MetricAccumulator(torch.device("cpu"))
    for loss, q in ((1.0, 2.0), (3.0, float("inf")), (float("nan"), 1.0), (5.0, 1.0)):
        acc.add({"loss": torch.tensor(loss), "q": torch.tensor(q)})
    with pytest.raises(TrainingDiverged, match=r"non-finite 'q' at update 8$"):
        acc.read(10, "update")  # updates 7..10 were added: 'q' first failed at 8, 'loss' at 9
    acc.add({"loss": torch.tensor(1.0), "q": torch.tensor(3.0)})
    assert acc.read(11, "update") == {"loss": 1.0, "q": 3.0}


def test_online_divergence_is_diagnosed_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offrl.online import dqn

    original = dqn.DQN.update

    def poisoned(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        if self.num_updates == 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(dqn.DQN, "update", poisoned)
    run = tmp_path / "run"
    settings = {"hidden": "16,16", "batch_size": 16, "learning_starts": 20, "train.eval_every": 0}
    settings |= {"train.log_every": 50, "train.checkpoint_every": 20}
    with pytest.raises(loop.OnlineDiverged, match=r"non-finite 'loss' at update 7; ") as err:
        loop.train_online("dqn", "CartPole-v1", run, steps=200, show_progress=False, **settings)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert f"(environment step {latest['env_steps']})" in str(err.value)
    assert run_status(run).status == "diverged"


def test_algos_lists_hyperparameters_and_runtime_apart(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["algos", "cql"]) == 0
    out = capsys.readouterr().out
    hyper, rest = out.split("runtime settings", 1)
    runtime, trainer = rest.split("trainer settings", 1)
    assert "cql_alpha" in hyper and "precision" not in hyper and "compile" not in hyper
    for key in ("threads", "flush_denormal", "precision", "compile", "cuda_graphs", "fast_paths"):
        assert re.search(rf"^  {key} ", runtime, re.M), key
    assert "eval_every" in trainer and "threads" not in trainer


def test_algos_shows_the_online_runtime_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Online runs default to one thread (small networks run fastest there), and `offrl algos` says so."""
    threads = re.compile(r"^  threads +(\d+) ", re.M)
    assert cli.main(["algos", "sac"]) == 0
    assert threads.findall(capsys.readouterr().out) == ["1"]
    assert cli.main(["algos", "cql"]) == 0
    assert threads.findall(capsys.readouterr().out) == ["2"]
