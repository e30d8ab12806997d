"""The contract every registered algorithm keeps, whatever it learns.

Parametrised over ``offrl.algos.registry.variants()``: a new algorithm joins by registering. Each
variant runs with its default config (networks shrunk to (32, 32), batch 32) and once more per
alternative value of each ``Literal`` or ``bool`` config field, so that switchable code paths are
held to the contract too. A combination the algorithm rejects with ``ConfigError`` is skipped.

Optional hook checked here: ``loss_terms(batch) -> dict[str, Tensor]``. An algorithm with several
optimisers may expose the scalar losses its ``update`` backpropagates, keyed by the name of the
optimiser in ``algo.optimizers`` that steps each (``"critic"``, ``"critic_loss"`` or
``"critic_cql"`` for ``optimizers["critic"]``; any names when there is only one optimiser). Each
term must send gradient to its own optimiser's parameters and to no other optimiser's (e.g. the
actor loss must not put gradient into the critic).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from offrl.algos.base import OfflineAlgorithm
from offrl.algos.registry import variants
from offrl.errors import ConfigError
from offrl.policies.artifact import load_policy
from offrl.preprocess import ObsNormalizer
from offrl.types import Batch

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
# Non-unit, asymmetric bounds: scaling between [-1, 1] and the environment's units must be exercised.
BOX_ACTIONS = gym.spaces.Box(low=np.array([-2.0, -1.0], np.float32), high=np.array([2.0, 3.0], np.float32))
DISCRETE_ACTIONS = gym.spaces.Discrete(3)
BATCH = 32
OBS_MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0])
OBS_STD = torch.tensor([2.0, 0.5, 1.0, 3.0])


# -- the cases -------------------------------------------------------------------------------------
def _config_cases(cls: type[OfflineAlgorithm]) -> list[tuple[str, dict[str, Any]]]:
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


CASES = [
    pytest.param(cls, overrides, id=f"{name}-{variant}-{label}")
    for name, variant, cls in variants()
    for label, overrides in _config_cases(cls)
]


def small_config(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> Any:
    """Default config with every tuple-of-ints field (hidden sizes) at (32, 32) and batch size 32."""
    cfg = cls.Config()
    changes: dict[str, Any] = {"batch_size": BATCH}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple) and value and all(type(v) is int for v in value):
            changes[f.name] = (32, 32)
    return dataclasses.replace(cfg, **changes, **overrides)


def make(cls: type[OfflineAlgorithm], overrides: dict[str, Any], seed: int = 0, fitted: bool = True) -> Any:
    """An instance on the synthetic spaces; ``fitted`` passes a non-trivial observation normaliser."""
    action_space = DISCRETE_ACTIONS if cls.discrete else BOX_ACTIONS
    normalizer = ObsNormalizer(4, OBS_MEAN.clone(), OBS_STD.clone()) if fitted else None
    try:
        return cls(small_config(cls, overrides), OBS_SPACE, action_space, normalizer=normalizer, seed=seed)
    except ConfigError as exc:
        pytest.skip(f"config rejected: {exc}")


def make_batches(discrete: bool, n: int, seed: int = 123) -> list[Batch]:
    """Batches in learning units: standardised observations, actions in [-1, 1] or 0-based ints."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if discrete:
            actions = torch.randint(0, int(DISCRETE_ACTIONS.n), (BATCH,), generator=g)
        else:
            actions = torch.rand(BATCH, 2, generator=g) * 1.8 - 0.9
        out.append(
            Batch(
                obs=torch.randn(BATCH, 4, generator=g),
                actions=actions,
                rewards=torch.randn(BATCH, generator=g),
                next_obs=torch.randn(BATCH, 4, generator=g),
                terminals=(torch.rand(BATCH, generator=g) < 0.1).float(),
            )
        )
    return out


