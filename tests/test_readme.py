"""README.md's tour runs as written in an empty directory.

The commands are parsed from the tour's ``bash`` block and run through ``offrl.cli.main`` in a temporary
directory (named datasets are built into a temporary data directory), in order. Left out: the GPU line.
The D4RL import stands for a user's own file: the test writes one (the recorded file in D4RL layout)
just before it. Only the sizes below change, each substituted explicitly; the Python block runs too, with
fewer epochs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from offrl.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"

# flag as written → the test's smaller value (the same flag, so the command's meaning is unchanged)
SMALLER = {
    "--episodes 50": "--episodes 6",  # record
    "--epochs 40": "--epochs 1",  # train
    "--epochs 80": "--epochs 2",  # train --resume: one more pass
    "--epochs 20": "--epochs 1",  # iterate: passes per round
    "--episodes 20": "--episodes 2",  # evaluate
    "--steps 20000": "--steps 300",  # online
    "--steps 2000": "--steps 50",  # finetune
    "--rounds 5": "--rounds 2",  # iterate
    "--steps-per-round 2000": "--steps-per-round 200",
}
# flags the test adds, per command, to keep defaults from running long
EXTRA = {
    "ope": ["--fqe-epochs", "1", "--true-episodes", "2"],
    "online": [
        "--set",
        "learning_starts=100",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.eval_episodes=1",
    ],
    "finetune": ["--set", "train.eval_episodes=1", "--set", "train.eval_every=0"],
}


def tour_section() -> str:
    text = README.read_text()
    return text[text.index("## A tour") : text.index("## What is where")]


def tour_commands() -> list[str]:
    """The tour's shell commands: continuation lines joined, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", tour_section(), flags=re.S)
    assert block is not None
    joined = block.group(1).replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def python_example() -> str:
    block = re.search(r"```python\n(.*?)```", tour_section(), flags=re.S)
    assert block is not None
    return block.group(1)


def smaller(command: str) -> list[str]:
    for flag, value in SMALLER.items():
        command = re.sub(rf"{re.escape(flag)}(?!\d)", value, command)
    argv = shlex.split(command)
    assert argv[0] == "offrl"
    return argv[1:] + EXTRA.get(argv[1], [])


def test_tour_parses() -> None:
    commands = tour_commands()
    assert sum("--device cuda" in c for c in commands) == 1
    assert any(c.startswith("offrl export ") for c in commands)
    assert all(c.startswith("offrl ") for c in commands)
    files_read = {"cp.h5", "d4rl_file.hdf5", "runs/cql"}
    assert all(any(name in c for c in commands) for name in files_read)
    assert "data.h5" not in tour_section()


@pytest.mark.slow
def test_tour_runs_in_an_empty_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offrl.data.convert import export_d4rl

    pytest.importorskip("onnxscript")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OFFRL_DATA_DIR", str(tmp_path / "data"))
    for command in tour_commands():
        if "--device cuda" in command:
            continue
        argv = smaller(command)
        if argv[:2] == ["convert", "d4rl_file.hdf5"]:
            export_d4rl("cp.h5", "d4rl_file.hdf5")  # the user's own D4RL file
        assert main(argv) == 0, command
    for made in (
        "cp.h5",
        "returns.png",
        "imported.h5",
        "runs/cql/policy",
        "policy.onnx",
        "runs/sac",
        "grow.h5",
    ):
        assert (work / made).exists(), made
    code = python_example().replace("epochs=10", "epochs=1")
    exec(compile(code, "README.md", "exec"), {})
    assert (work / "runs/cql-cp/policy").is_dir()
