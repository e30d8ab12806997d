"""Reliability at the command boundary: every bad input is one line, a run folder has one writer,
resume means what it says, and a full disk or a signal leaves things as they were (issue #15)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl import cli
from offrl.data.writer import DatasetWriter

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = "builtin/cartpole-expert"
SMALL = ["--set", "hidden=8", "--set", "batch_size=64"]


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run the CLI; it must fail with one line of error, no traceback, naming every needle."""
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _synthetic(path: Path, env_id: str | None = None, episodes: int = 4, length: int = 40) -> Path:
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    with DatasetWriter(path, obs_space, gym.spaces.Discrete(2), env_id=env_id) as w:
        for _ in range(episodes):
            o = rng.normal(size=(length + 1, 3)).astype(np.float32)
            w.add_episode(o[:-1], rng.integers(0, 2, size=length), rng.normal(size=length), o[1:], False)
    return path


def _train(capsys: pytest.CaptureFixture[str], data: Path, out: Path, *extra: str) -> None:
    argv = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), *SMALL, *extra]
    assert cli.main(argv) == 0, capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OFFRL_NO_PROGRESS": "1", "PYTHONFAULTHANDLER": "1"}


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory: pytest.TempPathFactory, builtin_dataset) -> Path:  # type: ignore[no-untyped-def]
    """A BC run on CartPole data (1 pass, no evaluation): its policy meets other environments."""
    out = tmp_path_factory.mktemp("cartpole") / "run"
    argv = ["train", "--algo", "bc", "--dataset", str(builtin_dataset(CARTPOLE)), "--out", str(out)]
    assert cli.main([*argv, *SMALL, "--epochs", "1", "--set", "eval_every=0"]) == 0
    return out


# -- defect 4: environments -------------------------------------------------------------------------
def test_unknown_env_id_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cartpole_run: Path
) -> None:
    _fails(
        capsys,
        ["record", "--env", "NoSuchEnv-v0", "--steps", "5", "--out", str(tmp_path / "d.h5")],
        "NoSuchEnv",
    )
    _fails(capsys, ["evaluate", str(cartpole_run), "--env", "NoSuchEnv-v0"], "NoSuchEnv")
    argv = ["iterate", "--env", "NoSuchEnv-v0", "--algo", "bc", "--rounds", "1", "--steps-per-round", "10"]
    _fails(capsys, [*argv, "--dataset", str(tmp_path / "i.h5"), "--out", str(tmp_path / "it")], "NoSuchEnv")
    assert not (tmp_path / "d.h5").exists() and not (tmp_path / "it").exists()


def test_env_that_cannot_be_imported_is_refused_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if "Unimportable-v0" not in gym.registry:
        gym.register("Unimportable-v0", entry_point="offrl_no_such_module:Env")
    data = _synthetic(tmp_path / "d.h5", env_id="Unimportable-v0")
    out = tmp_path / "run"
    argv = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), *SMALL, "--epochs", "1"]
    _fails(capsys, argv, "Unimportable-v0", "offrl_no_such_module")
    assert not out.exists()  # refused before any pass
    # a purely offline run (logs from a real system) needs no simulator
    _train(capsys, data, out, "--epochs", "1", "--set", "eval_every=0")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


# -- defect 5: a policy meets an environment with other spaces --------------------------------------
def test_policy_and_env_spaces_must_match(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cartpole_run: Path
) -> None:
    _fails(capsys, ["evaluate", str(cartpole_run), "--env", "Pendulum-v1"], "Pendulum-v1", "shape")
    out = tmp_path / "d.h5"
    argv = ["record", "--env", "Acrobot-v1", "--policy", str(cartpole_run / "policy"), "--steps", "5"]
    _fails(capsys, [*argv, "--out", str(out)], "Acrobot-v1", "shape")
    assert not out.exists()


# -- defects 6 and 7: settings and their ranges ------------------------------------------------------
@pytest.mark.parametrize(
    "algo,setting,needle",
    [
        ("bc", "hidden=0", "hidden"),
        ("cql", "actor_hidden=0", "actor_hidden"),
        ("bc", "hidden=", "hidden"),
        ("bc", "hidden=-5", "hidden"),
        ("bc", "lr=-1", "lr"),
        ("bc", "lr=nan", "lr"),
        ("bc", "threads=0", "threads"),
        ("bc", "checkpoint_every=0", "checkpoint_every"),
        ("bc", "log_every=0", "log_every"),
        ("bc", "eval_episodes=0", "eval_episodes"),
        ("bc", "eval_envs=0", "eval_envs"),
        ("bc", "eval_every=-1", "eval_every"),
        ("cql", "gamma=2", "gamma"),
        ("cql", "tau=-1", "tau"),
    ],
)
def test_settings_out_of_range_are_refused_before_the_run_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, algo: str, setting: str, needle: str
) -> None:
    data = _synthetic(tmp_path / "d.h5")
    out = tmp_path / "run"
    argv = ["train", "--algo", algo, "--dataset", str(data), "--out", str(out), "--epochs", "1"]
    _fails(capsys, [*argv, "--set", setting], needle)
    assert not out.exists()


