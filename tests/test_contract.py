"""The contract every registered algorithm keeps, offline and online, whatever it learns.

Parametrised over ``offrl.algos.registry.variants()`` (both kinds): a new algorithm joins by
registering. Each variant runs with its default config (networks shrunk to (32, 32), batch 32, PPO
rollouts of 4 × 4 steps learnt in 2 epochs of 2 minibatches) and once more per alternative value of each ``Literal`` or ``bool`` config
field, so that switchable code paths are held to the contract too (``EXTRA_CASES`` adds the few
switches an ``int`` field makes). An algorithm that rejects its own default config fails; a
rejected alternative (``ConfigError``) is skipped with its reason.

One *training step* is what an algorithm learns from between two points where the trainer may
checkpoint: one ``update(batch)`` for the offline algorithms and for the off-policy online ones
(SAC, DQN), whose batches come from the replay buffer in environment units (they normalise
observations inside ``update``; offline batches arrive normalised by ``prepare_dataset``).
PPO has no ``update(Batch)``: its step is the loop's own sequence, ``make_storage()``,
``act_for_collection`` for every row of a synthetic rollout (observations, rewards, terminations
and time-outs from the test; actions and log-probabilities from PPO), then ``learn`` on the full
rollout, which runs ``n_epochs × n_minibatches`` minibatch updates and returns their metrics.

Which checks apply to PPO: acting (shapes, bounds in environment units, dependence on the
observation), finite detached scalar metrics with ``num_updates`` counting them, one step moving
every optimised parameter, one owner per parameter and untouched preprocessing, exact resume from
a state round trip, same seed same parameters, the policy artefact round trip, and no host reads in
its step (collection included). Which do not, and why: gradient isolation between loss terms (PPO
has one optimiser stepping one joint loss, and no ``loss_terms``) and the target-network checks
(PPO has no target networks; they skip, as for BC).

Optional hook checked here: ``loss_terms(batch) -> dict[str, Tensor]``. An algorithm with several
optimisers may expose the scalar losses its ``update`` backpropagates, keyed by the name of the
optimiser in ``algo.optimizers`` that steps each (``"critic"``, ``"critic_loss"`` or
``"critic_cql"`` for ``optimizers["critic"]``; any names when there is only one optimiser). Each
term must send gradient to its own optimiser's parameters and to no other optimiser's (e.g. the
actor loss must not put gradient into the critic), and every optimiser must be driven by a term.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import offrl
from offrl.algos.base import Algorithm
from offrl.algos.registry import variants
from offrl.errors import ConfigError
from offrl.online.buffer import Transition
from offrl.policies.artifact import load_policy
from offrl.preprocess import ObsNormalizer
from offrl.types import Batch

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
# Asymmetric bounds, the second dimension's disjoint from [-1, 1]: an algorithm acting in learning
# units instead of the environment's fails the bounds checks.
BOX_ACTIONS = gym.spaces.Box(low=np.array([-2.0, 2.0], np.float32), high=np.array([2.0, 5.0], np.float32))
DISCRETE_ACTIONS = gym.spaces.Discrete(3)
BATCH = 32
# shrunk settings, applied where a config has the field
SMALL: dict[str, Any] = {"batch_size": BATCH, "n_steps": 4, "n_epochs": 2, "n_minibatches": 2}
OBS_MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0])
OBS_STD = torch.tensor([2.0, 0.5, 1.0, 3.0])
# Reading a tensor back to the host: each would sync a GPU once per update.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
OFFRL_DIR = str(Path(offrl.__file__).parent)


# -- the cases -------------------------------------------------------------------------------------
def _config_cases(cls: type[Algorithm]) -> list[tuple[str, dict[str, Any]]]:
    """The default config, then each alternative value of each Literal/bool field on its own."""
    cfg = cls.Config()
    hints = typing.get_type_hints(cls.Config)
    cases: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for f in dataclasses.fields(cfg):
        if f.name == "normalize_obs":  # read by the trainer; the algorithm never sees it
            continue
        tp, current = hints[f.name], getattr(cfg, f.name)
        if tp is bool:
            alternatives: tuple[Any, ...] = (not current,)
        elif typing.get_origin(tp) is typing.Literal:
            alternatives = tuple(a for a in typing.get_args(tp) if a != current)
        else:
            continue
        cases += [(f"{f.name}={a}", {f.name: a}) for a in alternatives]
    return cases


# Code paths an int field switches on, which the Literal/bool scan cannot find: CQL's behaviour-cloning
# warm-up (one step of it, then SAC's actor loss, so a run crosses the switch).
EXTRA_CASES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("cql", "continuous"): [{"bc_steps": 1}],
    ("sac", "continuous"): [{"target_subset": 1}],  # RLPD's target over a random subset of the critics
}

CASES = [
    pytest.param(cls, overrides, id=f"{name}-{variant}-{label}")
    for name, variant, cls in variants()
    for label, overrides in [
        *_config_cases(cls),
        *((",".join(f"{k}={v}" for k, v in o.items()), o) for o in EXTRA_CASES.get((name, variant), [])),
    ]
]


def small_config(cls: type[Algorithm], overrides: dict[str, Any]) -> Any:
    """Default config with every tuple-of-ints field (hidden sizes) at (32, 32) and ``SMALL``'s sizes."""
    cfg = cls.Config()
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple) and value and all(type(v) is int for v in value):
            changes[f.name] = (32, 32)
        elif f.name in SMALL:
            changes[f.name] = SMALL[f.name]
    return dataclasses.replace(cfg, **changes, **overrides)


