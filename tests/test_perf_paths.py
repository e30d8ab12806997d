"""The fast paths of offrl.nets and the algorithms' speed settings compute what the plain code computes.

References are written out with plain torch ops (concatenated inputs, one batched matmul per layer,
autograd), never through the code under test.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import adam
from offrl.algos.bc import BCConfig, ContinuousBC
from offrl.algos.cql import CQL, CQLConfig
from offrl.algos.cql_discrete import DiscreteCQL, DiscreteCQLConfig
from offrl.types import Batch

needs_bf16 = pytest.mark.skipif(not nets.bf16_supported(), reason="no native bfloat16 matmuls on this CPU")


def plain_q(q: nets.QEnsemble, obs: Tensor, actions: Tensor) -> Tensor:
    """Q of every member at (B, M) actions: [s repeated | a] through baddbmm + relu, (E, B, M)."""
    b, m = actions.shape[:2]
    x = torch.cat([obs.unsqueeze(1).expand(-1, m, -1), actions], dim=-1).reshape(b * m, -1)
    x = x.unsqueeze(0).expand(q.net.members, -1, -1)
    layers = list(q.net.layers)
    for i, layer in enumerate(layers):
        x = torch.baddbmm(layer.bias, x, layer.weight)
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x.squeeze(-1).view(-1, b, m)


def grads(out: Tensor, upstream: Tensor, wrt: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(out, wrt, upstream))


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture
def always_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route even small float32 ensembles through the hand-written path."""
    monkeypatch.setattr(nets, "FAST_MIN_SIZE", 0)


def _inputs(obs_dim: int, seed: int = 0) -> tuple[nets.QEnsemble, Tensor, Tensor]:
    torch.manual_seed(seed)
    q = nets.QEnsemble(3, obs_dim, 2, (32, 24))
    obs = torch.randn(16, obs_dim, requires_grad=True)
    actions = (torch.rand(16, 5, 2) * 2 - 1).requires_grad_()
    return q, obs, actions


@pytest.mark.parametrize("split", [True, False])
def test_sampled_q_equals_plain_computation(
    always_fast: None, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    # split: W·[s; a] computed as W_s·s once per state + W_a·a per action
    monkeypatch.setattr(nets, "SPLIT_MIN_OBS", 0 if split else 10**9)
    q, obs, actions = _inputs(obs_dim=6)
    fast, ref = q.q_sampled(obs, actions), plain_q(q, obs, actions)
    assert fast.shape == (3, 16, 5) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    wrt = [obs, actions, *q.parameters()]
    for g_fast, g_ref in zip(grads(fast, upstream, wrt), grads(ref, upstream, wrt), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)


def test_split_is_used_for_wide_observations() -> None:
    # at SPLIT_MIN_OBS features and above the observation part is projected once per state
    q, obs, actions = _inputs(obs_dim=nets.SPLIT_MIN_OBS)
    calls: list[Any] = []
    real_addmm = torch.addmm

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(args[1].shape)
        return real_addmm(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets, "FAST_MIN_SIZE", 0)
        mp.setattr(torch, "addmm", spy)
        out = q.q_sampled(obs, actions)
    assert (16, nets.SPLIT_MIN_OBS) in calls  # one row per state, not per (state, action)
    torch.testing.assert_close(out, plain_q(q, obs, actions).detach(), rtol=1e-5, atol=1e-5)


def test_forward_2d_and_ensemble_mlp_equal_plain(always_fast: None) -> None:
    q, obs, actions = _inputs(obs_dim=4)
    a = actions[:, 0].detach().requires_grad_()
    fast, ref = q(obs, a), plain_q(q, obs, a.unsqueeze(1)).squeeze(-1)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    wrt = [obs, a, *q.parameters()]
    for g_fast, g_ref in zip(grads(fast, upstream, wrt), grads(ref, upstream, wrt), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)
    # EnsembleMLP on a shared (B, in) input against its own per-member form (E, B, in)
    mlp = nets.EnsembleMLP(2, 5, 3, (16,))
    x = torch.randn(7, 5)
    shared = mlp(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets, "FAST_MIN_SIZE", 10**12)
        per_member = mlp(x.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(shared, per_member, rtol=1e-5, atol=1e-5)


def test_no_grad_path_equals_autograd_path(always_fast: None) -> None:
    q, obs, actions = _inputs(obs_dim=6)
    with torch.no_grad():
        plain = q.q_sampled(obs, actions)
    assert torch.equal(plain, q.q_sampled(obs, actions).detach())


def test_detached_weights_send_gradient_to_actions_only(always_fast: None) -> None:
    # the actor loss of CQL sees the critic through detached weights
    q, obs, actions = _inputs(obs_dim=6)
    frozen = {k: v.detach() for k, v in q.named_parameters()}
    out = torch.func.functional_call(q, frozen, (obs.detach(), actions[:, 0]))
    out.sum().backward()
    assert all(p.grad is None for p in q.parameters())
    assert actions.grad is not None and actions.grad[:, 0].abs().sum() > 0
    assert actions.grad[:, 1:].abs().sum() == 0


@needs_bf16
def test_bf16_ensemble_close_to_fp32_and_keeps_fp32_outputs(always_fast: None) -> None:
    q, obs, actions = _inputs(obs_dim=6)
    ref = q.q_sampled(obs, actions)
    with nets.compute_precision("bf16"):
        low = q.q_sampled(obs, actions)
    assert low.dtype == torch.float32
    assert rel_err(low, ref) < 2e-2
    # a realistic upstream gradient (squared error to a target): same direction as in float32
    target = ref.detach() + 0.3 * torch.randn_like(ref)
    wrt = list(q.parameters())
    g_low = torch.autograd.grad(((low - target) ** 2).mean(), wrt)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), wrt)
    for a, b in zip(g_low, g_ref, strict=True):
        assert a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


