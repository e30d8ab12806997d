"""Online baselines: loss functions against hand computations, the interaction loop (same-step
autoreset, truncation vs termination), checkpoint/resume state, artefacts and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl import cli
from offrl.checkpoint import latest_checkpoint, split_state
from offrl.errors import ConfigError
from offrl.logger import read_jsonl
from offrl.online import dqn, ppo, sac
from offrl.online.buffer import ReplayBuffer, Transition
from offrl.online.loop import OnlineTrainer, resolve_online_config, resume_online, train_online
from offrl.policies.artifact import load_policy
from offrl.runtime import Runtime
from offrl.types import Batch

REPO = Path(__file__).resolve().parents[1]

# tiny, fast settings per algorithm; loop settings keep evaluation short
LOOP = {"train.eval_every": 0, "train.eval_episodes": 1, "train.eval_envs": 1, "train.log_every": 100}
TINY: dict[tuple[str, str], dict[str, Any]] = {
    ("sac", "Pendulum-v1"): {
        "actor_hidden": "16,16",
        "critic_hidden": "16,16",
        "batch_size": 16,
        "learning_starts": 100,
        "train.max_episode_steps": 50,
    },
    ("dqn", "CartPole-v1"): {"hidden": "16,16", "batch_size": 16, "learning_starts": 100, "train_freq": 2},
    ("dqn-dueling", "CartPole-v1"): {
        "hidden": "16,16",
        "batch_size": 16,
        "learning_starts": 100,
        "dueling": True,
        "tau": 0.5,
        "target_update_interval": 1,
    },
    ("ppo", "CartPole-v1"): {
        "hidden": "16,16",
        "n_steps": 32,
        "num_envs": 2,
        "n_minibatches": 2,
        "n_epochs": 2,
    },
    ("ppo", "Pendulum-v1"): {
        "hidden": "16,16",
        "n_steps": 32,
        "num_envs": 2,
        "n_minibatches": 2,
        "n_epochs": 2,
        "train.max_episode_steps": 50,
    },
}


def _config(key: tuple[str, str], steps: int, seed: int = 0, **more: Any) -> Any:
    algo = key[0].split("-")[0]
    overrides = {**LOOP, **TINY[key], "train.steps": steps, **more}
    return resolve_online_config(algo, key[1], seed=seed, overrides=overrides)


def _flat(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    return split_state(state)


# -- losses against hand computations ---------------------------------------------------------------
def test_gae_truncation_bootstraps_termination_does_not() -> None:
    # env 0: step 1 is truncated (bootstraps from V(final obs) = 10, recursion cut), step 3 terminates;
    # env 1: no episode end, the rollout's last step bootstraps from V(s′) = 4
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0], [2.0, 0.0]])
    next_values = torch.tensor([[1.0, 0.0], [10.0, 0.0], [2.0, 0.0], [7.0, 4.0]])
    terminals = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    ends = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, next_values, terminals, ends, gamma=0.5, lam=0.5)
    # δ = [1, 6, 2.5, 2] (env 0), [0, 0, 0, 3] (env 1); A_t = δ_t + 0.25·(1 − end_t)·A_{t+1}
    expected = torch.tensor([[2.5, 0.046875], [6.0, 0.1875], [3.0, 0.75], [2.0, 3.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_clipped_policy_loss_hand_case() -> None:
    ratios = torch.tensor([1.5, 0.5, 1.1])
    old = torch.zeros(3)
    log_prob = ratios.log().requires_grad_()
    adv = torch.tensor([1.0, 1.0, -2.0])
    loss, kl, clip_frac = ppo.clipped_policy_loss(log_prob, old, adv, clip=0.2)
    # per sample max(−A·r, −A·clip(r)): max(−1.5, −1.2) = −1.2; max(−0.5, −0.8) = −0.5; max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    assert kl.item() == pytest.approx(
        (0.5 - math.log(1.5) - 0.5 - math.log(0.5) + 0.1 - math.log(1.1)) / 3, abs=1e-6
    )
    loss.backward()
    assert log_prob.grad is not None
    # clipped sample 0 has no gradient; the others −A·r/3
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.5 / 3, 2.2 / 3]))


def test_value_loss_clipping_hand_case() -> None:
    values, old, returns = torch.tensor([2.0, 0.2]), torch.tensor([1.0, 1.0]), torch.zeros(2)
    # unclipped errors 4, 0.04; clipped values 1.5, 0.5 → errors 2.25, 0.25; max → 4, 0.25
    assert ppo.value_loss(values, old, returns, clip=0.5).item() == pytest.approx(0.5 * (4.0 + 0.25) / 2)
    assert ppo.value_loss(values, old, returns, clip=None).item() == pytest.approx(0.5 * (4.0 + 0.04) / 2)


def test_epsilon_schedule() -> None:
    assert dqn.linear_schedule(1.0, 0.05, 100, 0) == 1.0
    assert dqn.linear_schedule(1.0, 0.05, 100, 50) == pytest.approx(0.525)
    assert dqn.linear_schedule(1.0, 0.05, 100, 100) == 0.05
    assert dqn.linear_schedule(1.0, 0.05, 100, 1000) == 0.05


def test_dueling_head_folds_exactly_into_a_plain_q_network() -> None:
    torch.manual_seed(0)
    net = dqn.DuelingQ(4, 3, (8, 8))
    x = torch.randn(5, 4)
    torch.testing.assert_close(net.folded()(x), net(x))
    q = net(x)
    torch.testing.assert_close(q.mean(-1), net.value(net.trunk(x)).squeeze(-1))  # mean advantage is 0


# -- replay buffer ---------------------------------------------------------------------------------
def test_replay_buffer_wraps_and_round_trips() -> None:
    buf = ReplayBuffer(5, 2, 1, discrete=False)
    for i in range(3):  # 3 steps of 2 envs: 6 rows into 5 slots
        obs = torch.tensor([[i, 0.0], [i, 1.0]])
        buf.add(
            Transition(
                obs, torch.zeros(2, 1), torch.tensor([i, i + 0.5]), obs + 1, torch.zeros(2), torch.zeros(2)
            )
        )
    assert len(buf) == 5 and buf.pos == 1
    torch.testing.assert_close(buf.ordered("rewards"), torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5]))
    other = ReplayBuffer(5, 2, 1, discrete=False)
    other.load_state_dict(buf.state_dict())
    for name in ReplayBuffer.FIELDS:
        assert torch.equal(getattr(other, name), getattr(buf, name)), name
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(buf.sample(8, g1).rewards, other.sample(8, g2).rewards)


# -- the loop: same-step autoreset, truncation vs termination ------------------------------------------
def test_buffer_holds_only_true_transitions(tmp_path: Path) -> None:
    # random actions (ε = 1, no learning), a 20-step time limit: terminations and truncations both occur
    cfg = _config(
        ("dqn", "CartPole-v1"),
        400,
        learning_starts=10**6,
        eps_end=1.0,
        buffer_size=1000,
        **{"train.max_episode_steps": 20},
    )
    trainer = OnlineTrainer(cfg, tmp_path / "run")
    trainer.run(show_progress=False)
    buf = trainer.storage
    assert isinstance(buf, ReplayBuffer) and len(buf) == 400
    obs, next_obs, actions, terminals, timeouts = (
        buf.ordered(name).numpy() for name in ("obs", "next_obs", "actions", "terminals", "timeouts")
    )
    assert terminals.sum() > 0 and timeouts.sum() > 0
    assert not np.any((terminals > 0) & (timeouts > 0))
    sim = gym.make("CartPole-v1").unwrapped
    sim.reset(seed=0)
    for i in range(len(buf)):  # every row is one true step of the dynamics, none is a reset
        sim.state, sim.steps_beyond_terminated = obs[i].astype(np.float64), None
        o, _, terminated, _, _ = sim.step(int(actions[i]))
        np.testing.assert_allclose(o, next_obs[i], atol=1e-5, err_msg=f"row {i}")
        assert bool(terminated) == bool(terminals[i]), i
    ends = (terminals + timeouts) > 0
    cont = ~ends[:-1]
    np.testing.assert_array_equal(next_obs[:-1][cont], obs[1:][cont])  # within an episode: s′_t = s_{t+1}
    assert not np.any(
        np.all(next_obs[:-1][ends[:-1]] == obs[1:][ends[:-1]], axis=1)
    )  # new episode after an end
    lengths = np.diff(np.flatnonzero(np.r_[True, ends]))
    assert lengths.max() == 20  # truncations at the time limit, not before


# -- checkpoint and resume --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,kind",
    [
        (("sac", "Pendulum-v1"), "tanh_gaussian"),
        (("dqn", "CartPole-v1"), "q_greedy"),
        (("dqn-dueling", "CartPole-v1"), "q_greedy"),
        (("ppo", "CartPole-v1"), "categorical"),
        (("ppo", "Pendulum-v1"), "tanh_gaussian"),
    ],
)
def test_checkpoint_restores_state_and_resume_continues(
    tmp_path: Path, key: tuple[str, str], kind: str
) -> None:
    run = tmp_path / "run"
    trainer = OnlineTrainer(_config(key, 300, seed=3), run)
    result = trainer.run(show_progress=False)
    assert result.updates > 0 and trainer.algo.num_updates == result.updates
    saved_skel, saved = _flat(
        {"algo": trainer.algo.state_dict(), "storage": trainer.storage.state_dict(), "n": trainer.env_steps}
    )
    ck = latest_checkpoint(run / "checkpoints")
    assert ck is not None and ck.name == f"step_{result.env_steps:09d}"

    restored = OnlineTrainer(_config(key, 300, seed=3), run)
    restored._restore(ck)
    skel, tensors = _flat(
        {
            "algo": restored.algo.state_dict(),
            "storage": restored.storage.state_dict(),
            "n": restored.env_steps,
        }
    )
    assert skel == saved_skel  # counters, optimiser steps, buffer position …
    assert saved.keys() == tensors.keys()
    for k in saved:  # weights, optimiser moments, generator state, buffer rows
        assert torch.equal(saved[k], tensors[k]), k
    assert any(k.startswith("algo.generator") for k in saved)
    if key[0] != "ppo":
        assert any(k.startswith("storage.obs") for k in saved)

    policy = load_policy(run, seed=0)
    assert policy.kind == kind
    obs = np.stack([trainer.algo.observation_space.sample() for _ in range(4)])
    np.testing.assert_array_equal(policy.act(obs), trainer.algo.act(obs))

    more = resume_online(run, steps=600, show_progress=False)
    assert more.env_steps >= 600 and more.updates > result.updates
    steps = [row["step"] for row in read_jsonl(run / "metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] == more.env_steps
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_same_seed_same_run(tmp_path: Path) -> None:
    a = OnlineTrainer(_config(("dqn", "CartPole-v1"), 300, seed=5), tmp_path / "a")
    b = OnlineTrainer(_config(("dqn", "CartPole-v1"), 300, seed=5), tmp_path / "b")
    a.run(show_progress=False)
    b.run(show_progress=False)
    for pa, pb in zip(a.algo.nets.parameters(), b.algo.nets.parameters()):
        assert torch.equal(pa, pb)


def test_periodic_checkpoints_are_pruned(tmp_path: Path) -> None:
    more = {"train.checkpoint_every": 100, "train.keep_checkpoints": 2, "learning_starts": 10**6}
    OnlineTrainer(_config(("dqn", "CartPole-v1"), 350, **more), tmp_path / "r").run(show_progress=False)
    kept = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*"))
    assert kept == ["step_000000300", "step_000000350"]


def test_snapshots_keep_every_evaluated_policy(tmp_path: Path) -> None:
    more = {"train.eval_every": 64, "train.snapshots": True}
    OnlineTrainer(_config(("ppo", "CartPole-v1"), 192, **more), tmp_path / "r").run(show_progress=False)
    snaps = sorted(p.name for p in (tmp_path / "r" / "snapshots").glob("step_*"))
    assert snaps == ["step_000000064", "step_000000128", "step_000000192"]
    info = json.loads((tmp_path / "r" / "snapshots" / snaps[0] / "policy.json").read_text())
    assert info["env_steps"] == 64 and info["evaluation"]["env_steps"] == 64 and "mean" in info["evaluation"]
    first, last = load_policy(tmp_path / "r" / "snapshots" / snaps[0]), load_policy(tmp_path / "r" / "policy")
    assert not torch.equal(first.net.state_dict()["net.0.weight"], last.net.state_dict()["net.0.weight"])


def test_sac_update_leaves_targets_to_polyak(tmp_path: Path) -> None:
    cfg = _config(("sac", "Pendulum-v1"), 1)
    algo = sac.SAC(cfg.algo_config, *_pendulum_spaces())
    buf = algo.make_storage()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        o = torch.randn(1, 3, generator=g)
        buf.add(
            Transition(
                o,
                torch.rand(1, 1, generator=g) * 2 - 1,
                torch.randn(1, generator=g),
                o,
                torch.zeros(1),
                torch.zeros(1),
            )
        )
    before = [p.clone() for p in algo.critic_target.parameters()]
    critic_before = [p.clone() for p in algo.critic.parameters()]
    algo.update(buf.sample(16, algo.generator))
    for old, old_c, new, new_c in zip(
        before, critic_before, algo.critic_target.parameters(), algo.critic.parameters()
    ):
        assert new.grad is None and not new.requires_grad
        torch.testing.assert_close(new, old + 5e-3 * (new_c - old))  # τ-step towards the updated critic
        assert not torch.equal(old_c, new_c)


def _pendulum_spaces() -> tuple[gym.Space, gym.Space]:
    env = gym.make("Pendulum-v1")
    return env.observation_space, env.action_space


# -- configuration and the CLI -----------------------------------------------------------------------
def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no discrete variant"):
        resolve_online_config("sac", "CartPole-v1")
    with pytest.raises(ConfigError, match=r"unknown setting 'nope'.*train\.eval_every"):
        resolve_online_config("dqn", "CartPole-v1", overrides={"nope": 1})
    bad = tmp_path / "c.toml"
    bad.write_text('algo = "ppo"\nenv = "CartPole-v1"\n')
    with pytest.raises(ConfigError, match="configures algorithm 'ppo'"):
        resolve_online_config("dqn", None, config_file=bad)
    with pytest.raises(ConfigError, match="n_minibatches"):
        OnlineTrainer(_config(("ppo", "CartPole-v1"), 100, n_minibatches=3), tmp_path / "r")
    with pytest.raises(ConfigError, match="precision"):
        resolve_online_config("sac", "Pendulum-v1", overrides={"precision": "fp16"})


def test_sac_bf16_update_stays_close_to_fp32(tmp_path: Path) -> None:
    """bf16 hidden layers (float32 master weights, heads and losses) change one update only slightly."""
    algos = [
        sac.SAC(
            _config(("sac", "Pendulum-v1"), 1).algo_config, *_pendulum_spaces(), runtime=Runtime(precision=p)
        )
        for p in ("fp32", "bf16")
    ]
    algos[1].load_state_dict(algos[0].state_dict())
    g = torch.Generator().manual_seed(0)
    obs, nxt = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    batch = Batch(
        obs, torch.rand(64, 1, generator=g) * 2 - 1, torch.randn(64, generator=g), nxt, torch.zeros(64)
    )
    metrics = [a.update(batch) for a in algos]
    assert metrics[0]["critic_loss"] == pytest.approx(float(metrics[1]["critic_loss"]), rel=0.05)
    for pa, pb in zip(algos[0].critic.parameters(), algos[1].critic.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-3)


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "experiments" / "online").glob("*.toml"))
    + sorted((REPO / "datasets" / "train").glob("*.toml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_online_configs_resolve(path: Path) -> None:
    if "Hopper" in path.read_text() or "Cheetah" in path.read_text() or "Walker" in path.read_text():
        pytest.importorskip("mujoco", reason="MuJoCo configs need gymnasium[mujoco]")
    cfg = resolve_online_config(None, None, config_file=path)
    assert cfg.train.steps


def test_cli_online_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [
        "online",
        "--algo",
        "ppo",
        "--env",
        "CartPole-v1",
        "--steps",
        "128",
        "--out",
        str(out),
        "--seed",
        "1",
    ]
    for k, v in {**TINY[("ppo", "CartPole-v1")], **LOOP}.items():
        argv += ["--set", f"{k}={v}"]
    assert cli.main(argv) == 0
    assert "ppo on CartPole-v1" in capsys.readouterr().out
    for name in ("config.toml", "run.json", "metrics.jsonl", "eval.json", "policy/policy.json", "tb"):
        assert (out / name).exists(), name
    assert 'algo = "ppo"' in (out / "config.toml").read_text()
    assert cli.main(["evaluate", str(out), "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["env_id"] == "CartPole-v1"
    data = tmp_path / "ppo.h5"
    argv = ["record", "--env", "CartPole-v1", "--policy", str(out), "--episodes", "2", "--out", str(data)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert cli.main(["validate", str(data)]) == 0
    assert cli.main(["online", "--resume", str(out), "--steps", "256"]) == 0
    assert json.loads((out / "run.json").read_text())["env_steps_done"] == 256
    assert (
        cli.main(["online", "--algo", "ppo", "--env", "CartPole-v1", "--steps", "10", "--out", str(out)]) == 1
    )
    assert "already holds a run" in capsys.readouterr().err


# -- learning (slow) ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("dqn_cartpole", 150_000), ("ppo_cartpole", 100_000)])
def test_learns_cartpole(tmp_path: Path, name: str, steps: int) -> None:
    cfg_file = REPO / "experiments" / "online" / f"{name}.toml"
    result = train_online(
        None,
        None,
        tmp_path / "run",
        config_file=cfg_file,
        steps=steps,
        show_progress=False,
        **{"train.stop_return": 475.0, "train.eval_every": 5000, "train.eval_episodes": 10},
    )
    assert result.final_eval is not None
    assert result.final_eval["mean"] >= 475.0, result.final_eval
    assert result.env_steps <= steps + 1024