def make(
    cls: type[Algorithm], overrides: dict[str, Any], seed: int = 0, fitted: bool = True, clip: bool = False
) -> Any:
    """An instance on the synthetic spaces; ``fitted`` passes a non-trivial observation normaliser;
    ``clip`` turns gradient clipping on (``max_grad_norm=1.0``) where it is off by default."""
    action_space = DISCRETE_ACTIONS if cls.discrete else BOX_ACTIONS
    normalizer = ObsNormalizer(4, OBS_MEAN.clone(), OBS_STD.clone()) if fitted else None
    settings = dict(overrides)
    if clip and getattr(cls.Config(), "max_grad_norm", 0.0) is None:
        settings["max_grad_norm"] = 1.0
    try:
        config = small_config(cls, settings)
        return cls(config, OBS_SPACE, action_space, normalizer=normalizer, seed=seed)
    except ConfigError as exc:
        if not overrides:
            pytest.fail(f"{cls.__name__} rejects its own default config: {exc}")
        pytest.skip(f"config rejected: {exc}")


# -- training steps --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """What the environment gives an on-policy algorithm for one rollout: (T+1, N, 4) observations in
    environment units, (T, N) rewards, terminations and time-outs. ``index``: rollouts before it."""

    index: int
    obs: Tensor
    rewards: Tensor
    terminals: Tensor
    timeouts: Tensor


def make_data(cls: type[Algorithm], n: int, seed: int = 123) -> list[Any]:
    """``n`` training steps' data: batches (offline: in learning units; off-policy online: observations
    in environment units, as the replay buffer holds them) or, on-policy, rollouts."""
    g = torch.Generator().manual_seed(seed)

    def observations(*shape: int) -> Tensor:
        z = torch.randn(*shape, 4, generator=g)
        return OBS_MEAN + OBS_STD * z if cls.online else z

    if getattr(cls, "on_policy", False):
        cfg = small_config(cls, {})
        t, envs = cfg.n_steps, cfg.num_envs
        out = []
        for i in range(n):
            terminals = (torch.rand(t, envs, generator=g) < 0.1).float()
            timeouts = (torch.rand(t, envs, generator=g) < 0.05).float() * (1.0 - terminals)
            out.append(
                Rollout(i, observations(t + 1, envs), torch.randn(t, envs, generator=g), terminals, timeouts)
            )
        return out
    batches = []
    for _ in range(n):
        if cls.discrete:
            actions = torch.randint(0, int(DISCRETE_ACTIONS.n), (BATCH,), generator=g)
        else:
            actions = torch.rand(BATCH, 2, generator=g) * 1.8 - 0.9
        batches.append(
            Batch(
                obs=observations(BATCH),
                actions=actions,
                rewards=torch.randn(BATCH, generator=g),
                next_obs=observations(BATCH),
                terminals=(torch.rand(BATCH, generator=g) < 0.1).float(),
                returns=torch.randn(BATCH, generator=g) * 5.0 if cls.needs_returns else None,
            )
        )
    return batches


def step(algo: Any, data: Any) -> list[dict[str, Tensor]]:
    """One training step; the metrics of each update it ran."""
    if not isinstance(data, Rollout):
        return [algo.update(data)]
    # the online loop's sequence: collect a rollout with the algorithm's own actions, then learn
    storage = algo.make_storage()
    t, envs = data.rewards.shape
    total = 100 * t * envs  # a long run: the annealed learning rate stays well above 0
    env_steps = data.index * t * envs
    for i in range(t):
        actions, extras = algo.act_for_collection(data.obs[i], env_steps, total)
        storage.add(
            Transition(
                data.obs[i],
                actions,
                data.rewards[i],
                data.obs[i + 1],
                data.terminals[i],
                data.timeouts[i],
                extras,
            )
        )
        env_steps += envs
    return list(algo.learn(storage, env_steps, total))


def train(algo: Any, data: list[Any]) -> None:
    for d in data:
        step(algo, d)


def raw_obs(n: int = 16, seed: int = 7, scale: float = 1.0) -> np.ndarray:
    """Observations in the environment's units (before normalisation), (n, 4) float32."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4)) * scale
    return (OBS_MEAN.numpy() + OBS_STD.numpy() * z).astype(np.float32)


