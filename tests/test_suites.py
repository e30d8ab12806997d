"""Dataset suites: manifests, deterministic builds, SHA-256 records, name resolution, references."""

from __future__ import annotations

import fnmatch
import json
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl import suites
from offrl.cli import main as cli_main
from offrl.data import format as fmt
from offrl.datasets_registry import resolve_dataset
from offrl.errors import DatasetError
from offrl.evaluation import evaluate, normalized_score

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO_SUITES = Path(__file__).resolve().parents[1] / "datasets"
TRAINED_POLICY = "policies/classic/acrobot/medium"


def _tiny_manifest(root: Path) -> Path:
    """A suite of two small Acrobot datasets using a committed trained policy and the random one."""
    shutil.copytree(REPO_SUITES / TRAINED_POLICY, root / TRAINED_POLICY)
    manifest = {
        "manifest_version": 1,
        "suite": "tiny",
        "envs": {
            "acrobot": {
                "env_id": "Acrobot-v1",
                "ref_min_return": -500.0,
                "ref_max_return": -100.0,
                "pending": "expert: still training",
                "expert_shortfall": "scores 80, the best policy trained",
            }
        },
        "datasets": [
            {
                "name": "tiny/acrobot-medium-expert",
                "env": "acrobot",
                "level": "medium-expert",
                "seed": 7,
                "num_envs": 2,
                "components": [
                    {"policy": TRAINED_POLICY, "transitions": 600},
                    {"policy": TRAINED_POLICY, "transitions": 300, "epsilon": 0.2},
                    {"policy": "random", "transitions": 400},
                ],
            },
            {
                "name": "tiny/acrobot-random",
                "env": "acrobot",
                "level": "random",
                "seed": 8,
                "components": [{"policy": "random", "transitions": 300}],
            },
        ],
    }
    path = root / "tiny.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def tiny_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "suites"
    _tiny_manifest(root)
    monkeypatch.setenv("OFFRL_SUITES_DIR", str(root))
    monkeypatch.setenv("OFFRL_DATA_DIR", str(tmp_path / "data"))
    return root


def test_build_twice_gives_identical_arrays_and_digest(tiny_suite: Path, tmp_path: Path) -> None:
    a, rec_a = suites.build("tiny/acrobot-medium-expert", tmp_path / "a.h5", progress=False)
    b, rec_b = suites.build("tiny/acrobot-medium-expert", tmp_path / "b.h5", progress=False)
    ra, rb = fmt.read_raw(a), fmt.read_raw(b)
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(getattr(ra, key), getattr(rb, key), err_msg=key)
    np.testing.assert_array_equal(ra.action_log_probs, rb.action_log_probs)
    assert rec_a["sha256"] == rec_b["sha256"] == suites.arrays_sha256(a)
    assert ra.num_transitions == rec_a["transitions"] == 1300
    # the trained policy acted stochastically: its log-probabilities are those of the executed actions
    assert ra.action_log_probs is not None and np.all(ra.action_log_probs <= 0.0)
    assert ra.policies == [TRAINED_POLICY, f"{TRAINED_POLICY} (ε-greedy 0.2)", "random"]
    assert fmt.validate(a) == []
    assert (ra.ref_min_return, ra.ref_max_return) == (-500.0, -100.0)
    assert ra.metadata["level"] == "medium-expert" and ra.metadata["dataset"] == "tiny/acrobot-medium-expert"


def test_epsilon_greedy_component_logs_its_own_probabilities(tiny_suite: Path, tmp_path: Path) -> None:
    path, _ = suites.build("tiny/acrobot-medium-expert", tmp_path / "a.h5", progress=False)
    raw = fmt.read_raw(path)
    rows = slice(600, 900)  # the ε-greedy component (episodes end at the quota, so rows line up)
    assert raw.action_log_probs is not None
    greedy = np.log(0.8 + 0.2 / 3)
    lp = raw.action_log_probs[rows]
    assert set(np.round(lp, 5)) <= {np.float32(round(greedy, 5)), np.float32(round(np.log(0.2 / 3), 5))}
    assert (np.isclose(lp, greedy)).mean() > 0.7


