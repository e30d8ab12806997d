"""Exported policies (ONNX, torch.export's .pt2) act as ``policy.act(obs)`` does, for every policy kind.

Each kind comes from a registered algorithm (tiny networks, three updates), saved and loaded as an artefact
as ``offrl export`` reads it. On 1,000 observations drawn around the data (the normaliser's mean ± 3 std,
clipped to the observation space), the file's actions through onnxruntime and through
``torch.export.load(...).module()`` equal ``policy.act``: continuous ones within 1e-5 of the action range,
discrete ones exactly (argmax ties → the lowest index, in torch and in ONNX alike).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.algos.registry import algorithm_class
from offrl.cli import main
from offrl.policies.artifact import POLICY_KINDS, TorchPolicy, load_policy
from offrl.policies.export import EXPORTED, REFUSED, ExportError, export_policy
from offrl.preprocess import ObsNormalizer
from offrl.types import Batch

ort = pytest.importorskip("onnxruntime")

OBS_SPACE = gym.spaces.Box(-5.0, 5.0, shape=(4,), dtype=np.float32)  # bounds inside mean ± 3 std: clipping
BOX = gym.spaces.Box(low=np.array([-2.0, 2.0], np.float32), high=np.array([2.0, 5.0], np.float32))
DISCRETE = gym.spaces.Discrete(3, start=1)  # a non-zero start: exported indices are shifted too
MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0])
STD = torch.tensor([2.0, 0.5, 1.0, 3.0])
ROOT = Path(__file__).resolve().parent.parent

# kind → (algorithm, discrete, config overrides)
KINDS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "deterministic": ("bc", False, {"policy": "deterministic"}),
    "tanh_gaussian": ("bc", False, {"policy": "gaussian"}),
    "categorical": ("bc", True, {}),
    "q_greedy": ("cql", True, {}),
    "bcq": ("bcq", False, {}),
    "bcq_discrete": ("bcq", True, {}),
}


def trained(name: str, discrete: bool, **overrides: Any) -> Any:
    cls = algorithm_class(name, discrete=discrete)
    cfg = cls.Config()
    small = {
        f.name: (16, 16)
        for f in dataclasses.fields(cfg)
        if isinstance(getattr(cfg, f.name), tuple) and all(type(v) is int for v in getattr(cfg, f.name))
    }
    config = dataclasses.replace(cfg, **small, batch_size=32, **overrides)
    algo = cls(
        config,
        OBS_SPACE,
        DISCRETE if discrete else BOX,
        normalizer=ObsNormalizer(4, MEAN.clone(), STD.clone()),
        seed=0,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        if discrete:
            actions = torch.randint(0, 3, (32,), generator=g)
        else:
            actions = torch.rand(32, 2, generator=g) * 1.8 - 0.9
        algo.update(
            Batch(
                obs=torch.randn(32, 4, generator=g),
                actions=actions,
                rewards=torch.randn(32, generator=g),
                next_obs=torch.randn(32, 4, generator=g),
                terminals=torch.zeros(32),
            )
        )
    return algo


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policies")
    out = {}
    for kind, (name, discrete, overrides) in KINDS.items():
        algo = trained(name, discrete, **overrides)
        assert algo.policy().kind == kind
        out[kind] = algo.policy().save(root / kind)
    return out


def around_data(policy: TorchPolicy, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Observations uniform in the normaliser's mean ± 3 std, clipped to the observation space."""
    mean = policy.normalizer.mean.cpu().numpy()
    std = policy.normalizer.std.cpu().numpy()
    obs = np.random.default_rng(seed).uniform(mean - 3 * std, mean + 3 * std, size=(n, mean.size))
    space = policy.observation_space
    assert isinstance(space, gym.spaces.Box)
    return np.clip(obs, space.low, space.high).astype(np.float32)


def run_onnx(path: Path, obs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"observations": obs})[0]


def run_pt2(path: Path, obs: np.ndarray) -> np.ndarray:
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(torch.from_numpy(obs)).numpy()


RUNNERS = {"onnx": run_onnx, "pt2": run_pt2}