def param_names(algo: Any) -> dict[int, str]:
    return {id(p): n for n, p in algo.nets.named_parameters()}


def optimised(algo: Any) -> dict[str, list[nn.Parameter]]:
    return {k: [p for g in opt.param_groups for p in g["params"]] for k, opt in algo.optimizers.items()}


def snapshot(algo: Any) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in algo.nets.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: tensors differ: {differ}"


# -- acting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_act_shapes_and_bounds(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    # moderate and extreme observations, as float32 and float64 numpy arrays
    obs = np.concatenate([raw_obs(12), raw_obs(4, seed=8, scale=100.0)])
    for trained in (False, True):
        if trained:
            train(algo, make_data(cls, 3))
        for deterministic in (True, False):
            for x in (obs, obs.astype(np.float64)):
                a = algo.act(x, deterministic=deterministic)
                assert isinstance(a, np.ndarray)
                if cls.discrete:
                    assert a.shape == (16,)
                    assert np.issubdtype(a.dtype, np.integer)
                    assert ((a >= 0) & (a < DISCRETE_ACTIONS.n)).all(), a
                else:
                    assert a.shape == (16, 2) and a.dtype == np.float32
                    assert np.isfinite(a).all()
                    assert ((a >= BOX_ACTIONS.low) & (a <= BOX_ACTIONS.high)).all(), a
        np.testing.assert_array_equal(
            algo.act(obs), algo.act(obs), err_msg="deterministic acting is not repeatable"
        )


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_actions_depend_on_observation(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    train(algo, make_data(cls, 3))
    obs = raw_obs(2)
    if cls.discrete:
        policy = algo.policy()
        with torch.no_grad():
            scores = policy.net(policy.normalizer(torch.as_tensor(obs)))
        assert not torch.allclose(scores[0], scores[1]), scores
    else:
        a = algo.act(obs)
        assert not np.allclose(a[0], a[1]), a


# -- updates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_update_returns_finite_detached_scalars(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    updates = 0
    for data in make_data(cls, 3):
        results = step(algo, data)
        assert results, "a training step ran no update"
        for metrics in results:
            assert isinstance(metrics, dict) and metrics
            for k, v in metrics.items():
                assert isinstance(k, str) and "/" not in k, k  # the trainer adds the namespace
                assert isinstance(v, Tensor), f"{k}: {type(v).__name__}, not a tensor"
                assert v.dim() == 0, f"{k}: shape {tuple(v.shape)}"
                assert not v.requires_grad and v.grad_fn is None, f"{k} is attached to the graph"
                assert torch.isfinite(v), f"{k} = {v}"
        updates += len(results)
        assert algo.num_updates == updates, f"num_updates is {algo.num_updates} after {updates} updates"


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_update_never_reads_tensors_back_to_the_host(
    cls: type[Algorithm], overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.item()`, `float(t)`, `if t:` … called from offrl's code in a training step would each sync a
    GPU; gradient clipping is on, so its path is held to this too."""
    algo = make(cls, overrides, clip=True)
    data = make_data(cls, 2)  # an actor step and a critic-only step for TD3+BC, BC warm-up then SAC for CQL

    def guard(name: str):  # type: ignore[no-untyped-def]
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OFFRL_DIR):
                raise AssertionError(f"host sync: Tensor.{name} called in {caller}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    for d in data:
        step(algo, d)
    with pytest.raises(AssertionError, match="host sync"):  # the guard itself works
        exec(compile("bool(torch.ones(()))", inspect.getfile(cls), "eval"), {"torch": torch})


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_one_update_moves_every_optimised_parameter(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    groups = optimised(algo)
    assert groups, "the algorithm has no optimiser"
    before = {id(p): p.detach().clone() for ps in groups.values() for p in ps}
    step(algo, make_data(cls, 1)[0])
    names = param_names(algo)
    stuck = [
        f"{opt}: {names.get(id(p), f'<parameter outside nets {tuple(p.shape)}>')}"
        for opt, ps in groups.items()
        for p in ps
        if torch.equal(p.detach(), before[id(p)])
    ]
    assert not stuck, f"parameters not moved by one update: {stuck}"


def _owner_of(term: str, optimisers: list[str]) -> str | None:
    """The optimiser a loss term drives: the only one, or named by the term ('critic', 'critic_loss', 'critic_cql')."""
    if len(optimisers) == 1:
        return optimisers[0]
    for opt in sorted(optimisers, key=len, reverse=True):  # longest first: 'alpha_prime' before 'alpha'
        if term == opt or term.startswith(f"{opt}_"):
            return opt
    return None


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_each_parameter_has_one_owner(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    names = param_names(algo)
    groups = optimised(algo)
    owner: dict[int, str] = {}
    for opt, ps in groups.items():
        for p in ps:
            assert id(p) in names, (
                f"optimiser '{opt}' steps a parameter that is not in algo.nets (it would not be saved)"
            )
            assert id(p) not in owner, f"{names[id(p)]} is stepped by both '{owner[id(p)]}' and '{opt}'"
            owner[id(p)] = opt
    target_ids = {id(p) for t in algo.target_networks() for p in t.parameters()}
    orphans = [n for n, p in algo.nets.named_parameters() if p.requires_grad and id(p) not in owner]
    assert not orphans, f"trainable parameters no optimiser steps (unfrozen targets?): {orphans}"

    before = snapshot(algo)
    step(algo, make_data(cls, 1)[0])
    after = snapshot(algo)
    moved_elsewhere = [
        n
        for n, p in algo.nets.named_parameters()
        if id(p) not in owner and id(p) not in target_ids and not torch.equal(before[n], after[n])
    ]
    assert not moved_elsewhere, f"changed without an optimiser or a target update: {moved_elsewhere}"
    preprocessing = [k for k in before if k.startswith(("normalizer.", "action_scaler."))]
    assert preprocessing
    assert_same_state(
        {k: before[k] for k in preprocessing}, {k: after[k] for k in preprocessing}, "preprocessing"
    )

    if not hasattr(algo, "loss_terms"):
        return
    terms = algo.loss_terms(make_data(cls, 1, seed=5)[0])
    assert terms, "loss_terms returned nothing"
    driven = set()
    for term_name, term in terms.items():
        owner_name = _owner_of(term_name, list(groups))
        assert owner_name is not None, f"loss term '{term_name}' names no optimiser (have: {sorted(groups)})"
        driven.add(owner_name)
        assert term.dim() == 0 and term.requires_grad, (
            f"loss term '{term_name}' is not a differentiable scalar"
        )
        own = [p for p in groups[owner_name] if p.requires_grad]
        others = [p for k, ps in groups.items() if k != owner_name for p in ps if p.requires_grad]
        grads = torch.autograd.grad(term, own + others, allow_unused=True, retain_graph=True)
        own_grads, other_grads = grads[: len(own)], grads[len(own) :]
        assert any(g is not None and bool(g.ne(0).any()) for g in own_grads), (
            f"loss term '{term_name}' sends no gradient to optimiser '{owner_name}'"
        )
        leaks = [names[id(p)] for p, g in zip(others, other_grads) if g is not None and bool(g.ne(0).any())]
        assert not leaks, f"loss term '{term_name}' sends gradient to other optimisers' parameters: {leaks}"
    assert driven == set(groups), f"optimisers no loss term drives: {sorted(set(groups) - driven)}"


# -- targets ---------------------------------------------------------------------------------------
def _source_of(algo: Any, target: nn.Module, target_name: str) -> nn.Module | None:
    """The online network a target follows: same parameter shapes, preferably the same name minus 'target'."""
    targets = {id(t) for t in algo.target_networks()}
    shapes = [p.shape for p in target.parameters()]
    candidates = {
        n: m
        for n, m in algo.nets.items()
        if id(m) not in targets and [p.shape for p in m.parameters()] == shapes
    }
    stem = target_name.replace("target", "").strip("_")
    if stem in candidates:
        return candidates[stem]
    return next(iter(candidates.values())) if len(candidates) == 1 else None


def _explains(
    old_t: list[Tensor], new_t: list[Tensor], sources: list[list[Tensor]], taus: list[float]
) -> bool:
    """New target = old target (no update), a soft update towards a source, or a hard copy of it."""

    def close(xs: list[Tensor], ys: list[Tensor]) -> bool:
        return all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(xs, ys))

    if close(new_t, old_t):
        return True
    for src in sources:
        if close(new_t, src) or any(
            close(new_t, [torch.lerp(o, s, tau) for o, s in zip(old_t, src)]) for tau in taus
        ):
            return True
    return False


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_targets_get_no_gradient_and_change_only_by_target_updates(
    cls: type[Algorithm], overrides: dict[str, Any]
) -> None:
    algo = make(cls, overrides)
    targets = list(algo.target_networks())
    if not targets:
        pytest.skip(f"{cls.__name__} has no target networks")
    module_names = {id(m): n for n, m in algo.nets.named_modules()}
    taus = [
        float(v)
        for f in dataclasses.fields(algo.config)
        if ("tau" in f.name or "polyak" in f.name) and isinstance(v := getattr(algo.config, f.name), float)
    ]
    for t in targets:
        assert id(t) in module_names, "a target network is not inside algo.nets (it would not be saved)"
        trainable = [n for n, p in t.named_parameters() if p.requires_grad]
        assert not trainable, f"{module_names[id(t)]}: parameters require grad: {trainable}"
    sources = {id(t): _source_of(algo, t, module_names[id(t)]) for t in targets}

    for data in make_data(cls, 3):
        old_t = {id(t): [p.detach().clone() for p in t.parameters()] for t in targets}
        old_s = {k: [p.detach().clone() for p in s.parameters()] for k, s in sources.items() if s is not None}
        step(algo, data)
        for t in targets:
            name = module_names[id(t)]
            with_grad = [n for n, p in t.named_parameters() if p.grad is not None]
            assert not with_grad, f"{name}: gradient reached {with_grad}"
            src = sources[id(t)]
            if src is None:  # no unambiguous online twin: only the gradient checks apply
                continue
            new_t = [p.detach() for p in t.parameters()]
            new_s = [p.detach() for p in src.parameters()]
            assert _explains(old_t[id(t)], new_t, [new_s, old_s[id(t)]], taus), (
                f"{name} changed other than by a soft (tau in {taus}) or hard update from {module_names[id(src)]}"
            )


# -- state and determinism -------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_state_round_trip_resumes_exactly(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    data = make_data(cls, 6)
    algo = make(cls, overrides, seed=0)
    train(algo, data[:3])
    # A checkpoint is a copy: without it the restored optimiser could share live tensors with `algo`.
    state = copy.deepcopy(algo.state_dict())
    restored = make(cls, overrides, seed=1, fitted=False)  # the normaliser must come from the state
    restored.load_state_dict(state)
    assert restored.num_updates == algo.num_updates
    assert_same_state(snapshot(algo), snapshot(restored), "after load_state_dict")
    obs = raw_obs()
    np.testing.assert_array_equal(algo.act(obs), restored.act(obs))

    train(algo, data[3:])
    train(restored, data[3:])
    assert_same_state(snapshot(algo), snapshot(restored), "3 updates after the round trip")


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_same_seed_same_parameters(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    data = make_data(cls, 5)
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("other", 1)):
        algo = make(cls, overrides, seed=seed)
        train(algo, data)
        runs[label] = snapshot(algo)
    assert_same_state(runs["a"], runs["b"], "same seed")
    params = [n for n, _ in make(cls, overrides).nets.named_parameters()]
    assert any(not torch.equal(runs["a"][n], runs["other"][n]) for n in params), (
        "seeds 0 and 1 gave identical parameters"
    )


# -- policy artefact -------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_policy_artifact_round_trip(cls: type[Algorithm], overrides: dict[str, Any], tmp_path: Path) -> None:
    algo = make(cls, overrides)
    train(algo, make_data(cls, 3))
    policy = algo.policy()
    policy.save(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert (loaded.kind, loaded.is_stochastic) == (policy.kind, policy.is_stochastic)
    obs = raw_obs()
    np.testing.assert_array_equal(policy.act(obs), loaded.act(obs))
    np.testing.assert_array_equal(policy.act(obs), algo.act(obs))
    if not policy.is_stochastic:
        return
    rng = np.random.default_rng(3)
    if cls.discrete:
        actions = rng.integers(0, DISCRETE_ACTIONS.n, size=len(obs))
    else:  # strictly inside the bounds, where the density is finite
        actions = rng.uniform(BOX_ACTIONS.low + 0.05, BOX_ACTIONS.high - 0.05, size=(len(obs), 2)).astype(
            np.float32
        )
    log_prob = policy.log_prob(obs, actions)
    assert log_prob.shape == (len(obs),) and np.isfinite(log_prob).all()
    np.testing.assert_array_equal(log_prob, loaded.log_prob(obs, actions))
    policy.seed(11)
    loaded.seed(11)
    np.testing.assert_array_equal(policy.act(obs, deterministic=False), loaded.act(obs, deterministic=False))
