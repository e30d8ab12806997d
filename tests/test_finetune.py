"""Fine-tuning (offrl.finetune): the measures by hand, the mixed replay, each online form's settings, and
whole runs from an offline run through the online loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl import cli
from offrl.errors import ConfigError
from offrl.finetune import FineTuneConfig, FineTuning, finetune, finetune_measures, resume_finetune
from offrl.online.buffer import Transition
from offrl.online.mixed import MixedReplay
from offrl.preprocess import ObsNormalizer


def test_measures_by_hand() -> None:
    evals = [(0, 50.0), (50, 20.0), (100, 40.0), (500, 70.0), (1000, 90.0)]
    m = finetune_measures(evals, 1000)
    assert m["score_start"] == 50.0 and m["score_end"] == 90.0
    assert m["dip"] == pytest.approx(20.0 - 50.0)  # the lowest within the first 100 steps
    assert m["regret"] == pytest.approx(1 - (20 + 40 + 70 + 90) / 4 / 100)
    # trapezoids: (50+20)/2*50 + (20+40)/2*50 + (40+70)/2*400 + (70+90)/2*500, over 1000 steps
    assert m["auc"] == pytest.approx((1750 + 1500 + 22000 + 40000) / 1000)
    assert finetune_measures([(0, 10.0), (500, 30.0)], 1000)["dip"] is None  # nothing in the first 10%
    with pytest.raises(ValueError, match="step 0"):
        finetune_measures([(10, 1.0)], 100)


def _transition(obs: float, reward: float, terminal: bool = False, timeout: bool = False) -> Transition:
    return Transition(
        obs=torch.full((1, 2), obs),
        actions=torch.zeros(1, 1),
        rewards=torch.tensor([reward]),
        next_obs=torch.full((1, 2), obs + 1),
        terminals=torch.tensor([float(terminal)]),
        timeouts=torch.tensor([float(timeout)]),
    )


def _offline(n: int = 10) -> Any:
    from offrl.data.dataset import TransitionDataset

    class Fake:  # the few members MixedReplay reads of a prepared dataset
        device = torch.device("cpu")

        def __len__(self) -> int:
            return n

        def batch(self, idx: torch.Tensor) -> Any:
            from offrl.types import Batch

            k = idx.shape[0]
            return Batch(
                obs=torch.full((k, 2), -7.0),
                actions=torch.zeros(k, 1),
                rewards=torch.zeros(k),
                next_obs=torch.zeros(k, 2),
                terminals=torch.zeros(k),
                returns=torch.full((k,), -100.0),
            )

    assert TransitionDataset  # the real one in the whole-run tests
    return Fake()


def test_mixed_replay_ratio_and_units() -> None:
    norm = ObsNormalizer(2, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
    replay = MixedReplay(_offline(), 100, 2, 1, discrete=False, normalizer=norm, offline_ratio=0.25)
    g = torch.Generator().manual_seed(0)
    assert (replay.sample(8, g).obs == -7.0).all()  # all offline while nothing is online
    for i in range(5):
        replay.add(_transition(5.0, float(i)))
    b = replay.sample(8, g)
    assert (b.obs[:2] == -7.0).all()  # 2 of 8 offline
    assert torch.allclose(b.obs[2:], torch.full((6, 2), (5.0 - 1.0) / 2.0))  # online rows normalised
    assert b.returns is None  # only the offline part had returns: none for the batch
    uniform = MixedReplay(_offline(10), 100, 2, 1, discrete=False, normalizer=norm, offline_ratio=None)
    for i in range(30):
        uniform.add(_transition(5.0, float(i)))
    assert int((uniform.sample(8, g).obs == -7.0).all(-1).sum()) == 2  # 10 of 40 rows are offline
    dropped = MixedReplay(None, 100, 2, 1, discrete=False, normalizer=norm, offline_ratio=0.5)
    dropped.add(_transition(5.0, 1.0))
    assert (dropped.sample(4, g).obs == 2.0).all()


def test_online_rows_enter_with_their_returns_when_the_episode_ends() -> None:
    """Cal-QL's online rows: staged until their episode ends, then stored with returns-to-go; a time-limit
    end bounds the unseen tail with the smallest reward seen (here the offline floor, -3)."""
    norm = ObsNormalizer(2)
    gamma = 0.5
    replay = MixedReplay(
        None,
        100,
        2,
        1,
        discrete=False,
        normalizer=norm,
        offline_ratio=0.0,
        returns_gamma=gamma,
        reward_floor=-3.0,
    )
    replay.add(_transition(0.0, 1.0))
    replay.add(_transition(1.0, 2.0))
    assert len(replay) == 0  # the episode is still running
    state = replay.state_dict()  # a checkpoint keeps the staged rows
    replay.add(_transition(2.0, 4.0, terminal=True))
    assert len(replay) == 3
    torch.testing.assert_close(replay.returns[:3], torch.tensor([1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]))
    replay.add(_transition(3.0, 1.0, timeout=True))
    tail = -3.0 / (1 - gamma)
    torch.testing.assert_close(replay.returns[3], torch.tensor(1.0 + gamma * tail))
    restored = MixedReplay(
        None,
        100,
        2,
        1,
        discrete=False,
        normalizer=norm,
        offline_ratio=0.0,
        returns_gamma=gamma,
        reward_floor=0.0,
    )
    restored.load_state_dict(state)
    assert len(restored) == 0 and len(restored.pending) == 2 and restored.reward_floor == -3.0


def test_td3bc_hands_over_to_td3_and_discrete_cql_to_double_dqn() -> None:
    from offrl.algos.cql_discrete import DiscreteCQL
    from offrl.algos.td3bc import TD3BC, TD3BCConfig

    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    td3 = TD3BC(TD3BCConfig(actor_hidden=(8,), critic_hidden=(8,)), obs, box)
    assert [td3.online_settings(p)["bc_weight"] for p in (0.0, 0.125, 0.25, 0.9)] == [1.0, 0.5, 0.0, 0.0]
    tuning = FineTuning(td3, FineTuneConfig(), None)
    tuning._apply_online_settings(0.125)
    assert td3.config.bc_weight == 0.5 and td3.config.alpha == 2.5
    actions = td3.explore(torch.zeros(1000, 3), 0.3)
    with torch.no_grad():
        spread = float((actions - td3.actor(torch.zeros(1, 3))).std())
    assert actions.abs().max() <= 1.0 and 0.2 < spread < 0.4
    dqn = DiscreteCQL(DiscreteCQL.Config(hidden=(8,)), obs, gym.spaces.Discrete(4))
    assert dqn.online_settings(0.0) == {"cql_alpha": 0.0}
    greedy = dqn.q(torch.zeros(1, 3)).argmax(-1)
    picks = dqn.explore(torch.zeros(4000, 3), 0.2)
    assert float((picks != greedy).float().mean()) == pytest.approx(0.2 * 3 / 4, abs=0.03)


# -- whole runs --------------------------------------------------------------------------------------
SMALL = {"train.eval_episodes": 2, "train.eval_envs": 2}


@pytest.fixture(scope="module")
def offline_runs(builtin_dataset: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from offrl.train import fit

    root = tmp_path_factory.mktemp("offline")
    pendulum = builtin_dataset("builtin/pendulum-mixed")
    cartpole = builtin_dataset("builtin/cartpole-mixed")
    runs = {
        "calql": ("calql", pendulum, {"actor_hidden": (32, 32), "critic_hidden": (32, 32)}),
        "td3bc": ("td3bc", pendulum, {"actor_hidden": (32, 32), "critic_hidden": (32, 32)}),
        "dqn": ("cql", cartpole, {"hidden": (32, 32)}),
        "bc": ("bc", cartpole, {"hidden": (16, 16)}),
    }
    out = {}
    for key, (algo, data, nets) in runs.items():
        fit(algo, data, root / key, epochs=1, show_progress=False, **{**nets, **SMALL, "train.eval_every": 0})
        out[key] = root / key
    return out


@pytest.mark.parametrize("key", ["calql", "td3bc", "dqn"])
def test_finetune_runs_from_an_offline_run(offline_runs: dict[str, Path], tmp_path: Path, key: str) -> None:
    out = tmp_path / "ft"
    result = finetune(
        offline_runs[key], out, steps=300, show_progress=False, **{"train.eval_every": 25, **SMALL}
    )
    info = json.loads((out / "run.json").read_text())
    measures = info["finetune"]
    assert set(measures) == {"score_start", "score_end", "auc", "dip", "regret"}
    assert measures["dip"] is not None  # an evaluation at step 25, within the first 10%
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/normalized_score" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert any("finetune/regret" in m for m in metrics)
    assert result.updates > 300  # the offline updates, then one per environment step
    from offrl.data.dataset import TransitionDataset

    online = TransitionDataset.load(out / "online.h5")  # a valid format-v1 dataset of its own
    assert len(online) == 300


def test_finetune_resumes(offline_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    finetune(offline_runs["td3bc"], out, steps=100, show_progress=False, **SMALL)
    result = resume_finetune(out, steps=200, show_progress=False)
    assert result.env_steps == 200
    from offrl.data.dataset import TransitionDataset

    online = TransitionDataset.load(out / "online.h5")  # the episode cut by the resume ends as a timeout
    assert len(online) == 200 and bool(online.timeouts[99])


def test_finetune_refusals(offline_runs: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["finetune", str(offline_runs["bc"]), "--steps", "10", "--out", str(tmp_path / "a")]) != 0
    assert (
        "'bc' has no online form; algorithms that fine-tune: awac, calql, cql, iql, td3bc"
        in capsys.readouterr().err
    )
    policy = offline_runs["td3bc"] / "policy"
    assert cli.main(["finetune", str(policy), "--steps", "10", "--out", str(tmp_path / "b")]) != 0
    assert "pass the offline run's folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="offline_ratio"):
        FineTuneConfig(offline_ratio=1.5)


def test_rlpd_style_sac_pieces(builtin_dataset: Any) -> None:
    """LayerNorm critics normalise each member's hidden features; the subset target leaves the fast
    path; prior data fills its share of every batch from the first update."""
    from offrl import nets
    from offrl.fast.registry import fast_step
    from offrl.online.sac import SAC, SACConfig

    ln = nets.EnsembleLayerNorm(3, 8)
    x = torch.randn(3, 5, 8) * 4 + 2
    y = ln(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    box = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    rlpd = SACConfig(
        n_critics=10,
        target_subset=2,
        critic_layer_norm=True,
        actor_hidden=(8,),
        critic_hidden=(8,),
        prior_data=str(builtin_dataset("builtin/pendulum-mixed")),
    )
    sac = SAC(rlpd, obs, box)
    assert sac.critic.net.norms is not None and not sac.critic.net.relu_hidden
    assert fast_step(sac, torch.float32) is None
    storage = sac.make_storage()
    assert isinstance(storage, MixedReplay)
    batch = storage.sample(16, sac.generator)  # no online row yet: all prior data
    assert batch.actions.abs().max() <= 1.0  # prior actions in the algorithm's units
    metrics = sac.update(batch)
    assert torch.isfinite(metrics["critic_loss"])
    with pytest.raises(ConfigError, match="target_subset"):
        SACConfig(n_critics=2, target_subset=3)


def test_bench_grid_with_finetune_cells(builtin_dataset: Any, tmp_path: Path) -> None:
    """A [[finetune]] cell pretrains, fine-tunes and records its measures; the report tables them and
    draws their curves with the online baseline's."""
    from offrl.bench.runner import run_grid

    data = builtin_dataset("builtin/pendulum-mixed")
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f"""name = "ft"
seeds = [0]
[train]
eval_episodes = 2
[[finetune]]
algo = "td3bc"
method = "TD3+BC → TD3"
dataset = "{data}"
steps = 60
pretrain = {{ epochs = 1, actor_hidden = [16, 16], critic_hidden = [16, 16], train = {{ eval_every = 0 }} }}
settings = {{ train = {{ eval_every = 20, eval_episodes = 2 }} }}
[[online]]
algo = "sac"
method = "SAC (scratch)"
env = "Pendulum-v1"
steps = 60
settings = {{ learning_starts = 20, actor_hidden = [16, 16], critic_hidden = [16, 16], train = {{ eval_every = 30, eval_episodes = 2 }} }}
"""
    )
    summary = run_grid(grid, tmp_path / "res", workers=1, show_progress=False)
    assert not summary.failed, summary
    (path,) = (tmp_path / "res" / "records").glob("finetune-td3bc__*__s0.json")
    record = json.loads(path.read_text())
    assert record["status"] == "finished" and record["x_unit"] == "env_steps"
    assert record["finetune"]["score_start"] is not None
    assert [e["step"] for e in record["evaluations"]][:2] == [0, 20]
    assert cli.main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Fine-tuning" in report and "td3bc (fine-tuned)" in report
    assert "| TD3+BC → TD3 | " in report and "| SAC (scratch) | " in report  # the summary's rows
    assert (tmp_path / "report" / "online-Pendulum-v1.png").exists()