def test_flags_out_of_range_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5")
    out = tmp_path / "run"
    _fails(
        capsys, ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), "--device", "tpu"], "tpu"
    )
    assert not out.exists()
    _fails(
        capsys, ["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--bootstrap", "0"], "--bootstrap"
    )
    _fails(capsys, ["ope", "random", "--dataset", str(data), "--threads", "0"], "--threads")
    _fails(capsys, ["ope", "random", "--dataset", str(data), "--gamma", "2"], "gamma")


def test_a_config_built_in_code_is_range_checked() -> None:
    from offrl.errors import ConfigError
    from offrl.runtime import Runtime
    from offrl.train import TrainConfig

    with pytest.raises(ConfigError, match="log_every"):
        TrainConfig(log_every=0)
    with pytest.raises(ConfigError, match="threads"):
        Runtime(threads=0)


# -- defect 8: operating-system errors ---------------------------------------------------------------
def test_os_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "d.h5")
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    train = ["train", "--algo", "bc", "--dataset", str(data), "--epochs", "1", "--set", "eval_every=0"]
    _fails(capsys, [*train, "--out", str(afile)], str(afile))
    _fails(capsys, [*train, "--out", str(afile / "run")], str(afile))  # unwritable, also for root
    _fails(capsys, [*train, "--out", str(tmp_path / "r"), "--config", str(folder)], str(folder))
    record = ["record", "--env", "CartPole-v1", "--steps", "5"]
    _fails(capsys, [*record, "--out", str(folder)], str(folder))
    _fails(capsys, [*record, "--out", str(afile / "d.h5")], str(afile))
    _fails(capsys, [*record, "--out", str(tmp_path / "x.h5"), "--obs-dtype", "notadtype"], "notadtype")
    _fails(capsys, ["convert", str(data), "--to", "d4rl", "--out", str(folder)], str(folder))
    _fails(capsys, ["bench", str(folder)], str(folder))
    assert afile.read_text() == "mine\n" and not list(folder.iterdir())


# -- defect 9: a full disk -----------------------------------------------------------------------------
FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from offrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["record", "build"])
def test_a_full_disk_stops_with_one_line_and_leaves_the_destination(tmp_path: Path, command: str) -> None:
    dest = tmp_path / "d.h5"
    dest.write_bytes(b"before")
    if command == "record":
        argv = [
            "record",
            "--env",
            "CartPole-v1",
            "--steps",
            "20000",
            "--quiet",
            "--out",
            str(dest),
            "--force",
        ]
    else:
        argv = ["datasets", "build", CARTPOLE, "--out", str(dest), "--force"]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *argv], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
    assert "writing failed" in proc.stderr and "Traceback" not in proc.stderr
    assert dest.read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]  # no temporary file left


# -- defect 10: a folder that is not an offrl run ----------------------------------------------------
def test_a_folder_that_holds_no_run_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = _synthetic(tmp_path / "d.h5")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.toml").write_text("mine = 1\n")
    (proj / "run.json").write_text('{"status": "mine"}\n')
    argv = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(proj), "--epochs", "1"]
    _fails(capsys, argv, str(proj), "not empty")
    assert (proj / "config.toml").read_text() == "mine = 1\n"
    assert (proj / "run.json").read_text() == '{"status": "mine"}\n'


def test_a_run_stopped_before_its_first_checkpoint_starts_over(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = _synthetic(tmp_path / "d.h5")
    run = tmp_path / "run"
    _train(capsys, data, run, "--epochs", "1")
    # as a kill before the first checkpoint leaves it: records, an empty checkpoints/, no latest.json
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text('{"stale": 1}\n')
    _train(capsys, data, run, "--epochs", "1")
    assert (run / "checkpoints" / "latest.json").exists()
    assert "stale" not in (run / "metrics.jsonl").read_text()
    _fails(
        capsys,
        ["train", "--algo", "bc", "--dataset", str(data), "--out", str(run), "--epochs", "1"],
        str(run),
        "already holds a run",
    )


# -- defect 11: one writer per run folder ------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from offrl.run import RunDirectory
rd = RunDirectory(sys.argv[1], prefix="pass", digits=6, unit="pass")
rd.acquire(resume=False)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = _synthetic(tmp_path / "d.h5")
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        argv = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), *SMALL, "--epochs", "1"]
        _fails(capsys, [*argv, "--set", "eval_every=0"], f"PID {holder.pid}", str(out))
        assert not (out / "run.json").exists()
    finally:
        holder.kill()  # kill -9: the OS drops the lock, nothing stale is left
        holder.wait()
    _train(capsys, data, out, "--epochs", "1", "--set", "eval_every=0")


# -- defects 12 and 13: resume -----------------------------------------------------------------------
def _records(run: Path) -> dict[str, bytes]:
    names = ["run.json", "config.toml", "checkpoints/latest.json", "metrics.jsonl"]
    return {n: (run / n).read_bytes() for n in names}


