"""Files offrl reads back, and the atomicity of what it writes (docs/reliability.md).

Every damaged weights file, malformed checkpoint JSON, run config or policy artefact is refused in one
line naming the file and the field; a full disk during a checkpoint names the file; what a kill leaves
behind is swept on the next start or resume; the policy folder is replaced as a whole.

``CASES`` lists the damaged-file cases as ``(id, damage, command, expected text)``; each runs
``offrl.cli.main`` in-process on a copy of one small trained run.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from safetensors.torch import load_file, save_file

from offrl import cli
from offrl.checkpoint import FileContentError, LatestFileError, StateFileError, WeightsFileError
from offrl.errors import CheckpointError, OfflineRLError

STATE = "checkpoints/pass_000001/state.safetensors"
STATE_JSON = "checkpoints/pass_000001/state.json"
LATEST = "checkpoints/latest.json"
POLICY = "policy/policy.safetensors"
POLICY_JSON = "policy/policy.json"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(dataset, run)``: a small CartPole dataset and a one-pass BC run on it (never modified)."""
    from offrl.data.recorder import record
    from offrl.policies.scripted import make_scripted

    root = tmp_path_factory.mktemp("reliability-files")
    env = gym.make("CartPole-v1")
    policy = make_scripted("cartpole-eps0.1", env.observation_space, env.action_space, seed=0)
    data = record("CartPole-v1", policy, episodes=2, seed=0, out=root / "cp.h5", progress=False)
    args = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(root / "run"), "--epochs", "1"]
    assert cli.main([*args, "--set", "hidden=16,16", "--set", "eval_every=0"]) == 0
    return data, root / "run"


# -- damage ------------------------------------------------------------------------------------------
def truncate(rel: str) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        p = run / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return f


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        p = run / rel
        p.write_bytes(content.encode() if isinstance(content, str) else content)

    return f


def edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:  # type: ignore[type-arg]
    def f(run: Path) -> None:
        p = run / rel
        doc = json.loads(p.read_text())
        out = change(doc)
        p.write_text(json.dumps(doc if out is None else out))

    return f


def edit_tensors(rel: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        p = run / rel
        tensors = load_file(str(p))
        change(tensors)
        save_file(tensors, str(p))

    return f


def _first_weight(tensors: dict[str, torch.Tensor], prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].is_floating_point())