def test_finetune_summary_by_hand(tmp_path: Path) -> None:
    """The summary's cells: start → end means, baselines normalised with the fine-tuning runs' dataset
    references, IQM and regret over (environment, seed)."""
    from offrl.bench.report import ReportData, _finetune_summary

    info = {"ref_min_return": -100.0, "ref_max_return": 0.0}
    records = [
        {
            "cell_id": f"ft{s}",
            "kind": "finetune",
            "status": "finished",
            "task": "E",
            "algo": "x (fine-tuned)",
            "cell": {"info": {**info, "method": "X"}},
            "evaluations": [],
            "finetune": {"score_start": start, "score_end": end, "regret": reg},
        }
        for s, (start, end, reg) in enumerate([(10.0, 50.0, 0.6), (20.0, 70.0, 0.4)])
    ] + [
        {
            "cell_id": "on0",
            "kind": "online",
            "status": "finished",
            "task": "E",
            "algo": "sac (online)",
            "cell": {"info": {}},
            "finetune": None,
            "evaluations": [{"step": 10, "return_mean": -80.0}, {"step": 20, "return_mean": -40.0}],
        }
    ]
    (tmp_path / "records").mkdir()
    for r in records:
        (tmp_path / "records" / f"{r['cell_id']}.json").write_text(json.dumps(r))
    lines = _finetune_summary(ReportData.load(tmp_path), 200, 0)
    assert "| X | 15.0 → 60.0 | 60.0 [50.0, 70.0] | 0.50 [0.40, 0.60] |" in lines
    # the baseline: returns −80, −40 → scores 20, 60; regret 1 − 40/100
    assert "| sac | 60.0 | 60.0 [60.0, 60.0] | 0.60 [0.60, 0.60] |" in lines


