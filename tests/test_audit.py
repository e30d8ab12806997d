"""Dataset audit and OOD monitor: planted anomalies must rank in the top k of their kind; the monitor's
threshold holds its calibrated rate on unseen data and fires on states the data never showed; artefacts
carry it (and old ones without it still load); the CLI refuses bad input in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from offrl.audit import checks
from offrl.audit.core import Audit, audit, subset_episodes
from offrl.audit.model import ModelConfig
from offrl.audit.ood import NO_MONITOR, fit_monitor
from offrl.cli import main as cli_main
from offrl.data import read_raw, validate
from offrl.data.format import RawDataset
from offrl.data.recorder import record
from offrl.data.writer import write_raw
from offrl.policies import RandomPolicy, resolve_policy

K = 10  # every planted anomaly must rank in the top K of its kind
PENDULUM = "Pendulum-v1"


# -- planting ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Planted:
    raw: RawDataset
    spikes: list[int]  # rows whose reward was replaced
    glitches: list[int]  # rows whose observation was shifted (and the previous row's next observation)
    duplicate: tuple[int, int]  # (original, copy) episode indices
    other_physics: list[int]  # episodes recorded with gravity 15 instead of 10


def _episodes(raw: RawDataset) -> list[dict[str, np.ndarray]]:
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    return [
        {k: getattr(raw, k)[s:e].copy() for k in keys} for s, e in zip(raw.episode_starts, raw.episode_ends)
    ]


def plant(folder: Path, episodes: int, seed: int = 0) -> Planted:
    """A Pendulum dataset of ``episodes`` × 200 steps from the noisy scripted swing-up, plus three rewards
    replaced (one far outside the reward range, two inside it but wrong for their state), three one-step
    observation glitches (θ̇ + 3), one episode duplicated and two episodes recorded with gravity 15."""
    env = gym.make(PENDULUM)
    policy = resolve_policy("scripted:pendulum-noise0.5", env.observation_space, env.action_space, seed=seed)
    clean = record(
        PENDULUM,
        policy,
        episodes=episodes,
        seed=seed,
        out=folder / "clean.h5",
        progress=False,
        deterministic=False,
    )
    other = record(
        lambda: gym.make(PENDULUM, g=15.0),
        policy,
        episodes=2,
        seed=seed + 999,
        out=folder / "g15.h5",
        progress=False,
        deterministic=False,
    )
    eps = _episodes(read_raw(clean))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.arange(10, episodes), 6, replace=False)
    spike_at: list[tuple[int, int]] = []
    glitch_at: list[tuple[int, int]] = []
    for i, e in enumerate(chosen[:3]):
        t = int(rng.integers(10, 190))
        r = eps[e]["rewards"]
        r[t] = 50.0 if i == 0 else (0.0 if r[t] < -3.0 else -12.0)
        spike_at.append((int(e), t))
    for e in chosen[3:]:
        t = int(rng.integers(10, 190))
        eps[e]["observations"][t, 2] += 3.0
        eps[e]["next_observations"][t - 1, 2] += 3.0
        glitch_at.append((int(e), t))
    # insert (back to front so earlier positions hold): g=15 episodes at 70 and 20, a copy of 5 at 50
    g15 = _episodes(read_raw(other))
    order: list[Any] = list(range(episodes))
    order.insert(min(70, episodes), "g1")
    order.insert(min(50, episodes), "dup")
    order.insert(min(20, episodes), "g0")
    parts = [
        g15[int(o[1])] if isinstance(o, str) and o.startswith("g") else eps[5] if o == "dup" else eps[o]
        for o in order
    ]
    lengths = np.array([len(p["rewards"]) for p in parts])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    pos = {o: i for i, o in enumerate(order)}
    base = read_raw(clean)
    raw = dataclasses.replace(
        base,
        **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
        episode_ends=ends.astype(np.int64),
        episode_policy_ids=None,
        action_log_probs=None,
        path=str(folder / "planted.h5"),
    )
    write_raw(raw, folder / "planted.h5")
    raw = read_raw(folder / "planted.h5")
    return Planted(
        raw=raw,
        spikes=[int(starts[pos[e]] + t) for e, t in spike_at],
        glitches=[int(starts[pos[e]] + t) for e, t in glitch_at],
        duplicate=(pos[5], pos["dup"]),
        other_physics=[pos["g0"], pos["g1"]],
    )


def precision_recall(result: Audit, p: Planted, k: int = K) -> dict[str, tuple[int, int, float, float]]:
    """Per kind: (planted, found in top k, precision at k, recall at k)."""
    m = result.model
    out: dict[str, tuple[int, int, float, float]] = {}
    top = set(checks.top_k(m.reward_z2, k).tolist())
    hits = len(top & set(p.spikes))
    out["reward spike (reward residual)"] = (len(p.spikes), hits, hits / k, hits / len(p.spikes))
    top = set(checks.top_k(m.dynamics_score, k).tolist())
    glitch_rows = {r for g in p.glitches for r in (g - 1, g)}
    found = sum(1 for g in p.glitches if {g - 1, g} & top)
    out["observation glitch (dynamics residual)"] = (
        len(p.glitches),
        found,
        len(top & glitch_rows) / k,
        found / len(p.glitches),
    )
    closest = [tuple(q["episodes"]) for q in result.report["duplicates"]["closest"][:k]]
    hits = int(p.duplicate in closest)
    out["duplicated episode (closest pairs)"] = (1, hits, hits / k, float(hits))
    for label, scores in (
        ("other gravity (episode median)", result.episode_median),
        ("other gravity (episode mean)", result.episode_score),
    ):
        top = set(checks.top_k(scores, k).tolist())
        hits = len(top & set(p.other_physics))
        out[label] = (len(p.other_physics), hits, hits / k, hits / len(p.other_physics))
    return out


def _print_table(rows: dict[str, tuple[int, int, float, float]], n: int, k: int) -> None:
    print(f"\nplanted anomalies in {n} transitions, k = {k}")
    print(f"{'kind':<42} planted  in top k  precision@k  recall@k")
    for name, (planted, hits, prec, rec) in rows.items():
        print(f"{name:<42} {planted:>7}  {hits:>8}  {prec:>11.2f}  {rec:>8.2f}")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Planted, Audit]:
    p = plant(tmp_path_factory.mktemp("planted"), episodes=50)
    return p, audit(p.raw, top=K, model_config=ModelConfig(steps=800))


def test_planted_anomalies_rank_in_the_top_k(planted: tuple[Planted, Audit]) -> None:
    p, result = planted
    table = precision_recall(result, p)
    _print_table(table, p.raw.num_transitions, K)
    for name, (n, hits, _, _) in table.items():
        if name != "other gravity (episode mean)":
            assert hits == n, f"{name}: {hits} of {n} planted in the top {K}"
    # the rule-based flags agree: the out-of-range spike is a reward outlier, the glitches are jumps
    outliers = [r["row"] for r in result.report["flags"]["reward_outliers"]["rows"]]
    assert p.spikes[0] in outliers
    jumps = set(checks.top_k(result.jump_score, K).tolist())  # the largest step changes, flagged or not
    assert all({g - 1, g} & jumps for g in p.glitches)
    dup = result.report["duplicates"]
    assert dup["count"] == 1 and dup["pairs"][0]["episodes"] == list(p.duplicate) and dup["pairs"][0]["exact"]


@pytest.mark.slow
def test_planted_anomalies_at_50k_transitions(tmp_path: Path) -> None:
    p = plant(tmp_path, episodes=250, seed=1)
    result = audit(p.raw, top=K)
    table = precision_recall(result, p)
    _print_table(table, p.raw.num_transitions, K)
    for name, (n, hits, _, _) in table.items():
        if name != "other gravity (episode mean)":
            assert hits == n, f"{name}: {hits} of {n} planted in the top {K}"


def test_audit_report_json_names_rows_and_episodes(planted: tuple[Planted, Audit]) -> None:
    p, result = planted
    doc = json.loads(json.dumps(result.to_json(), allow_nan=False))
    top = doc["anomalies"]["top_transitions"][0]
    assert set(top) >= {"row", "episode", "score"} and 0 <= top["row"] < p.raw.num_transitions
    ep = doc["anomalies"]["top_episodes"][0]
    s, e = ep["rows"]
    assert (p.raw.episode_starts[ep["episode"]], p.raw.episode_ends[ep["episode"]]) == (s, e)
    cov = doc["coverage"]
    assert cov["actions"]["kind"] == "box" and 0 < cov["actions"]["dims"][0]["used_share"] <= 1
    assert len(cov["states"]) == 3
    assert doc["consistency"]["r2_mean_dynamics"] > 0.9  # Pendulum is a deterministic function of (s, a)


def test_checks_on_small_arrays() -> None:
    z = checks.robust_z(np.array([1.0] * 1999 + [5.0]))  # constant rewards (CartPole) and one spike
    assert z[-1] > 100 and (z[:-1] == 0).all()
    assert (checks.robust_z(np.ones(10)) == 0).all()
    # two modes (CartPole's ±push): neither mode is an outlier
    two = np.array([-0.2, 0.2] * 500 + [0.2])
    assert checks.robust_z(two).max() <= 4.0 < checks.REWARD_Z


def test_outside_space_and_discrete_coverage(tmp_path: Path) -> None:
    path = record(
        "CartPole-v1",
        RandomPolicy(gym.make("CartPole-v1").action_space, seed=0),
        episodes=30,
        seed=0,
        out=tmp_path / "c.h5",
        progress=False,
    )
    raw = read_raw(path)
    raw.observations[7, 0] = 9.0  # x bound is ±4.8
    raw.next_observations[6, 0] = 9.0
    found = checks.outside_space(raw, 5)
    assert found["count"] == 2 and found["rows"][0]["row"] == 6 and found["per_dim"][0]["dim"] == 0
    cov = checks.coverage(raw)
    assert cov["actions"]["kind"] == "discrete" and sum(cov["actions"]["counts"]) == raw.num_transitions
    assert cov["by_policy"] and cov["by_policy"][0]["episodes"] == 30


# -- cleaning and the CLI ------------------------------------------------------------------------------------
def test_cli_audit_report_and_drop(
    planted: tuple[Planted, Audit], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, _ = planted
    src = p.raw.path
    out = tmp_path / "clean.h5"
    rc = cli_main(
        [
            "audit",
            src,
            "--json",
            "--steps",
            "300",
            "--top",
            "5",
            "--report",
            str(tmp_path / "rep"),
            "--drop-anomalies",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["anomalies"]["top_episodes"]) == 5
    assert (tmp_path / "rep" / "audit.md").is_file()
    assert {
        "anomalies.png",
        "flags.png",
        "coverage_states.png",
        "coverage_actions.png",
        "consistency.png",
    } <= {f.name for f in (tmp_path / "rep").iterdir()}
    assert validate(out) == []
    clean = read_raw(out)
    meta = clean.metadata["audit_cleaning"]
    assert meta["dropped_episodes"] == 3 and len(meta["removed"]) == 3
    assert clean.num_episodes == p.raw.num_episodes - 3
    assert all(r["why"][0].startswith("anomaly score") for r in meta["removed"])
    dropped = [r["episode"] for r in meta["removed"]]
    assert dropped == sorted(e["episode"] for e in doc["anomalies"]["top_episodes"][:3])


def test_subset_keeps_episode_structure(planted: tuple[Planted, Audit]) -> None:
    p, _ = planted
    keep = np.ones(p.raw.num_episodes, dtype=bool)
    keep[[0, 3, 4]] = False
    sub = subset_episodes(p.raw, keep)
    assert sub.num_episodes == p.raw.num_episodes - 3
    np.testing.assert_array_equal(sub.observations[:200], p.raw.observations[200:400])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--drop-anomalies", "many", "--out", "X"], "--drop-anomalies 'many'"),
        (["--drop-anomalies", "2"], "go together"),
        (["--top", "0"], "--top must be"),
        (["--env", "CartPole-v1"], "give --policy too"),
        (["--policy", "nowhere"], "no policy artefact"),
    ],
)
def test_cli_audit_bad_input_is_one_line(
    planted: tuple[Planted, Audit],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    needle: str,
) -> None:
    argv = [a.replace("X", str(tmp_path / "x.h5")) for a in argv]
    assert cli_main(["audit", planted[0].raw.path, "--steps", "1", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_audit_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["audit", str(tmp_path / "none.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert "none.h5" in err and len(err.splitlines()) == 1


def test_drop_refuses_to_drop_everything(
    planted: tuple[Planted, Audit], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = planted[0].raw.num_episodes
    assert (
        cli_main(
            [
                "audit",
                planted[0].raw.path,
                "--steps",
                "1",
                "--drop-anomalies",
                str(n),
                "--out",
                str(tmp_path / "c.h5"),
            ]
        )
        == 1
    )
    assert "would leave none" in capsys.readouterr().err
    assert not (tmp_path / "c.h5").exists()


# -- the OOD monitor --------------------------------------------------------------------------------------
def _cartpole(folder: Path, name: str, policy: str, steps: int, seed: int) -> RawDataset:
    env = gym.make("CartPole-v1")
    pol = (
        RandomPolicy(env.action_space, seed=seed)
        if policy == "random"
        else resolve_policy(policy, env.observation_space, env.action_space, seed=seed)
    )
    return read_raw(
        record(
            "CartPole-v1",
            pol,
            steps=steps,
            seed=seed,
            out=folder / f"{name}.h5",
            progress=False,
            deterministic=False,
        )
    )


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RawDataset]:
    folder = tmp_path_factory.mktemp("cartpole")
    return {
        "train": _cartpole(folder, "train", "scripted:cartpole", 30_000, 0),
        "test": _cartpole(folder, "test", "scripted:cartpole", 20_000, 1),
        "random": _cartpole(folder, "random", "random", 5_000, 2),
    }


def test_monitor_holds_its_calibrated_rate_and_fires_off_the_data(cartpole: dict[str, RawDataset]) -> None:
    train = cartpole["train"]
    monitor, message = fit_monitor(train.observations, train.episode_ends, seed=0)
    assert monitor is not None and "held-out" in message
    test_rate = float((monitor.score(cartpole["test"].observations) > monitor.threshold).mean())
    random_rate = float((monitor.score(cartpole["random"].observations) > monitor.threshold).mean())
    print(
        f"\nOOD calibration: target 1.0%, unseen dataset states {100 * test_rate:.2f}%, random-policy states {100 * random_rate:.1f}%"
    )
    assert abs(test_rate - 0.01) <= 0.02
    assert random_rate > 0.5
    assert monitor.nbytes <= 1 << 20
    one = monitor.score(train.observations[0])
    assert one.shape == (1,) and np.isclose(one[0], monitor.score(train.observations[:2])[0])


def test_monitor_respects_its_size_cap() -> None:
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(2000, 1000)).astype(np.float32)
    monitor, _ = fit_monitor(wide, np.array([1000, 2000]), size_cap=100_000, iters=2)
    assert monitor is not None and monitor.nbytes <= 100_000 and monitor.codewords == (100_000 - 8000) // 4000
    none, why = fit_monitor(wide, np.array([1000, 2000]), size_cap=20_000)
    assert none is None and "codewords" in why


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cartpole: dict[str, RawDataset]) -> dict[str, Path]:
    from offrl.train import fit

    folder = tmp_path_factory.mktemp("runs")
    data = cartpole["train"].path
    with_monitor = fit(
        "bc", data, folder / "with", epochs=1, eval_every=0, show_progress=False, batch_size=1024
    )
    without = fit(
        "bc",
        data,
        folder / "without",
        epochs=1,
        eval_every=0,
        show_progress=False,
        batch_size=1024,
        **{"train.ood_monitor": False},
    )
    return {"with": with_monitor.run_dir, "without": without.run_dir, "data": Path(data)}


def test_policy_carries_the_monitor_and_its_numbers_are_unchanged(trained: dict[str, Path]) -> None:
    from offrl.checkpoint import read_tensors
    from offrl.policies.artifact import load_policy

    pol = load_policy(trained["with"])
    obs = read_raw(trained["data"]).observations[:64]
    scores = pol.ood_score(obs)
    assert scores.shape == (64,) and pol.ood_score(obs[0]).shape == (1,)
    assert isinstance(pol.ood_threshold, float) and pol.ood_threshold > 0
    assert pol.ood_summary().startswith("OOD monitor:")
    meta = json.loads((trained["with"] / "policy" / "policy.json").read_text())
    assert meta["ood_monitor"]["kind"] == "kmeans" and meta["ood_monitor"]["bytes"] <= 1 << 20
    rows = [json.loads(x) for x in (trained["with"] / "metrics.jsonl").read_text().splitlines()]
    assert any("time/ood_fit_seconds" in r for r in rows)
    # the monitor changes nothing else: same weights, same actions as the run without it
    a = read_tensors(trained["with"] / "policy" / "policy.safetensors")
    b = read_tensors(trained["without"] / "policy" / "policy.safetensors")
    assert set(a) - set(b) == {"ood.mean", "ood.std", "ood.centroids"}
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in b)
    np.testing.assert_array_equal(pol.act(obs), load_policy(trained["without"]).act(obs))


def test_artefact_without_monitor_loads_and_says_so(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from offrl.errors import CheckpointError
    from offrl.policies.artifact import load_policy

    pol = load_policy(trained["without"])
    assert pol.ood_monitor is None and pol.ood_summary() == NO_MONITOR
    with pytest.raises(CheckpointError, match="no monitor"):
        pol.ood_score(np.zeros(4))
    assert "ood_monitor" not in json.loads((trained["without"] / "policy" / "policy.json").read_text())
    assert cli_main(["evaluate", str(trained["without"]), "--episodes", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "OOD: no monitor"


def test_evaluate_reports_the_ood_fraction(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["evaluate", str(trained["with"]), "--episodes", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert 0.0 <= doc["ood_fraction"] <= 1.0 and len(doc["ood_episode_means"]) == 3
    assert cli_main(["evaluate", str(trained["with"]), "--episodes", "2"]) == 0
    assert "of visited states above the threshold" in capsys.readouterr().out


def test_audit_with_policy_rollout(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(
        [
            "audit",
            str(trained["data"]),
            "--steps",
            "50",
            "--policy",
            str(trained["with"]),
            "--episodes",
            "2",
            "--json",
            "--report",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    ro = doc["policy_rollout"]
    assert ro["states"] > 0 and 0.0 <= ro["ood_fraction"] <= 1.0 and len(ro["outside_range_share"]) == 4
    assert "Where the policy leaves the data" in (tmp_path / "r" / "audit.md").read_text()