def poison(rel: str, prefix: str, value: float) -> Callable[[Path], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[_first_weight(t, prefix)].view(-1)[0] = value

    return edit_tensors(rel, change)


def drop_key(*path: str) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def change(doc: dict) -> None:  # type: ignore[type-arg]
        for k in path[:-1]:
            doc = doc[k]
        del doc[path[-1]]

    return change


def set_key(key: str, value: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def change(doc: dict) -> None:  # type: ignore[type-arg]
        doc[key] = value

    return change


def remove_toml_line(prefix: str) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        p = run / "config.toml"
        p.write_text("".join(line for line in p.read_text().splitlines(True) if not line.startswith(prefix)))

    return f


def point_outside(run: Path) -> None:
    """``latest.json`` names a complete checkpoint of another run, beside this one."""
    shutil.copytree(run / "checkpoints", run.parent / "other" / "checkpoints", dirs_exist_ok=True)
    write(LATEST, '{"checkpoint": "../../other/checkpoints/pass_000001"}')(run)


RESUME = ["train", "--resume", "{run}", "--epochs", "2"]
EVALUATE = ["evaluate", "{run}", "--episodes", "1"]
OPE = ["ope", "{run}", "--dataset", "{data}", "--method", "is", "--true-episodes", "0"]

# (id, damage, command, texts the one error line must hold)
CASES: list[tuple[str, Callable[[Path], None], list[str], list[str]]] = [
    # 1. broken weights files
    ("state-truncated", truncate(STATE), RESUME, [STATE, "not a valid safetensors file"]),
    ("state-empty", write(STATE, b""), RESUME, [STATE, "is empty (0 bytes)"]),
    ("state-not-safetensors", write(STATE, "not weights\n" * 20), RESUME, [STATE, "not a valid safetensors"]),
    ("policy-truncated-evaluate", truncate(POLICY), EVALUATE, [POLICY, "not a valid safetensors file"]),
    ("policy-empty-evaluate", write(POLICY, b""), EVALUATE, [POLICY, "is empty (0 bytes)"]),
    ("policy-garbage-evaluate", write(POLICY, "x" * 100), EVALUATE, [POLICY, "not a valid safetensors"]),
    ("policy-truncated-ope", truncate(POLICY), OPE, [POLICY, "not a valid safetensors file"]),
    ("policy-empty-ope", write(POLICY, b""), OPE, [POLICY, "is empty (0 bytes)"]),
    # 2. malformed checkpoint JSON and run config
    ("latest-empty-object", write(LATEST, "{}"), RESUME, [LATEST, "'checkpoint' is missing"]),
    ("latest-garbage", write(LATEST, "garbage{"), RESUME, [LATEST, "is not valid JSON"]),
    ("latest-list", write(LATEST, "[]"), RESUME, [LATEST, "holds a list, expected an object"]),
    ("latest-not-a-string", write(LATEST, '{"checkpoint": 5}'), RESUME, [LATEST, "'checkpoint' is 5"]),
    (
        "latest-outside-run",
        point_outside,
        RESUME,
        [LATEST, "not a checkpoint folder of this run"],
    ),
    (
        "state-json-no-state",
        edit_json(STATE_JSON, drop_key("state")),
        RESUME,
        [STATE_JSON, "'state' is missing"],
    ),
    ("state-json-list", write(STATE_JSON, "[1, 2]"), RESUME, [STATE_JSON, "holds a list"]),
    ("state-json-garbage", write(STATE_JSON, "{"), RESUME, [STATE_JSON, "is not valid JSON"]),
    (
        "state-json-version-string",
        edit_json(STATE_JSON, set_key("checkpoint_version", "one")),
        RESUME,
        [STATE_JSON, "'checkpoint_version' is 'one', expected an integer"],
    ),
    (
        "state-json-version-float",
        edit_json(STATE_JSON, set_key("checkpoint_version", 1.5)),
        RESUME,
        [STATE_JSON, "'checkpoint_version' is 1.5, expected an integer"],
    ),
    (
        "meta-pass-missing",
        edit_json(STATE_JSON, drop_key("meta", "pass")),
        RESUME,
        [STATE_JSON, "'meta.pass' is missing"],
    ),
    (
        "sampler-missing",
        edit_json(STATE_JSON, drop_key("state", "__dict__", "sampler")),
        RESUME,
        [STATE_JSON, "'state.sampler' is missing"],
    ),
    (
        "sampler-field-missing",
        edit_json(STATE_JSON, drop_key("state", "__dict__", "sampler", "__dict__", "position")),
        RESUME,
        [STATE_JSON, "'state.sampler' does not fit this run"],
    ),
    (
        "rng-wrong-size",
        edit_tensors(STATE, lambda t: t.update(torch_rng=t["torch_rng"][:100].clone())),
        RESUME,
        [STATE_JSON, "'state.torch_rng' does not fit this run", "found a uint8 tensor of shape (100,)"],
    ),
    (
        "algo-rng-wrong-size",
        edit_tensors(STATE, lambda t: t.update({"algo.generator": t["algo.generator"][:7].clone()})),
        RESUME,
        [STATE_JSON, "'state.algo' does not fit this run"],
    ),
    ("config-no-algo", remove_toml_line("algo ="), RESUME, ["config.toml: 'algo' is missing"]),
    ("config-no-dataset", remove_toml_line("dataset ="), RESUME, ["config.toml: 'dataset' is missing"]),
    # 3. malformed policy.json
    ("policy-json-garbage", write(POLICY_JSON, "{not json"), EVALUATE, [POLICY_JSON, "is not valid JSON"]),
    (
        "policy-json-list",
        write(POLICY_JSON, "[]"),
        EVALUATE,
        [POLICY_JSON, "holds a list, expected an object"],
    ),
    (
        "policy-json-no-arch",
        edit_json(POLICY_JSON, drop_key("arch")),
        EVALUATE,
        [POLICY_JSON, "'arch' is missing"],
    ),
    (
        "policy-json-hidden-string",
        edit_json(POLICY_JSON, lambda d: d["arch"].update(hidden="16,16")),
        EVALUATE,
        [POLICY_JSON, "'arch.hidden' is '16,16', expected a list of layer widths"],
    ),
    (
        "policy-json-version-string",
        edit_json(POLICY_JSON, set_key("artifact_version", "1")),
        EVALUATE,
        [POLICY_JSON, "'artifact_version' is '1', expected an integer"],
    ),
    ("policy-json-garbage-ope", write(POLICY_JSON, "[]"), OPE, [POLICY_JSON, "holds a list"]),
    # non-finite values refused at load
    (
        "state-nan",
        poison(STATE, "algo.nets.", float("nan")),
        RESUME,
        [STATE, "'algo.nets.", "NaN or infinite"],
    ),
    ("policy-inf", poison(POLICY, "net.", float("inf")), EVALUATE, [POLICY, "'net.", "NaN or infinite"]),
]


def fmt(args: list[str], run: Path, data: Path) -> list[str]:
    return [a.format(run=run, data=data) for a in args]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must fail with one line on stderr and no traceback. Returns the line."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "tb" not in p.parts
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_file_is_one_line_naming_it(
    case: tuple[str, Callable[[Path], None], list[str], list[str]],
    base: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, damage, command, expected = case
    data, run = base[0], tmp_path / "run"
    shutil.copytree(base[1], run)
    damage(run)
    before = tree(run)
    line = one_line_error(capsys, fmt(command, run, data))
    for text in expected:
        assert text.replace("{run}", str(run)) in line, line
    assert tree(run) == before  # the run folder is left as it was


@pytest.mark.parametrize(
    "damage,error,text",
    [
        (write(POLICY, b""), WeightsFileError, "is empty"),
        (truncate(POLICY), WeightsFileError, "not a valid safetensors file"),
        (write(POLICY_JSON, "[]"), FileContentError, "holds a list"),
        (edit_json(POLICY_JSON, drop_key("arch")), FileContentError, "'arch' is missing"),
        (
            edit_json(POLICY_JSON, lambda d: d["arch"].update(hidden="16,16")),
            FileContentError,
            "'arch.hidden'",
        ),
        (edit_json(POLICY_JSON, set_key("artifact_version", 1.0)), FileContentError, "'artifact_version'"),
        (
            edit_json(POLICY_JSON, lambda d: d["arch"].update(hidden=[16, 0])),
            FileContentError,
            "positive integer",
        ),
        (poison(POLICY, "normalizer.", float("nan")), WeightsFileError, "NaN or infinite"),
    ],
)
def test_load_policy_refuses_damaged_artefact(
    damage: Callable[[Path], None], error: type[Exception], text: str, base: tuple[Path, Path], tmp_path: Path
) -> None:
    import offrl

    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    damage(run)
    with pytest.raises(error, match="policy") as info:
        offrl.load_policy(run)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, OfflineRLError)
    assert text in str(info.value) and str(run / "policy") in str(info.value)


def test_error_types_per_file_kind(base: tuple[Path, Path], tmp_path: Path) -> None:
    from offrl.checkpoint import latest_checkpoint, load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    write(LATEST, "{}")(run)
    with pytest.raises(LatestFileError):
        latest_checkpoint(run / "checkpoints")
    edit_json(STATE_JSON, drop_key("state"))(run)
    with pytest.raises(StateFileError):
        load_checkpoint(run / "checkpoints" / "pass_000001")


def test_undamaged_run_resumes_and_evaluates(base: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    assert cli.main(fmt(RESUME, run, base[0])) == 0
    assert json.loads((run / LATEST).read_text())["pass"] == 2
    assert cli.main(fmt(EVALUATE, run, base[0])) == 0


# -- full disk during a checkpoint -----------------------------------------------------------------------
def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_during_checkpoint_names_the_file(base: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--algo", "bc", "--dataset", str(base[0]), "--out", str(run), "--epochs", "1"]
    argv += ["--set", "hidden=256,256", "--set", "eval_every=0"]  # about 0.8 MB of state
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from offrl.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        env={**os.environ, "OFFRL_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{run / STATE}: could not be written (" in lines[0]
    assert "File too large" in lines[0]
    # nothing half-written is left: no checkpoint, no staging folder, no latest.json
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []


# -- what a kill leaves behind ------------------------------------------------------------------------------
def test_leftovers_of_a_killed_checkpoint_write_are_swept_on_resume(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    ck = run / "checkpoints"
    leftovers = [
        ck / ".pass_000002.partial-abc123",  # a staging folder
        ck / ".pass_000002.x7k2m9qz",  # a staging folder of an earlier version
        run / ".policy.partial-def456",  # a staging policy folder
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "state.safetensors").write_bytes(b"\0" * 1000)
    (ck / ".latest.json.q1w2e3.tmp").write_text("{")
    (run / ".run.json.r4t5y6.tmp").write_text("{")
    (run / ".mine").mkdir()  # not offrl's: kept
    (run / ".notes.tmp").write_text("the user's")  # not a name offrl writes: kept
    assert cli.main(fmt(RESUME, run, base[0])) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "pass_000001", "pass_000002"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".mine", ".notes.tmp"]


def test_checkpoint_moved_aside_by_a_kill_is_put_back(base: tuple[Path, Path], tmp_path: Path) -> None:
    """A kill between the two renames that replace a checkpoint folder leaves it as ``.NAME.old``."""
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    ck = run / "checkpoints"
    os.replace(ck / "pass_000001", ck / ".pass_000001.old")
    os.replace(run / "policy", run / ".policy.old")
    assert cli.main(fmt(RESUME, run, base[0])) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "pass_000001", "pass_000002"]
    assert (run / "policy" / "policy.json").is_file() and not (run / ".policy.old").exists()


def test_policy_export_is_atomic_across_its_files(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after the new weights are written but before the JSON keeps the old pair whole."""
    import offrl

    folder = tmp_path / "policy"
    shutil.copytree(base[1] / "policy", folder)
    before = tree(folder)
    policy = offrl.load_policy(folder)
    with torch.no_grad():
        next(policy.net.parameters()).add_(1.0)
    real_write_text = Path.write_text

    def killed(self: Path, *args: object, **kwargs: object) -> int:
        if "policy.json" in self.name:
            raise KeyboardInterrupt  # stands for SIGKILL between the two files
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        policy.save(folder, extra={"pass": 2})
    monkeypatch.undo()
    assert tree(folder) == before  # weights and JSON both from the first save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no staging folder left
    policy.save(folder, extra={"pass": 2})
    assert json.loads((folder / "policy.json").read_text())["pass"] == 2
    assert torch.equal(next(offrl.load_policy(folder).net.parameters()), next(policy.net.parameters()))


def test_policy_saved_into_a_shared_folder_keeps_other_files(base: tuple[Path, Path], tmp_path: Path) -> None:
    import offrl

    policy = offrl.load_policy(base[1])
    (tmp_path / "notes.txt").write_text("mine")
    policy.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert offrl.load_policy(tmp_path).kind == policy.kind


def test_nothing_is_unpickled() -> None:
    """docs/reliability.md: offrl never unpickles (no torch.load, pickle or weights_only=False)."""
    root = REPO / "offrl"
    banned = (
        "torch.load(",
        "import pickle",
        "pickle.load",
        "weights_only=False",
        "np.load(",
        "allow_pickle=True",
    )
    found = [f"{p.relative_to(root)}: {b}" for p in root.rglob("*.py") for b in banned if b in p.read_text()]
    assert found == []