@needs_bf16
def test_bf16_output_layer_is_not_rounded(always_fast: None) -> None:
    # around 1000 bfloat16 values are 4 apart; the float32 output layer keeps Q-values exact enough
    q, obs, actions = _inputs(obs_dim=6)
    with torch.no_grad():
        q.net.layers[-1].bias.fill_(1000.0)
    ref = q.q_sampled(obs, actions).detach()
    with nets.compute_precision("bf16"):
        low = q.q_sampled(obs, actions).detach()
    assert (low - ref).abs().max() < 0.05


@needs_bf16
def test_bf16_policy_mlp_close_and_acting_unaffected() -> None:
    torch.manual_seed(0)
    actor = nets.TanhGaussianActor(5, 2, (32, 32))
    obs = torch.randn(9, 5)
    mean, log_std = actor(obs)
    with nets.compute_precision("bf16"):
        mean_low, log_std_low = actor(obs)
    assert mean_low.dtype == torch.float32
    torch.testing.assert_close(mean_low, mean, rtol=0, atol=2e-2)
    torch.testing.assert_close(log_std_low, log_std, rtol=0, atol=2e-2)
    assert torch.equal(actor(obs)[0], actor.net(obs).chunk(2, -1)[0])  # outside the block: plain modules


def test_compute_precision_nests_restores_and_validates() -> None:
    assert nets._compute_dtype() == torch.float32
    with nets.compute_precision("bf16"):
        assert nets._compute_dtype() == torch.bfloat16
        with nets.compute_precision("fp32"):
            assert nets._compute_dtype() == torch.float32
        assert nets._compute_dtype() == torch.bfloat16
    assert nets._compute_dtype() == torch.float32
    with pytest.raises(ValueError, match="precision"), nets.compute_precision("fp16"):
        pass


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_low_precision_weights_follow_every_optimizer_step(always_fast: None, precision: str) -> None:
    # low-precision copies must never go stale (fused Adam does not bump tensor versions)
    q, obs, actions = _inputs(obs_dim=6)
    opt = adam(q.parameters(), lr=1e-2)
    for _ in range(2):
        with nets.compute_precision(precision):
            out = q.q_sampled(obs.detach(), actions.detach())
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        with nets.compute_precision(precision):
            after = q.q_sampled(obs.detach(), actions.detach()).detach()
        reference = plain_q(q, obs, actions).detach()
        assert rel_err(after, reference) < (1e-5 if precision == "fp32" else 2e-2)