def test_another_seed_changes_the_digest(tiny_suite: Path, tmp_path: Path) -> None:
    _, rec = suites.build("tiny/acrobot-random", tmp_path / "a.h5", progress=False)
    data = json.loads((tiny_suite / "tiny.json").read_text())
    data["datasets"][1]["seed"] = 9
    (tiny_suite / "tiny.json").write_text(json.dumps(data))
    _, rec2 = suites.build("tiny/acrobot-random", tmp_path / "b.h5", progress=False)
    assert rec["sha256"] != rec2["sha256"]


def test_manifest_record_and_mismatch(tiny_suite: Path, tmp_path: Path) -> None:
    _, rec = suites.build("tiny/acrobot-random", tmp_path / "a.h5", progress=False)
    suites.update_manifest("tiny/acrobot-random", rec)
    spec = suites.get_spec("tiny/acrobot-random")
    assert spec.built["sha256"] == rec["sha256"] and suites.mismatch(spec, rec) is None
    versions = {**rec["package_versions"], "numpy": "0.0"}
    other = {**rec, "sha256": "0" * 64, "package_versions": versions, "normalized_score": -12.5}
    message = suites.mismatch(spec, other)
    assert message is not None and "numpy" in message and "0.0" in message
    assert (
        f"normalised score of the data -12.5 here, {rec['normalized_score']:.1f} in the manifest" in message
    )
    same = {**rec, "sha256": "0" * 64}
    assert "a bug" in (suites.mismatch(spec, same) or "")


def test_build_platform_names_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tiny_suite: Path, tmp_path: Path
) -> None:
    """Two CPUs with the same instruction set can build different bytes, so the record names the model;
    a manifest recorded before platforms named it is compared on the rest."""
    monkeypatch.setattr(suites, "cpu_model", lambda: "Example CPU 9000")
    assert suites.build_platform().endswith(" (Example CPU 9000)")
    _, rec = suites.build("tiny/acrobot-random", tmp_path / "a.h5", progress=False)
    suites.update_manifest("tiny/acrobot-random", {**rec, "platform": rec["platform"].split(" (")[0]})
    spec = suites.get_spec("tiny/acrobot-random")
    assert "a bug" in (suites.mismatch(spec, {**rec, "sha256": "0" * 64}) or "")
    monkeypatch.setattr(suites, "cpu_model", lambda: "Other CPU")
    suites.update_manifest("tiny/acrobot-random", rec)
    spec = suites.get_spec("tiny/acrobot-random")
    moved = {**rec, "sha256": "0" * 64, "platform": suites.build_platform()}
    assert "Example CPU 9000) → " in (suites.mismatch(spec, moved) or "")


def test_behaviour_stats_leave_out_quota_cut_episodes(tiny_suite: Path, tmp_path: Path) -> None:
    path, rec = suites.build("tiny/acrobot-random", tmp_path / "a.h5", progress=False)
    raw = fmt.read_raw(path)
    # 300 random steps never finish a 500-step Acrobot episode: the only episode is cut and is kept
    # because nothing else remains; its return is then the whole file's reward sum
    assert rec["episodes"] == 1 and rec["mean_return"] == pytest.approx(float(raw.rewards.sum()), abs=1e-3)
    stats = suites.behaviour_stats(path, max_episode_steps=200)
    assert stats["whole_episodes"] == 1


def test_names_resolve_and_build_on_first_use(tiny_suite: Path, tmp_path: Path) -> None:
    path = Path(resolve_dataset("tiny/acrobot-random", progress=False))
    assert path == tmp_path / "data" / "tiny" / "acrobot-random.h5" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert Path(resolve_dataset("tiny/acrobot-random", progress=False)).stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="not a named dataset"):
        resolve_dataset("tiny/acrobot-nothing")