def assert_same_actions(policy: TorchPolicy, got: np.ndarray, want: np.ndarray) -> float:
    """Equal actions (shape, dtype, values); returns the largest error relative to the action range."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if isinstance(policy.action_space, gym.spaces.Discrete):
        np.testing.assert_array_equal(got, want)
        return 0.0
    assert isinstance(policy.action_space, gym.spaces.Box)
    span = (policy.action_space.high - policy.action_space.low).astype(np.float64)
    rel = float((np.abs(got.astype(np.float64) - want) / span).max())
    assert rel <= 1e-5, rel
    return rel


# ONNX exports take about a second each: two kinds (a continuous and a discrete one) in the fast suite
FAST_ONNX = {"tanh_gaussian", "bcq_discrete"}
CASES = [
    pytest.param(
        kind,
        fmt,
        marks=[pytest.mark.slow] if fmt == "onnx" and kind not in FAST_ONNX else [],
        id=f"{kind}-{fmt}",
    )
    for kind in KINDS
    for fmt in ("pt2", "onnx")
]


def test_every_kind_is_exported_or_refused() -> None:
    assert set(EXPORTED) | set(REFUSED) == set(POLICY_KINDS)
    assert set(KINDS) == set(EXPORTED)


@pytest.mark.parametrize(("kind", "fmt"), CASES)
def test_exported_actions_equal_act(kind: str, fmt: str, artefacts: dict[str, Path], tmp_path: Path) -> None:
    policy = load_policy(artefacts[kind])
    obs = around_data(policy)
    path = export_policy(artefacts[kind], fmt, tmp_path / f"policy.{fmt}")
    assert_same_actions(policy, RUNNERS[fmt](path, obs), policy.act(obs))
    # the batch dimension is dynamic: one observation, and a batch of another size
    for n in (1, 7):
        assert_same_actions(policy, RUNNERS[fmt](path, obs[:n]), policy.act(obs[:n]))


def test_argmax_ties_pick_the_lowest_index(tmp_path: Path) -> None:
    """Q-values tied between actions: torch, the .pt2 program and onnxruntime all take the first."""
    algo = trained("cql", True)
    policy = algo.policy()
    last = policy.net.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    obs = around_data(policy, 50)
    want = np.full(50, DISCRETE.start, dtype=np.int64)  # all three tied: index 0
    np.testing.assert_array_equal(policy.act(obs), want)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 1.0, 1.0]))  # actions 1 and 2 tied above action 0
    for fmt, run in RUNNERS.items():
        path = export_policy(policy, fmt, tmp_path / f"tied.{fmt}")
        np.testing.assert_array_equal(run(path, obs), want + 1)
    np.testing.assert_array_equal(policy.act(obs), want + 1)


def test_export_uses_the_plain_path_not_the_speed_layer(artefacts: dict[str, Path], tmp_path: Path) -> None:
    """A live BCQ policy's critic may have a speed-layer kernel installed (fused linear on large inputs):
    the exported graph computes the plain path, and the live policy is left as it was."""

    def refuse(*args: Any) -> None:
        raise AssertionError("the speed layer's kernel was traced")

    policy = load_policy(artefacts["bcq"])
    kernels = [m for m in policy.net.modules() if hasattr(m, "kernel")]
    assert kernels
    obs = around_data(policy, 64)
    want = policy.act(obs)
    for m in kernels:
        m.kernel = refuse
    path = export_policy(policy, "pt2", tmp_path / "bcq.pt2")
    assert all(m.kernel is refuse for m in kernels)
    assert_same_actions(policy, run_pt2(path, obs), want)


def test_cli_exports_a_run_folder_and_an_artefact(
    artefacts: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    load_policy(artefacts["deterministic"]).save(run / "policy")
    out = tmp_path / "out" / "policy.pt2"
    assert main(["export", str(run), "--format", "pt2", "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["export", str(run), "--format", "pt2", "--out", str(out)]) == 1  # exists: --force replaces
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(run), "--format", "pt2", "--out", str(out), "--force"]) == 0
    assert (
        main(["export", str(artefacts["q_greedy"]), "--format", "onnx", "--out", str(tmp_path / "q.onnx")])
        == 0
    )
    policy = load_policy(artefacts["q_greedy"])
    obs = around_data(policy, 32)
    np.testing.assert_array_equal(run_onnx(tmp_path / "q.onnx", obs), policy.act(obs))
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary files left behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "{missing}", "--format", "pt2", "--out", "{tmp}/p.pt2"], "no policy artefact"),
        (["export", "{policy}", "--format", "pt2", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_cli_refusals_are_one_line(
    argv: list[str], message: str, artefacts: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    args = [
        a.format(missing=tmp_path / "nothing", tmp=tmp_path, policy=artefacts["categorical"]) for a in argv
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("offrl export: error:") and message in err and "\n" not in err


def test_unknown_format_and_missing_extra(
    artefacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_policy(artefacts["categorical"], "tflite", tmp_path / "p.tflite")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    with pytest.raises(ExportError, match=r"offrl\[export\]"):
        export_policy(artefacts["categorical"], "onnx", tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


def deploy_example() -> str:
    """The Python code block of docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/deploy.md holds one Python example"
    return blocks[0]


def test_deploy_example_runs_on_an_exported_file(artefacts: dict[str, Path], tmp_path: Path) -> None:
    code = deploy_example()
    assert len(code.strip().splitlines()) <= 20
    imports = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, flags=re.M))
    assert imports <= {"numpy", "onnxruntime"}, imports
    export_policy(artefacts["tanh_gaussian"], "onnx", tmp_path / "policy.onnx")
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "observations ['N', 4] -> actions ['N', 2]" in done.stdout, done.stdout


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_ood_score_is_a_second_output(fmt: str, artefacts: dict[str, Path], tmp_path: Path) -> None:
    from offrl.audit.ood import fit_monitor

    policy = load_policy(artefacts["deterministic"])
    states = around_data(policy, 4000, seed=3)
    policy.ood_monitor, _ = fit_monitor(states, np.arange(100, 4001, 100), codewords=16, seed=0)
    out = export_policy(policy, fmt, tmp_path / f"p.{fmt}", ood=True)
    obs = np.concatenate([around_data(policy, 500, seed=4), around_data(policy, 10, seed=5) * 3.0])
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["actions", "ood_score"]
        actions, scores = session.run(None, {"observations": obs})
    else:
        with torch.no_grad():
            actions, scores = (t.numpy() for t in torch.export.load(str(out)).module()(torch.from_numpy(obs)))
    np.testing.assert_allclose(actions, policy.act(obs), rtol=0, atol=1e-5 * 4.0)
    np.testing.assert_allclose(scores, policy.ood_score(obs), rtol=1e-4, atol=1e-4)
    above = scores > policy.ood_threshold
    assert above[-10:].mean() > above[:500].mean()  # observations far out score above the in-data ones


def test_exporting_the_ood_score_needs_a_monitor(artefacts: dict[str, Path], tmp_path: Path) -> None:
    policy = load_policy(artefacts["deterministic"])
    assert policy.ood_monitor is None
    with pytest.raises(ExportError, match="carries no OOD monitor"):
        export_policy(policy, "pt2", tmp_path / "p.pt2", ood=True)