@pytest.mark.slow
def test_calql_fine_tuning_improves_and_beats_sac_from_scratch(tmp_path: Path) -> None:
    """Cal-QL pretrained 10 passes on classic/pendulum-medium, fine-tuned 5,000 environment steps, 3 seeds:
    its median final score ends at least 15 points above its median step-0 score and at or above SAC from
    scratch after the same 5,000 steps. Measured: step 0 [39.1, 40.0, 34.6] -> [87.0, 59.1, 73.3] (median
    73.3, 19 points above the bound of 54.1); SAC [21.5, -4.8, 48.8] (median 21.5)."""
    from statistics import median

    from offrl.data.format import read_raw
    from offrl.datasets_registry import resolve_dataset
    from offrl.online.loop import train_online

    raw = read_raw(resolve_dataset("classic/pendulum-medium", progress=False))
    lo, hi = raw.ref_min_return, raw.ref_max_return
    assert lo is not None and hi is not None
    evals = {"train.eval_every": 5000, "train.eval_episodes": 10}
    start, end = _fine_tuning_scores(
        tmp_path, "calql", "classic/pendulum-medium", 10, 5000, actor_hidden=(64, 64), critic_hidden=(64, 64)
    )
    sac = []
    for seed in (0, 1, 2):
        online = train_online(
            "sac",
            "Pendulum-v1",
            tmp_path / f"sac-{seed}",
            steps=5000,
            seed=seed,
            show_progress=False,
            actor_hidden=(64, 64),
            critic_hidden=(64, 64),
            learning_starts=1000,
            **evals,
        )
        assert online.final_eval is not None
        sac.append(100 * (online.final_eval["mean"] - lo) / (hi - lo))
    print(f"Cal-QL step 0 {start}, after 5k steps {end}; SAC from scratch {sac}")
    assert median(end) >= median(start) + 15, (start, end)
    assert median(end) >= median(sac), (end, sac)