def raw_obs(n: int = 16, seed: int = 7, scale: float = 1.0) -> np.ndarray:
    """Observations in the environment's units (before normalisation), (n, 4) float32."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4)) * scale
    return (OBS_MEAN.numpy() + OBS_STD.numpy() * z).astype(np.float32)


def train(algo: Any, batches: list[Batch]) -> None:
    for b in batches:
        algo.update(b)


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
def test_act_shapes_and_bounds(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    # moderate and extreme observations, as float32 and float64 numpy arrays
    obs = np.concatenate([raw_obs(12), raw_obs(4, seed=8, scale=100.0)])
    for trained in (False, True):
        if trained:
            train(algo, make_batches(cls.discrete, 3))
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
def test_actions_depend_on_observation(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> None:
    algo = make(cls, overrides)
    train(algo, make_batches(cls.discrete, 3))
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
def test_update_returns_finite_detached_scalars(
    cls: type[OfflineAlgorithm], overrides: dict[str, Any]
) -> None:
    algo = make(cls, overrides)
    for i, batch in enumerate(make_batches(cls.discrete, 3), start=1):
        metrics = algo.update(batch)
        assert isinstance(metrics, dict) and metrics
        for k, v in metrics.items():
            assert isinstance(k, str) and "/" not in k, k  # the trainer adds the namespace
            assert isinstance(v, Tensor), f"{k}: {type(v).__name__}, not a tensor"
            assert v.dim() == 0, f"{k}: shape {tuple(v.shape)}"
            assert not v.requires_grad and v.grad_fn is None, f"{k} is attached to the graph"
            assert torch.isfinite(v), f"{k} = {v}"
        assert algo.num_updates == i, f"num_updates is {algo.num_updates} after {i} updates"


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_one_update_moves_every_optimised_parameter(
    cls: type[OfflineAlgorithm], overrides: dict[str, Any]
) -> None:
    algo = make(cls, overrides)
    groups = optimised(algo)
    assert groups, "the algorithm has no optimiser"
    before = {id(p): p.detach().clone() for ps in groups.values() for p in ps}
    algo.update(make_batches(cls.discrete, 1)[0])
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
def test_each_parameter_has_one_owner(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> None:
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
    algo.update(make_batches(cls.discrete, 1)[0])
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
    terms = algo.loss_terms(make_batches(cls.discrete, 1, seed=5)[0])
    assert terms, "loss_terms returned nothing"
    for term_name, term in terms.items():
        owner_name = _owner_of(term_name, list(groups))
        assert owner_name is not None, f"loss term '{term_name}' names no optimiser (have: {sorted(groups)})"
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
    cls: type[OfflineAlgorithm], overrides: dict[str, Any]
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

    for batch in make_batches(cls.discrete, 3):
        old_t = {id(t): [p.detach().clone() for p in t.parameters()] for t in targets}
        old_s = {k: [p.detach().clone() for p in s.parameters()] for k, s in sources.items() if s is not None}
        algo.update(batch)
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
def test_state_round_trip_resumes_exactly(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> None:
    batches = make_batches(cls.discrete, 6)
    algo = make(cls, overrides, seed=0)
    train(algo, batches[:3])
    # A checkpoint is a copy: without it the restored optimiser could share live tensors with `algo`.
    state = copy.deepcopy(algo.state_dict())
    restored = make(cls, overrides, seed=1, fitted=False)  # the normaliser must come from the state
    restored.load_state_dict(state)
    assert restored.num_updates == algo.num_updates
    assert_same_state(snapshot(algo), snapshot(restored), "after load_state_dict")
    obs = raw_obs()
    np.testing.assert_array_equal(algo.act(obs), restored.act(obs))

    train(algo, batches[3:])
    train(restored, batches[3:])
    assert_same_state(snapshot(algo), snapshot(restored), "3 updates after the round trip")


@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_same_seed_same_parameters(cls: type[OfflineAlgorithm], overrides: dict[str, Any]) -> None:
    batches = make_batches(cls.discrete, 5)
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("other", 1)):
        algo = make(cls, overrides, seed=seed)
        train(algo, batches)
        runs[label] = snapshot(algo)
    assert_same_state(runs["a"], runs["b"], "same seed")
    params = [n for n, _ in make(cls, overrides).nets.named_parameters()]
    assert any(not torch.equal(runs["a"][n], runs["other"][n]) for n in params), (
        "seeds 0 and 1 gave identical parameters"
    )


# -- policy artefact -------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "overrides"), CASES)
def test_policy_artifact_round_trip(
    cls: type[OfflineAlgorithm], overrides: dict[str, Any], tmp_path: Path
) -> None:
    algo = make(cls, overrides)
    train(algo, make_batches(cls.discrete, 3))
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