def test_resume_to_a_target_already_reached_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = _synthetic(tmp_path / "d.h5")
    run = tmp_path / "run"
    _train(capsys, data, run, "--epochs", "4", "--set", "eval_every=0")
    before = _records(run)
    _fails(capsys, ["train", "--resume", str(run), "--epochs", "2"], "4 passes are done", "2 passes")
    _fails(capsys, ["train", "--resume", str(run), "--epochs", "4"], "4 passes are done")
    _fails(capsys, ["train", "--resume", str(run), "--steps", "1"], "4 passes are done")
    assert _records(run) == before
    assert cli.main(["train", "--resume", str(run), "--epochs", "5"]) == 0  # a target beyond: applied
    assert json.loads((run / "run.json").read_text())["passes_done"] == 5


@pytest.mark.parametrize(
    "flags",
    [["--seed", "2"], ["--set", "lr=1"], ["--algo", "cql"], ["--dataset", "x.h5"], ["--device", "cpu"]],
)
def test_resume_refuses_what_cannot_change(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _fails(capsys, ["train", "--resume", str(run), *flags, "--epochs", "3"], flags[0], "cannot change")


def test_resume_finds_a_relative_dataset_from_another_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _synthetic(tmp_path / "a" / "d.h5")
    monkeypatch.chdir(tmp_path / "a")
    _train(capsys, Path("d.h5"), Path("run"), "--epochs", "1", "--set", "eval_every=0")
    info = json.loads(Path("run/run.json").read_text())
    assert info["dataset"] == "d.h5" and info["dataset_absolute"] == str(tmp_path / "a" / "d.h5")
    monkeypatch.chdir(tmp_path / "b")
    assert cli.main(["train", "--resume", str(tmp_path / "a" / "run"), "--epochs", "2"]) == 0


# -- risks: signals, existing destinations, leftovers -------------------------------------------------
@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_records_interrupted(tmp_path: Path, sig: signal.Signals, rc: int) -> None:
    data = _synthetic(tmp_path / "d.h5")
    run = tmp_path / "run"
    argv = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(run), "--epochs", "100000"]
    argv += [*SMALL, "--set", "eval_every=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "offrl.cli", *argv],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background (`make test &`) inherits SIGINT ignored, and so would the
        # run: give it the default disposition, as an interactive shell would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "latest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # still running: abort it so faulthandler (PYTHONFAULTHANDLER) prints where every thread is
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(
            f"{signal.Signals(sig).name} did not stop the run within 60 s; its threads:\n{err[-6000:]}"
        )
    assert proc.returncode == rc, err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == sig.name
    assert "Traceback" not in err


def test_sigterm_stops_a_grid_and_its_workers(tmp_path: Path) -> None:
    """SIGTERM to `offrl bench` reaches the cell a pool worker is running: it records itself
    interrupted and its worker ends, rather than training on with nobody to collect its record."""
    data = _synthetic(tmp_path / "d.h5")
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'seeds = 1\ndatasets = ["{data}"]\n[budget]\nepochs = 100000\n'
        "[train]\neval_every = 0\nthreads = 1\n[algos.bc]\nhidden = [8]\nbatch_size = 64\n"
    )
    results = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "offrl.cli", "bench", str(grid), "--out", str(results), "--workers", "1"],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(results.glob("runs/*/checkpoints/latest.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (run,) = [p.parents[1] for p in results.glob("runs/*/checkpoints/latest.json")]
    worker = int((run / "run.lock").read_text().split()[0])
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"SIGTERM did not stop the grid within 90 s; its threads:\n{err[-6000:]}")
    assert proc.returncode == 143, err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGTERM"
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the pool worker trained on after the grid stopped"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_record_onto_an_existing_file_needs_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dest = tmp_path / "d.h5"
    dest.write_bytes(b"mine")
    record = ["record", "--env", "CartPole-v1", "--steps", "5", "--quiet", "--out", str(dest)]
    _fails(capsys, record, str(dest), "--force")
    _fails(capsys, ["datasets", "build", CARTPOLE, "--out", str(dest)], str(dest), "--force")
    assert dest.read_bytes() == b"mine"
    assert cli.main([*record, "--force"]) == 0 and dest.read_bytes() != b"mine"


def test_a_killed_recording_leaves_a_temporary_file_the_next_one_sweeps(tmp_path: Path) -> None:
    dest = tmp_path / "d.h5"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_killed_recorder.py"), str(dest)], env=_env()
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".d.h5.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert len(list(tmp_path.glob(".d.h5.*.tmp"))) == 1
    assert cli.main(["record", "--env", "CartPole-v1", "--steps", "5", "--quiet", "--out", str(dest)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]


def test_a_temporary_file_being_written_is_not_swept(tmp_path: Path) -> None:
    from offrl.data.writer import sweep_temporaries

    dest = tmp_path / "d.h5"
    script = textwrap.dedent(
        f"""
        import time, gymnasium as gym
        from offrl.data.writer import DatasetWriter
        w = DatasetWriter({str(dest)!r}, gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(2))
        print("open", flush=True)
        time.sleep(60)
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        assert sweep_temporaries(dest) == [] and len(list(tmp_path.glob(".d.h5.*.tmp"))) == 1
    finally:
        writer.kill()
        writer.wait()
    assert len(sweep_temporaries(dest)) == 1