def _fine_tuning_scores(
    tmp_path: Path, algo: str, dataset: str, passes: int, steps: int, **networks: Any
) -> tuple[list[float], list[float]]:
    """Step-0 and final normalised scores of ``algo`` pretrained ``passes`` on ``dataset`` and fine-tuned
    ``steps`` environment steps, seeds 0–2."""
    from offrl.datasets_registry import resolve_dataset
    from offrl.train import fit

    data = resolve_dataset(dataset, progress=False)
    start, end = [], []
    for seed in (0, 1, 2):
        pre = tmp_path / f"{algo}-{seed}"
        fit(
            algo,
            data,
            pre,
            epochs=passes,
            seed=seed,
            show_progress=False,
            **networks,
            **{"runtime.threads": 1, "train.eval_every": 0},
        )
        out = tmp_path / f"ft-{seed}"
        finetune(
            pre,
            out,
            steps=steps,
            seed=seed,
            show_progress=False,
            **{"train.eval_every": steps, "train.eval_episodes": 10},
        )
        measures = json.loads((out / "run.json").read_text())["finetune"]
        start.append(measures["score_start"])
        end.append(measures["score_end"])
    return start, end


@pytest.mark.slow
def test_iql_fine_tuning_improves_on_a_continuous_task(tmp_path: Path) -> None:
    """IQL pretrained 10 passes on classic/pendulum-random (its step-0 policy is weak: the data is
    random), fine-tuned 5,000 steps, 3 seeds: the median final score is at least 10 points above the
    median step-0 score. Measured: [15, 17, 6] -> [39, 26, 46] (median +24, 14 points of margin).
    From a strong start IQL does not improve here: on classic/pendulum-medium it falls from a median
    70 to 35 over 15k steps (experiments/results/finetune-classic)."""
    from statistics import median

    start, end = _fine_tuning_scores(tmp_path, "iql", "classic/pendulum-random", 10, 5000, hidden=(64, 64))
    print(f"IQL step 0 {start}, after 5k steps {end}")
    assert median(end) >= median(start) + 10, (start, end)


@pytest.mark.slow
def test_iql_fine_tuning_improves_on_a_discrete_task(tmp_path: Path) -> None:
    """Discrete IQL pretrained 1 pass on classic/cartpole-medium-replay (an under-trained start),
    fine-tuned 5,000 steps, 3 seeds: the median final score is at least 20 points above the median
    step-0 score. Measured: [59, 106, 47] -> [97, 101, 102] (median +42, 22 points of margin). What this
    shows is that the online form keeps learning from mixed data: continuing on the offline rows alone
    (offline ratio 1.0) also reaches 97 on seed 0, and from converged starts discrete IQL stayed level
    (lunarlander-medium: 38 -> 38 over 30k steps, experiments/results/finetune-classic)."""
    from statistics import median

    start, end = _fine_tuning_scores(
        tmp_path, "iql", "classic/cartpole-medium-replay", 1, 5000, hidden=(64, 64)
    )
    print(f"discrete IQL step 0 {start}, after 5k steps {end}")
    assert median(end) >= median(start) + 20, (start, end)