def test_double_backward_is_refused(always_fast: None) -> None:
    q, obs, actions = _inputs(obs_dim=6)
    (g,) = torch.autograd.grad(q.q_sampled(obs, actions).sum(), obs, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_adam_is_fused_on_cpu() -> None:
    opt = adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    assert opt.defaults["fused"] is True


def test_keep_freed_memory_is_idempotent() -> None:
    first = nets.keep_freed_memory()
    assert nets.keep_freed_memory() is first


# -- the algorithms ----------------------------------------------------------------------------------
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)


def _batches(discrete: bool, n: int, size: int = 64) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        actions = (
            torch.randint(0, 3, (size,), generator=g)
            if discrete
            else torch.rand(size, 2, generator=g) * 2 - 1
        )
        out.append(
            Batch(
                obs=torch.randn(size, 4, generator=g),
                actions=actions,
                rewards=torch.randn(size, generator=g),
                next_obs=torch.randn(size, 4, generator=g),
                terminals=(torch.rand(size, generator=g) < 0.1).float(),
            )
        )
    return out


def _cql(**overrides: Any) -> CQL:
    cfg = CQLConfig(actor_hidden=(32, 32), critic_hidden=(64, 64), batch_size=64, **overrides)
    return CQL(cfg, OBS, BOX, seed=4)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_cql_resume_is_bitwise_on_the_fast_path(always_fast: None, precision: str) -> None:
    batches = _batches(False, 4)
    full = _cql(precision=precision)
    for b in batches:
        full.update(b)
    half = _cql(precision=precision)
    for b in batches[:2]:
        half.update(b)
    resumed = _cql(precision=precision)
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    for b in batches[2:]:
        resumed.update(b)
    a, b = full.nets.state_dict(), resumed.nets.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_bf16
@pytest.mark.parametrize(
    "make",
    [
        lambda p: _cql(precision=p),
        lambda p: ContinuousBC(BCConfig(hidden=(32, 32), precision=p), OBS, BOX, seed=4),
        lambda p: DiscreteCQL(
            DiscreteCQLConfig(hidden=(32, 32), precision=p), OBS, gym.spaces.Discrete(3), seed=4
        ),
    ],
    ids=["cql", "bc", "cql-discrete"],
)
def test_bf16_updates_track_fp32_updates(make: Any) -> None:
    fp32, bf16 = make("fp32"), make("bf16")
    discrete = isinstance(fp32, DiscreteCQL)
    for b in _batches(discrete, 3):
        m32, m16 = fp32.update(b), bf16.update(b)
        for k, v in m32.items():
            assert torch.isfinite(m16[k]), k
            assert abs(float(m16[k]) - float(v)) <= 0.05 * abs(float(v)) + 0.05, (k, float(m16[k]), float(v))
    a, b = fp32.nets.state_dict(), bf16.nets.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) < 1e-2


def test_speed_settings_are_validated() -> None:
    from offrl.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        _cql(precision="fp16")
    with pytest.raises(ConfigError, match="compile"):
        BCConfig(compile="fastest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="precision"):
        DiscreteCQLConfig(precision="half")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["bc", "cql", "cql-discrete"])
def test_compiled_update_equals_eager(algo: str) -> None:
    discrete = algo == "cql-discrete"

    def make(**kw: Any) -> Any:
        if algo == "cql":
            cfg: Any = CQLConfig(
                actor_hidden=(16, 16), critic_hidden=(16, 16), batch_size=64, lagrange=True, **kw
            )
            return CQL(cfg, OBS, BOX, seed=2)
        if discrete:
            cfg = DiscreteCQLConfig(hidden=(16, 16), batch_size=64, **kw)
            return DiscreteCQL(cfg, OBS, gym.spaces.Discrete(3), seed=2)
        return ContinuousBC(BCConfig(hidden=(16, 16), batch_size=64, **kw), OBS, BOX, seed=2)

    eager, compiled = make(), make(compile="default")
    for b in _batches(discrete, 3):
        m_eager, m_compiled = eager.update(b), compiled.update(b)
        for k in m_eager:
            torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5)
    a, b = eager.nets.state_dict(), compiled.nets.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert dataclasses.asdict(compiled.config)["compile"] == "default"
