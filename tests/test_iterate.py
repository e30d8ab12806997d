"""``offrl iterate``: rounds grow the dataset file, leave runs, records and iterate.json; reruns skip
finished rounds and never append twice; warm start copies the previous round's weights; a file of
another environment is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch

from offrl import cli
from offrl.data.format import read_raw, validate
from offrl.data.recorder import record
from offrl.errors import ConfigError, DatasetError
from offrl.iterate import ITERATE_JSON, iterate
from offrl.policies import RandomPolicy
from offrl.utils import file_sha256

ENV = "CartPole-v1"
TINY: dict[str, Any] = {  # small nets, few short evaluations, one thread: seconds per round
    "hidden": (16, 16),
    "batch_size": 64,
    "train.eval_episodes": 2,
    "train.eval_envs": 1,
    "train.threads": 1,
}


def _run(data: Path, out: Path, rounds: int = 2, **kw: Any) -> Any:
    args = {"rounds": rounds, "steps_per_round": 200, "epochs": 1, "show_progress": False, **TINY, **kw}
    return iterate(ENV, "bc", data, out, **args)


def _state(out: Path) -> dict[str, Any]:
    return json.loads((out / ITERATE_JSON).read_text())


def _records(out: Path) -> dict[int, dict[str, Any]]:
    recs = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    return {r["iterate"]["round"]: r for r in recs}


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("iterate")
    data, out = root / "data.h5", root / "it"
    result = _run(data, out)
    assert result.ran == [0, 1] and result.skipped == []
    return data, out


def test_rounds_grow_the_file_and_leave_runs_records_and_summary(two_rounds: tuple[Path, Path]) -> None:
    data, out = two_rounds
    raw = read_raw(data)
    assert raw.num_transitions == 400 and validate(data) == []
    assert raw.policies == ["random", "bc policy of iterate round 0"]  # round 1 deployed round 0's policy
    markers = raw.metadata["iterate_appends"]
    assert [m["rows"] for m in markers] == [[0, 200], [200, 400]]

    state = _state(out)
    rounds = state["rounds"]
    assert [r["dataset_transitions"] for r in rounds] == [200, 400]
    assert [r["env_samples"] for r in rounds] == [200, 400]
    assert all(r["status"] == "finished" and r["final_eval"]["episodes"] == 2 for r in rounds)
    assert rounds[1]["dataset_sha256"] == file_sha256(data)
    assert rounds[0]["collect_seed"] != rounds[1]["collect_seed"]
    for k in (0, 1):
        run = out / f"round_{k:03d}"
        assert (run / "policy" / "policy.json").is_file()
        assert json.loads((run / "run.json").read_text())["status"] == "finished"

    recs = _records(out)
    for k, rec in recs.items():
        assert rec["status"] == "finished" and rec["kind"] == "offline" and rec["x_unit"] == "gradient_steps"
        assert rec["cell"]["info"]["dataset_transitions"] == 200 * (k + 1)  # the report's x position
        assert rec["cell"]["env_id"] == ENV and rec["run_dir"] == f"round_{k:03d}"
        assert rec["final"]["return_mean"] == rounds[k]["final_eval"]["return_mean"]
    assert len({r["task"] for r in recs.values()}) == 2  # one point per round in the report


def test_report_draws_rounds_beside_an_online_baseline(two_rounds: tuple[Path, Path], tmp_path: Path) -> None:
    from offrl.bench.report import write_report

    _, out = two_rounds
    results = tmp_path / "results"
    (results / "records").mkdir(parents=True)
    for p in (out / "records").glob("*.json"):
        (results / "records" / p.name).write_text(p.read_text())
    ev = {"step": 300, "return_mean": 30.0, "return_std": 1.0, "normalized_score": None}
    online: dict[str, Any] = {"cell_id": "online-dqn", "kind": "online", "algo": "dqn (online)", "task": ENV}
    online.update({"status": "finished", "evaluations": [ev], "final": ev, "steps": 300})
    (results / "records" / "online-dqn.json").write_text(json.dumps(online))
    text = write_report(results, tmp_path / "rep", n_boot=50).read_text()
    assert "| bc-iterate on CartPole-v1 round 001 (offline) | 400 dataset transitions |" in text
    assert (tmp_path / "rep" / "online-CartPole-v1.png").stat().st_size > 0


def test_rerun_skips_finished_rounds(two_rounds: tuple[Path, Path]) -> None:
    data, out = two_rounds
    sha, state = file_sha256(data), _state(out)
    result = _run(data, out)
    assert result.ran == [] and result.skipped == [0, 1]
    assert file_sha256(data) == sha and _state(out)["rounds"] == state["rounds"]
    with pytest.raises(ConfigError, match=r"other settings \(train\.epochs: 1 → 2\)"):
        _run(data, out, epochs=2)


def test_iterate_json_written_before_the_runtime_table_is_continued(
    tmp_path: Path, two_rounds: tuple[Path, Path]
) -> None:
    """Older iterate.json files kept threads in [train] and precision in [algo_config]: same settings."""
    import shutil

    src_data, src_out = two_rounds
    data, out = tmp_path / "data.h5", tmp_path / "it"
    shutil.copy(src_data, data)
    shutil.copytree(src_out, out)
    state = _state(out)
    state["config"]["dataset"] = str(data.resolve())
    run_config = state["run_config"]
    runtime = run_config.pop("runtime")
    run_config["train"].update({k: runtime[k] for k in ("threads", "flush_denormal", "cuda_graphs")})
    run_config["algo_config"].update({k: runtime[k] for k in ("precision", "compile")})
    (out / ITERATE_JSON).write_text(json.dumps(state))
    result = _run(data, out)
    assert result.ran == [] and result.skipped == [0, 1]
    with pytest.raises(ConfigError, match=r"other settings \(runtime\.threads: 1 → 2\)"):
        _run(data, out, **{"train.threads": 2})


def test_append_before_a_crash_is_not_repeated(tmp_path: Path, two_rounds: tuple[Path, Path]) -> None:
    """iterate.json lost round 1 after its data reached the file: the rerun adopts the rows and trains."""
    import shutil

    src_data, src_out = two_rounds
    data, out = tmp_path / "data.h5", tmp_path / "it"
    shutil.copy(src_data, data)
    shutil.copytree(src_out, out)
    state = _state(out)
    state["rounds"] = state["rounds"][:1]
    state["config"]["dataset"] = str(data.resolve())  # the copy's own file
    (out / ITERATE_JSON).write_text(json.dumps(state))
    shutil.rmtree(out / "round_001")

    result = _run(data, out)
    assert result.ran == [1]
    assert read_raw(data).num_transitions == 400
    entry = _state(out)["rounds"][1]
    assert entry["appended_before_restart"] and entry["status"] == "finished"

    # a file changed behind the loop's back is refused, naming the file and the expected size
    record(ENV, RandomPolicy(gym.spaces.Discrete(2)), steps=300, out=data, progress=False)
    with pytest.raises(
        DatasetError, match=r"data\.h5: has 300 transitions, but .* expects 400 before round 2"
    ):
        _run(data, out, rounds=3)


def test_interrupted_training_resumes_and_warm_start_copies_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offrl.checkpoint import latest_checkpoint, load_checkpoint
    from offrl.train import Trainer, load_run_config

    data, out = tmp_path / "data.h5", tmp_path / "it"
    policy = RandomPolicy(gym.spaces.Discrete(2), seed=3)
    record(
        ENV, policy, steps=100, seed=3, out=data, progress=False, ref_min_return=22.0, ref_max_return=500.0
    )

    # crash round 1 after its first pass's checkpoint
    real_save = Trainer._save

    def save_then_crash(self: Trainer, passes_done: int) -> None:
        real_save(self, passes_done)
        if self.run_dir.name == "round_001":
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(data, out, warm_start=True, epochs=2)
    monkeypatch.undo()
    assert _state(out)["rounds"][1]["status"] == "collected"

    result = _run(data, out, warm_start=True, epochs=2)
    assert result.ran == [1] and result.skipped == [0]
    rounds = _state(out)["rounds"]
    assert [r["dataset_transitions"] for r in rounds] == [300, 500] == [r["env_samples"] for r in rounds]
    assert rounds[1]["training_resumed"] and rounds[1]["passes"] == 2
    assert rounds[1]["final_eval"]["normalized_score"] is not None  # the file's references carry over
    assert _records(out)[1]["final"]["normalized_score"] == rounds[1]["final_eval"]["normalized_score"]
    round0 = latest_checkpoint(out / "round_000" / "checkpoints")
    assert rounds[1]["init_from"] == str(round0)

    # warm start: before any update, the networks equal round 0's final ones; a cold start's do not
    cfg = load_run_config(out / "round_001", read_raw(data).action_space)
    assert round0 is not None
    want = load_checkpoint(round0)[0]["algo"]["nets"]
    warm = Trainer(cfg, tmp_path / "warm", init_from=out / "round_000").algo.nets.state_dict()
    cold = Trainer(cfg, tmp_path / "cold").algo.nets.state_dict()
    assert want.keys() == warm.keys()
    assert all(torch.equal(want[k], warm[k]) for k in want)
    assert not all(torch.equal(want[k], cold[k]) for k in want)


def test_a_policy_kind_without_sampling_is_deployed_as_it_is(tmp_path: Path) -> None:
    """Continuous BC acts deterministically and has no log-probabilities: the file then keeps none."""
    data, out = tmp_path / "pendulum.h5", tmp_path / "it"
    lines: list[str] = []
    args = {**TINY, "train.eval_every": 0, "rounds": 2, "steps_per_round": 200, "epochs": 1}
    iterate("Pendulum-v1", "bc", data, out, show_progress=False, log=lines.append, **args)
    raw = read_raw(data)
    assert raw.num_transitions == 400 and raw.action_log_probs is None and validate(data) == []
    assert _state(out)["rounds"][1]["final_eval"] is None and "not evaluated" in lines[1]


def test_a_file_of_another_environment_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "pendulum.h5"
    record(
        "Pendulum-v1", RandomPolicy(gym.make("Pendulum-v1").action_space), steps=5, out=data, progress=False
    )
    with pytest.raises(DatasetError, match=r"pendulum\.h5: was recorded in 'Pendulum-v1', but --env is"):
        _run(data, tmp_path / "it")
    assert not (tmp_path / "it").exists()


def test_cli_iterate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tmp_path / "d.h5", tmp_path / "it"
    argv = ["iterate", "--env", ENV, "--algo", "bc", "--rounds", "1", "--steps-per-round", "200"]
    argv += ["--dataset", str(data), "--out", str(out), "--epochs", "1", "--warm-start"]
    for key, value in {**TINY, "hidden": "16,16"}.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "round 0: 200 transitions, final return" in printed and f"offrl report {out}" in printed
    assert _state(out)["config"]["warm_start"] is True
    assert read_raw(data).num_transitions == 200
    # the same directory with other settings: a clear error naming the change, no traceback
    assert cli.main([*argv, "--seed", "1"]) == 1
    assert "other settings (seed: 0 → 1)" in capsys.readouterr().err