def test_cli_list_and_build(tiny_suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny/acrobot-medium-expert" in out and "medium-expert" in out and "1,300" in out
    assert "tiny/acrobot: not listed yet: expert: still training" in out
    assert "tiny/acrobot: expert below its reference: scores 80, the best policy trained" in out
    assert cli_main(["datasets", "build", "tiny/acrobot-random", "--out", str(tmp_path / "r.h5")]) == 0
    assert "300 transitions" in capsys.readouterr().out and fmt.validate(tmp_path / "r.h5") == []
    assert cli_main(["datasets", "build", "tiny"]) == 0  # a whole suite into the data directory
    assert (tmp_path / "data" / "tiny" / "acrobot-medium-expert.h5").exists()
    assert cli_main(["datasets", "build", "tiny/nothing"]) == 1
    assert "no such dataset or suite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(manifest_version=2), "manifest_version"),
        (lambda d: d["datasets"][0].update(level="superb"), "level 'superb'"),
        (
            lambda d: d["datasets"][0].update(env="cartpole"),
            "datasets\\[0\\] \\(tiny/acrobot-medium-expert\\)",
        ),
        (lambda d: d["datasets"][1].pop("components"), "missing or unknown 'components'"),
        (lambda d: d["envs"]["acrobot"].pop("ref_max_return"), "envs.acrobot"),
    ],
)
def test_manifest_errors_name_the_entry(tiny_suite: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tiny_suite / "tiny.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as info:
        suites.all_specs()
    assert "tiny.json" in str(info.value)


def test_missing_policy_artefact_is_named(tiny_suite: Path, tmp_path: Path) -> None:
    shutil.rmtree(tiny_suite / TRAINED_POLICY)
    with pytest.raises(DatasetError, match="behaviour policy artefact not found"):
        suites.build("tiny/acrobot-medium-expert", tmp_path / "a.h5", progress=False)
    assert not (tmp_path / "a.h5").exists()


# -- the committed suites -------------------------------------------------------------------------------
def _repo_specs() -> dict[str, suites.DatasetSpec]:
    specs: dict[str, suites.DatasetSpec] = {}
    for path in sorted(REPO_SUITES.glob("*.json")):
        specs.update({s.name: s for s in suites.load_manifest(path)})
    return specs


def test_committed_manifests_are_complete() -> None:
    specs = _repo_specs()
    assert specs, "no suite manifest committed"
    by_env: dict[str, set[str]] = {}
    for spec in specs.values():
        by_env.setdefault(f"{spec.suite}/{spec.env.key}", set()).add(spec.level)
        for comp in spec.components:
            if comp.policy != "random" and not comp.policy.startswith("scripted:"):
                assert (REPO_SUITES / comp.policy / "policy.json").exists(), (spec.name, comp.policy)
        assert spec.built.get("sha256"), f"{spec.name}: no build record (run datasets/curate.py record)"
        assert spec.built["transitions"] == spec.transitions
    pending = {f"{s.suite}/{s.env.key}": bool(s.env.pending) for s in specs.values()}
    for env, levels in by_env.items():
        # an env whose expert is still training lists the levels below it only
        expected = set(suites.LEVELS) - ({"medium-expert", "expert"} if pending[env] else set())
        assert levels == expected, env
    # the levels are ordered by the behaviour data's normalised score
    for env in by_env:
        score = {
            s.level: s.built["normalized_score"] for s in specs.values() if f"{s.suite}/{s.env.key}" == env
        }
        assert score["random"] < score["medium"], (env, score)
        if pending[env]:  # medium is the best level so far
            assert score["medium-replay"] < score["medium"], (env, score)
        else:
            assert score["medium"] < score["medium-expert"] < score["expert"], (env, score)
            assert score["medium-replay"] < score["expert"], (env, score)


def _references_hold(suite: str, env_key: str) -> None:
    specs = [s for s in _repo_specs().values() if s.suite == suite and s.env.key == env_key]
    env = specs[0].env
    expert = next(s for s in specs if s.level == "expert")
    probe = gym.make(env.env_id)
    scores = {}
    for label, comp in [("random", suites.Component("random", 1)), ("expert", expert.components[0])]:
        policy = suites.resolve_component_policy(comp, probe.observation_space, probe.action_space, 4242)
        result = evaluate(policy, env.env_id, episodes=30, seed=4242, num_envs=10, deterministic=False)
        scores[label] = float(normalized_score(result.mean, env.ref_min_return, env.ref_max_return))
    print(f"{suite}/{env_key}: normalised scores on fresh seeds {scores}")
    assert abs(scores["random"]) <= 15.0, scores
    # an expert listed below its reference says so in the manifest; it must then score as recorded
    target = float(expert.built["normalized_score"]) if env.expert_shortfall else 100.0
    assert abs(scores["expert"] - target) <= 15.0, (scores, target)


@pytest.mark.parametrize(
    "env_key", sorted({s.env.key for s in _repo_specs().values() if s.suite == "classic"})
)
def test_references_hold_on_fresh_seeds(env_key: str) -> None:
    """Random scores ~0 and the expert behaviour policy ~100 on seeds the references did not use.

    30 episodes each; tolerance 15 points (the expert of a thresholded env may beat the threshold, e.g. CartPole's
    500-step cap against its 475 threshold)."""
    _references_hold("classic", env_key)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env_key",
    sorted({s.env.key for s in _repo_specs().values() if s.suite == "locomotion" and s.level == "expert"}),
)
def test_locomotion_references_hold_on_fresh_seeds(env_key: str) -> None:
    """As for the classic suite, for the locomotion envs whose expert is listed (MuJoCo episodes of
    up to 1000 steps make it slow)."""
    pytest.importorskip("mujoco")
    _references_hold("locomotion", env_key)


@pytest.mark.slow
def test_committed_dataset_rebuilds_to_its_manifest_digest(tmp_path: Path) -> None:
    spec = _repo_specs()["classic/cartpole-medium"]
    _, rec = suites.build(spec.name, tmp_path / "a.h5", progress=False)
    _, rec2 = suites.build(spec.name, tmp_path / "b.h5", progress=False)
    assert rec["sha256"] == rec2["sha256"]
    same_setup = (
        rec["package_versions"] == spec.built["package_versions"]
        and rec["platform"] == spec.built["platform"]
    )
    if not same_setup:
        pytest.skip(f"the manifest was built with other versions or platform: {suites.mismatch(spec, rec)}")
    assert rec["sha256"] == spec.built["sha256"], suites.mismatch(spec, rec)


def test_std_scale_component_samples_narrower_with_exact_densities() -> None:
    """A tanh-Gaussian artefact collecting with its std scaled: the stored log-probabilities are those
    of the scaled distribution (recomputed here), and the spread around the mode shrinks."""
    env = gym.make("Pendulum-v1")
    obs = np.stack([env.observation_space.sample() for _ in range(256)]).astype(np.float32)
    spreads = {}
    for scale in (1.0, 0.2):
        comp = suites.Component("policies/classic/pendulum/expert", 1, std_scale=scale)
        policy = suites.resolve_component_policy(comp, env.observation_space, env.action_space, 3)
        actions = policy.act(obs, deterministic=False)
        mode = policy.act(obs, deterministic=True)
        spreads[scale] = float(np.abs(actions - mode).mean())
        lp = policy.log_prob(obs, actions)
        # the density of the same actions under the unscaled policy differs
        plain = suites.resolve_component_policy(
            suites.Component(comp.policy, 1), env.observation_space, env.action_space, 3
        )
        if scale != 1.0:
            assert not np.allclose(lp, plain.log_prob(obs, actions))
        assert np.all(np.isfinite(lp))
    assert spreads[0.2] < 0.35 * spreads[1.0]
    with pytest.raises(DatasetError, match="std_scale needs"):
        suites.resolve_component_policy(
            suites.Component("random", 1, std_scale=0.5), env.observation_space, env.action_space, 0
        )


def test_missing_manifests_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFRL_SUITES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"no suite manifests in .*OFFRL_SUITES_DIR"):
        resolve_dataset("classic/cartpole-medium")
    assert cli_main(["datasets", "build", "classic/cartpole-medium"]) == 1


def test_wheel_carries_every_subpackage_and_suite_file() -> None:
    """pyproject lists offrl's packages explicitly (to map datasets/ to offrl.suite_data): a new
    subpackage or a suite file the package-data globs miss would be left out of the wheel."""
    root = REPO_SUITES.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "offrl").rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"offrl.suite_data"}
    assert setup["package-dir"] == {"offrl.suite_data": "datasets"}
    globs = setup["package-data"]["offrl.suite_data"]
    needed = [p for p in REPO_SUITES.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")]
    assert needed
    for path in needed:
        rel = path.relative_to(REPO_SUITES).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_curation_rules() -> None:
    """datasets/curate.py (a maintainer script): medium is the first snapshot scoring 30–40, else the
    nearest to 35; the replay snapshots run evenly from the first to medium."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("curate", REPO_SUITES / "curate.py")
    assert spec is not None and spec.loader is not None
    curate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curate)
    assert curate.pick_medium([5.0, 20.0, 31.0, 36.0, 80.0]) == 2  # first in the band, not nearest 35
    assert curate.pick_medium([5.0, 15.0, 51.0, 90.0]) == 2  # none in the band: nearest to 35
    assert curate.replay_indices(22, 5) == [0, 6, 11, 16, 22]
    assert curate.replay_indices(2, 10) == [0, 1, 2]
