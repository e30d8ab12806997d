"""The speed layer (offrl.fast) and the runtime's speed settings compute what the plain code computes.

References are written out with plain torch ops (concatenated inputs, one batched matmul per layer,
autograd), never through the code under test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from offrl import losses, nets
from offrl.algos.bc import BC, BCConfig, DiscreteBC, bc_cross_entropy_loss, bc_mse_loss
from offrl.algos.cql import CQL, CQLConfig
from offrl.algos.cql_discrete import DiscreteCQL, DiscreteCQLConfig, discrete_cql_penalty
from offrl.errors import ConfigError
from offrl.fast import graphs, hand, kernels, memory, registry, relu
from offrl.fast import sac as fast_sac
from offrl.fast.bc import cross_entropy_loss_and_grad, tanh_mse_loss_and_grad
from offrl.fast.cql_discrete import cql_loss_and_grad
from offrl.fast.optim import adam, apply_gradients, fused_adam_step
from offrl.online.sac import SAC, SACConfig
from offrl.runtime import Runtime
from offrl.types import Batch

needs_bf16 = pytest.mark.skipif(not relu.bf16_supported(), reason="no native bfloat16 matmuls on this CPU")
BF16 = Runtime(precision="bf16")


def lowered(module: nn.Module) -> Any:
    """A context in which ``module``'s networks compute their hidden layers in bfloat16, as within an
    update step of a bf16 run."""
    return kernels.Kernels(module, torch.bfloat16, fast_paths=True).lowered()


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
    monkeypatch.setattr(kernels, "FAST_MIN_SIZE", 0)


def _inputs(obs_dim: int, seed: int = 0) -> tuple[nets.QEnsemble, Tensor, Tensor]:
    torch.manual_seed(seed)
    q = nets.QEnsemble(3, obs_dim, 2, (32, 24))
    kernels.accelerate(q)
    obs = torch.randn(16, obs_dim, requires_grad=True)
    actions = (torch.rand(16, 5, 2) * 2 - 1).requires_grad_()
    return q, obs, actions


@pytest.mark.parametrize("split", [True, False])
def test_sampled_q_equals_plain_computation(
    always_fast: None, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    # split: W·[s; a] computed as W_s·s once per state + W_a·a per action
    monkeypatch.setattr(kernels, "SPLIT_MIN_OBS", 0 if split else 10**9)
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
    q, obs, actions = _inputs(obs_dim=kernels.SPLIT_MIN_OBS)
    calls: list[Any] = []
    real_addmm = torch.addmm

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(args[1].shape)
        return real_addmm(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "FAST_MIN_SIZE", 0)
        mp.setattr(torch, "addmm", spy)
        out = q.q_sampled(obs, actions)
    assert (16, kernels.SPLIT_MIN_OBS) in calls  # one row per state, not per (state, action)
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
    kernels.accelerate(mlp)
    x = torch.randn(7, 5)
    shared = mlp(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "FAST_MIN_SIZE", 10**12)
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
    with lowered(q):
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
    with lowered(q):
        low = q.q_sampled(obs, actions).detach()
    assert (low - ref).abs().max() < 0.05


@needs_bf16
def test_bf16_policy_mlp_close_and_acting_unaffected() -> None:
    torch.manual_seed(0)
    actor = nets.TanhGaussianActor(5, 2, (32, 32))
    obs = torch.randn(9, 5)
    mean, log_std = actor(obs)
    with lowered(actor):
        mean_low, log_std_low = actor(obs)
    assert mean_low.dtype == torch.float32
    torch.testing.assert_close(mean_low, mean, rtol=0, atol=2e-2)
    torch.testing.assert_close(log_std_low, log_std, rtol=0, atol=2e-2)
    assert torch.equal(actor(obs)[0], actor.net(obs).chunk(2, -1)[0])  # outside the block: plain modules


def test_lowered_kernels_are_restored_after_a_step() -> None:
    """Outside an update step (acting, evaluation) networks compute in float32, even after a failed step."""
    q = nets.QEnsemble(2, 3, 1, (8, 8))
    actor = nets.TanhGaussianActor(3, 1, (8, 8))
    root = nn.ModuleList([q, actor])
    k = kernels.Kernels(root, torch.bfloat16, fast_paths=True)
    resting = q.net.kernel
    assert isinstance(resting, kernels.EnsembleKernel) and resting.dtype == torch.float32
    with pytest.raises(RuntimeError, match="boom"), k.lowered():
        assert q.net.kernel is not resting and actor.kernel is not None
        raise RuntimeError("boom")
    assert q.net.kernel is resting and actor.kernel is None
    # without the fast paths a relu ensemble rests on its plain forward
    assert (
        kernels.Kernels(nets.QEnsemble(2, 3, 1, (8,)), torch.float32, fast_paths=False).ensembles[0].kernel
        is None
    )


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_low_precision_weights_follow_every_optimizer_step(always_fast: None, precision: str) -> None:
    # low-precision copies must never go stale (fused Adam does not bump tensor versions)
    q, obs, actions = _inputs(obs_dim=6)
    opt = adam(q.parameters(), lr=1e-2)

    def scope() -> Any:
        return lowered(q) if precision == "bf16" else contextlib.nullcontext()

    for _ in range(2):
        with scope():
            out = q.q_sampled(obs.detach(), actions.detach())
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        with scope():
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
    first = memory.keep_freed_memory()
    assert memory.keep_freed_memory() is first


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


def _cql(precision: Any = "fp32") -> CQL:
    cfg = CQLConfig(actor_hidden=(32, 32), critic_hidden=(64, 64), batch_size=64)
    return CQL(cfg, OBS, BOX, seed=4, runtime=Runtime(precision=precision))


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
        lambda p: BC(BCConfig(hidden=(32, 32)), OBS, BOX, seed=4, runtime=Runtime(precision=p)),
        lambda p: DiscreteCQL(
            DiscreteCQLConfig(hidden=(32, 32)),
            OBS,
            gym.spaces.Discrete(3),
            seed=4,
            runtime=Runtime(precision=p),
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


def test_speed_settings_are_runtime_settings() -> None:
    with pytest.raises(ConfigError, match="precision"):
        Runtime(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compile"):
        Runtime(compile="fastest")  # type: ignore[arg-type]
    for config in (BCConfig, CQLConfig, DiscreteCQLConfig, SACConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert not names & {"precision", "compile"}, config  # hyperparameters only


def _compilable(algo: str, **runtime: Any) -> Any:
    rt = Runtime(**runtime)
    if algo == "cql":
        cfg: Any = CQLConfig(actor_hidden=(16, 16), critic_hidden=(16, 16), batch_size=64, lagrange=True)
        return CQL(cfg, OBS, BOX, seed=2, runtime=rt)
    if algo == "cql-discrete":
        return DiscreteCQL(
            DiscreteCQLConfig(hidden=(16, 16), batch_size=64), OBS, gym.spaces.Discrete(3), seed=2, runtime=rt
        )
    if algo == "bc-discrete":
        return DiscreteBC(
            BCConfig(hidden=(16, 16), batch_size=64), OBS, gym.spaces.Discrete(3), seed=2, runtime=rt
        )
    return BC(BCConfig(hidden=(16, 16), batch_size=64), OBS, BOX, seed=2, runtime=rt)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["bc", "bc-discrete", "cql", "cql-discrete"])
def test_compiled_update_equals_eager(algo: str) -> None:
    discrete = algo.endswith("discrete")
    eager, compiled = _compilable(algo), _compilable(algo, compile="default")
    for b in _batches(discrete, 3):
        m_eager, m_compiled = eager.update(b), compiled.update(b)
        for k in m_eager:
            torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5)
    a, b = eager.nets.state_dict(), compiled.nets.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert compiled.runtime.compile == "default"


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("algo", ["bc", "bc-discrete", "cql-discrete"])
def test_compiled_hand_step_runs_whole_and_tracks_eager_in_bf16(
    monkeypatch: pytest.MonkeyPatch, algo: str
) -> None:
    """On CPU a compiled BC or discrete-CQL step is the hand-written one, compiled as one graph."""
    from torch._dynamo.utils import counters

    calls: list[int] = []
    real = hand.mlp_grads

    def spy(*args: Any) -> list[Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(hand, "mlp_grads", spy)
    torch._dynamo.reset()  # the spy is traced into a fresh graph
    counters.clear()
    discrete = algo.endswith("discrete")
    eager, compiled = (
        _compilable(algo, precision="bf16"),
        _compilable(algo, precision="bf16", compile="default"),
    )
    for b in _batches(discrete, 3):
        m_eager, m_compiled = eager.update(b), compiled.update(b)
        for k, v in m_eager.items():
            assert abs(float(m_compiled[k]) - float(v)) <= 0.02 * abs(float(v)) + 0.02, k
    assert calls and not counters["graph_break"], dict(counters["graph_break"])
    a, b_ = eager.nets.state_dict(), compiled.nets.state_dict()
    assert max(float((a[k] - b_[k]).abs().max()) for k in a if a[k].is_floating_point()) < 1e-2


# -- hand-written passes of one relu MLP (BC, discrete CQL) ------------------------------------------
def hand_forward(
    layers: list[nn.Linear], x: Tensor, keep_rows: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, relu.Tape]:
    return relu.forward(*hand.weights(layers), x, dtype, keep_rows)


def hand_backward(layers: list[nn.Linear], tape: relu.Tape, grad: Tensor) -> None:
    """Every parameter's ``.grad`` from the gradient w.r.t. the kept rows' outputs, as a hand step sets them."""
    ps = hand.params(layers)
    hand.set_grads(ps, relu.backward(tape, grad, out=[p.grad for p in ps])[0])


def plain_mlp(seq: nn.Sequential, x: Tensor) -> Tensor:
    """The MLP through F.linear + relu with autograd, no trailing activation."""
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        x = torch.nn.functional.linear(x, lin.weight, lin.bias)
        if i < len(linears) - 1:
            x = torch.relu(x)
    return x


@pytest.mark.parametrize(("hidden", "grad_rows"), [((32, 24), None), ((16,), None), ((8, 8, 8), 5)])
def test_hand_mlp_passes_equal_autograd(hidden: tuple[int, ...], grad_rows: int | None) -> None:
    torch.manual_seed(0)
    seq = nets.mlp(6, 3, hidden, output_activation="tanh")
    layers = hand.relu_linears(seq, nn.Tanh)
    assert layers is not None and len(layers) == len(hidden) + 1
    x = torch.randn(11, 6)
    out, tape = hand_forward(layers, x, grad_rows)
    assert not out.requires_grad
    ref = plain_mlp(seq, x)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    rows = x.shape[0] if grad_rows is None else grad_rows
    upstream = torch.randn(rows, 3)
    for p in seq.parameters():  # stale gradients must be overwritten, not accumulated
        p.grad = torch.full_like(p, 7.0)
    hand_backward(layers, tape, upstream)
    expected = torch.autograd.grad(ref[:rows], list(seq.parameters()), upstream)
    for p, g in zip(seq.parameters(), expected, strict=True):
        assert p.grad is not None
        assert rel_err(p.grad, g) < 1e-5


def test_hand_mlp_first_backward_creates_float32_grads() -> None:
    torch.manual_seed(1)
    seq = nets.mlp(4, 2, (8, 8))
    layers = hand.relu_linears(seq)
    assert layers is not None
    x = torch.randn(5, 4)
    out, tape = hand_forward(layers, x)
    hand_backward(layers, tape, torch.ones_like(out))
    plain_mlp(seq, x).sum().backward()  # accumulates onto the hand-written gradients: twice the value
    for p in seq.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
    ref = copy.deepcopy(seq)
    ref.zero_grad(set_to_none=True)
    plain_mlp(ref, x).sum().backward()
    for p, q in zip(seq.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-5, atol=1e-6)  # type: ignore[operator]


def test_relu_linears_only_accepts_plain_relu_mlps() -> None:
    assert hand.relu_linears(nets.mlp(3, 2, (4, 4), activation="tanh")) is None
    assert hand.relu_linears(nn.Sequential(nn.Linear(3, 2))) is None
    assert hand.relu_linears(nets.mlp(3, 2, (4,)).double()) is None
    assert hand.relu_linears(nn.Linear(3, 2)) is None
    assert hand.relu_linears(nets.mlp(3, 2, (4,), output_activation="tanh")) is None  # tail not expected
    assert hand.relu_linears(nets.mlp(3, 2, (4,)), nn.Tanh) is None  # expected tail missing
    assert hand.relu_linears(nets.mlp(3, 2, (4,), output_activation="tanh"), nn.Tanh) is not None
    assert hand.relu_linears(nets.mlp(3, 2, (4, 5))) is not None


@needs_bf16
def test_hand_mlp_bf16_close_to_fp32() -> None:
    torch.manual_seed(2)
    seq = nets.mlp(5, 3, (64, 64))
    layers = hand.relu_linears(seq)
    assert layers is not None
    x = torch.randn(32, 5)
    ref = plain_mlp(seq, x)
    upstream = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, list(seq.parameters()), upstream)
    out, tape = hand_forward(layers, x, dtype=torch.bfloat16)
    hand_backward(layers, tape, upstream)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 2e-2
    for p, g in zip(seq.parameters(), expected, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0) > 0.99


def test_loss_gradients_equal_autograd() -> None:
    g = torch.Generator().manual_seed(3)
    pre = (2 * torch.randn(9, 3, generator=g)).requires_grad_()
    target = torch.rand(9, 3, generator=g) * 2 - 1
    loss, grad = tanh_mse_loss_and_grad(pre.detach(), target)
    ref = bc_mse_loss(torch.tanh(pre), target)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(ref, pre)[0], rtol=1e-5, atol=1e-7)

    logits = (3 * torch.randn(9, 4, generator=g)).requires_grad_()
    actions = torch.randint(0, 4, (9,), generator=g)
    loss, grad = cross_entropy_loss_and_grad(logits.detach(), actions)
    ref = bc_cross_entropy_loss(logits, actions)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(ref, logits)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["huber", "mse"])
@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_cql_loss_gradient_equals_autograd(kind: Any, alpha: float) -> None:
    g = torch.Generator().manual_seed(4)
    q_all = (3 * torch.randn(16, 3, generator=g)).requires_grad_()  # |δ| on both sides of Huber's 1
    actions = torch.randint(0, 3, (16,), generator=g)
    target = 2 * torch.randn(16, generator=g)
    td, penalty, q_data, q_max, grad = cql_loss_and_grad(q_all.detach(), actions, target, kind, alpha)
    ref_q_data = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
    ref_td, ref_penalty = losses.td_loss(ref_q_data, target, kind), discrete_cql_penalty(q_all, actions)
    torch.testing.assert_close(td, ref_td.detach())
    torch.testing.assert_close(penalty, ref_penalty.detach())
    torch.testing.assert_close(q_data, ref_q_data.detach())
    torch.testing.assert_close(q_max, q_all.detach().amax(1))
    ref_grad = torch.autograd.grad(ref_td + alpha * ref_penalty, q_all)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fused_adam_step_is_the_optimizer_step() -> None:
    torch.manual_seed(5)
    a = nets.mlp(3, 2, (8,))
    b = copy.deepcopy(a)
    opt_a, opt_b = (
        adam(a.parameters(), lr=1e-2, weight_decay=0.1),
        adam(b.parameters(), lr=1e-2, weight_decay=0.1),
    )
    for i in range(3):
        x = torch.randn(4, 3)
        for net in (a, b):
            net.zero_grad(set_to_none=True)
            net(x).square().sum().backward()
        opt_a.step()
        assert fused_adam_step(opt_b) is (i > 0)  # the first step initialises state: the plain step runs
        if i == 0:
            opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    calls: list[int] = []
    opt_b.register_step_post_hook(lambda *_: calls.append(1))
    assert fused_adam_step(opt_b) is False  # hooks must run: the plain step is left to do it
    apply_gradients(opt_b)
    assert calls == [1]


def _uses_fast_step(algo: Any) -> bool:
    """Whether ``algo``'s last update ran a registered fast step in place of its reference ``_step``."""
    assert algo._runner is not None
    return all(getattr(step, "__name__", "") == "fast_step" for step in algo._runner._steps.values())


def _fast_vs_reference(make: Any, discrete: bool, precision: Any = "fp32") -> None:
    """The registered fast step against the reference step (fast_paths off), from the same seed."""
    fast = make(Runtime(precision=precision))
    reference = make(Runtime(precision=precision, fast_paths=False))
    strict = precision == "fp32"
    for b in _batches(discrete, 3, size=24 if strict else 64):
        m_fast, m_ref = fast.update(b), reference.update(b)
        assert set(m_fast) == set(m_ref)
        for k, v in m_ref.items():
            assert not m_fast[k].requires_grad and m_fast[k].dim() == 0
            if strict:
                torch.testing.assert_close(m_fast[k], v, rtol=1e-5, atol=1e-6)
            else:
                assert abs(float(m_fast[k]) - float(v)) <= 0.02 * abs(float(v)) + 0.02, k
    assert _uses_fast_step(fast) and not _uses_fast_step(reference)
    a, b_ = fast.state_dict(), reference.state_dict()
    if not strict:
        assert (
            max(float((a["nets"][k] - v).abs().max()) for k, v in b_["nets"].items() if v.is_floating_point())
            < 1e-2
        )
        return
    for k, v in b_["nets"].items():
        assert rel_err(a["nets"][k], v) < 1e-5, k
    for name, opt in b_["optimizers"].items():
        for i, st in opt["state"].items():
            for key, v in st.items():
                assert rel_err(a["optimizers"][name]["state"][i][key], v) < 1e-5, (name, i, key)


N3 = gym.spaces.Discrete(3)
SMALL_SAC = {"actor_hidden": (32, 32), "critic_hidden": (32, 32), "actor_lr": 1e-2, "critic_lr": 1e-2}
# every algorithm class with a registered fast step: (make from a runtime, discrete)
FAST_STEPS: dict[type, tuple[Any, bool]] = {
    BC: (
        lambda rt: BC(BCConfig(hidden=(32, 32), lr=1e-2), OBS, BOX, seed=6, runtime=rt),
        False,
    ),
    DiscreteBC: (lambda rt: DiscreteBC(BCConfig(hidden=(32, 32)), OBS, N3, seed=6, runtime=rt), True),
    DiscreteCQL: (
        lambda rt: DiscreteCQL(
            DiscreteCQLConfig(hidden=(32, 32), lr=1e-2, target_update_interval=2), OBS, N3, seed=6, runtime=rt
        ),
        True,
    ),
    SAC: (lambda rt: SAC(SACConfig(**SMALL_SAC), OBS, BOX, seed=6, runtime=rt), False),
}


def test_every_registered_fast_step_has_an_equivalence_test() -> None:
    assert set(registry.registered()) == set(FAST_STEPS) == set(BF16_STEPS)


@pytest.mark.parametrize("cls", list(FAST_STEPS), ids=lambda c: c.__name__)
def test_registered_fast_step_equals_reference_step(cls: type) -> None:
    make, discrete = FAST_STEPS[cls]
    _fast_vs_reference(make, discrete)


# at the default learning rates, as a bf16 run trains
BF16_STEPS: dict[type, tuple[Any, bool]] = {
    BC: (lambda rt: BC(BCConfig(hidden=(32, 32)), OBS, BOX, seed=7, runtime=rt), False),
    DiscreteBC: (lambda rt: DiscreteBC(BCConfig(hidden=(32, 32)), OBS, N3, seed=7, runtime=rt), True),
    DiscreteCQL: (
        lambda rt: DiscreteCQL(DiscreteCQLConfig(hidden=(32, 32)), OBS, N3, seed=7, runtime=rt),
        True,
    ),
    SAC: (
        lambda rt: SAC(
            SACConfig(actor_hidden=(32, 32), critic_hidden=(32, 32)), OBS, BOX, seed=7, runtime=rt
        ),
        False,
    ),
}


@needs_bf16
@pytest.mark.parametrize("cls", list(BF16_STEPS), ids=lambda c: c.__name__)
def test_registered_fast_step_tracks_reference_step_in_bf16(cls: type) -> None:
    make, discrete = BF16_STEPS[cls]
    _fast_vs_reference(make, discrete, precision="bf16")


@pytest.mark.parametrize("overrides", [{"max_grad_norm": 0.05, "weight_decay": 0.01}], ids=["clip+decay"])
def test_bc_fast_step_equals_reference_with_clip_and_decay(overrides: Any) -> None:
    cfg = BCConfig(hidden=(32, 32), lr=1e-2, **overrides)
    _fast_vs_reference(lambda rt: BC(cfg, OBS, BOX, seed=6, runtime=rt), discrete=False)
    dcfg = BCConfig(hidden=(32, 32), **overrides)
    _fast_vs_reference(lambda rt: DiscreteBC(dcfg, OBS, N3, seed=6, runtime=rt), discrete=True)


def test_discrete_cql_fast_step_equals_reference_as_mse_soft_dqn() -> None:
    overrides: Any = {"loss": "mse", "target_update": "soft", "max_grad_norm": None, "cql_alpha": 0.0}
    cfg = DiscreteCQLConfig(hidden=(32, 32), lr=1e-2, reward_scale=0.5, **overrides)
    _fast_vs_reference(lambda rt: DiscreteCQL(cfg, OBS, N3, seed=6, runtime=rt), discrete=True)


@pytest.mark.parametrize(
    "overrides",
    [{"max_grad_norm": 0.5, "auto_alpha": False}, {"n_critics": 3}],
    ids=["clip-fixed-alpha", "3-critics"],
)
def test_sac_fast_step_equals_reference_step(overrides: Any) -> None:
    cfg = SACConfig(**SMALL_SAC, **overrides)
    _fast_vs_reference(lambda rt: SAC(cfg, OBS, BOX, seed=6, runtime=rt), discrete=False)


def test_fast_steps_are_gated_alike() -> None:
    """One rule for every registered step: with fast_paths, eagerly anywhere, compiled on CPU only."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert registry.applies(True, None, cpu) and registry.applies(True, None, cuda)
    assert registry.applies(True, "default", cpu) and not registry.applies(True, "default", cuda)
    assert not registry.applies(False, None, cpu)
    sac_algo = SAC(SACConfig(**SMALL_SAC), OBS, BOX, runtime=Runtime(compile="default"))
    sac_algo.device = cuda  # gating only: nothing runs
    assert registry.fast_step(sac_algo, torch.float32) is None


def test_hand_paths_are_taken_and_leave_targets_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hand.mlp_grads

    def spy(*args: Any) -> list[torch.Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(hand, "mlp_grads", spy)
    algos: list[Any] = [
        BC(BCConfig(hidden=(16, 16)), OBS, BOX, seed=0),
        DiscreteBC(BCConfig(hidden=(16, 16)), OBS, N3, seed=0),
        DiscreteCQL(DiscreteCQLConfig(hidden=(16, 16)), OBS, N3, seed=0),
    ]
    for algo in algos:
        algo.update(_batches(algo.discrete, 1, size=8)[0])
    assert calls == [1, 1, 1]
    assert all(p.grad is None for p in algos[2].q_target.parameters())
    # the Gaussian policy has no hand-written pass: it keeps the autograd path
    gaussian = BC(BCConfig(hidden=(16, 16), policy="gaussian"), OBS, BOX, seed=0)
    gaussian.update(_batches(False, 1, size=8)[0])
    assert calls == [1, 1, 1] and not _uses_fast_step(gaussian)


# -- SAC's hand-written step ---------------------------------------------------------------------
def test_relu_ensemble_passes_equal_autograd() -> None:
    torch.manual_seed(0)
    ens = nets.EnsembleMLP(3, 5, 2, (8, 8))
    layers = hand.relu_ensemble_linears(ens)
    assert layers is not None
    x = torch.randn(6, 5, requires_grad=True)
    grad = torch.randn(3, 6, 2)
    ref = ens(x)
    ref.backward(grad)
    out, tape = relu.forward(*hand.weights(layers), x.detach(), torch.float32)
    torch.testing.assert_close(out, ref.detach())
    ref_grads = [p.grad.clone() for p in ens.parameters()]  # type: ignore[union-attr]
    ens.zero_grad(set_to_none=True)
    ps = hand.params(layers)
    grads, g_x, _ = relu.backward(tape, grad, input_grad=True)
    hand.set_grads(ps, grads)
    assert g_x is not None
    torch.testing.assert_close(g_x, x.grad)
    for p, g in zip(ens.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    # weights as constants: no parameter gradient is written, the input gradient is the same
    ens.zero_grad(set_to_none=True)
    torch.testing.assert_close(
        relu.backward(tape, grad, need_w=[False] * 3, need_b=[False] * 3, input_grad=True)[1], g_x
    )
    assert all(p.grad is None for p in ens.parameters())
    assert hand.relu_ensemble_linears(nets.EnsembleMLP(2, 3, 1, (4,), activation="tanh")) is None


def test_sac_loss_gradients_equal_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, generator=g, requires_grad=True)
    target = torch.randn(5, generator=g)
    loss, grad = fast_sac.critic_loss_and_grad(q.detach(), target)
    ref = losses.critic_loss(q, target)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, q.grad)

    q_pi = torch.randn(2, 5, generator=g, requires_grad=True)
    log_pi = torch.randn(5, generator=g, requires_grad=True)
    alpha = torch.tensor(0.3)
    loss, g_q, g_lp = fast_sac.actor_loss_and_grads(q_pi.detach(), log_pi.detach(), alpha)
    ref = losses.sac_actor_loss(q_pi, log_pi, alpha)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(g_q, q_pi.grad)
    torch.testing.assert_close(g_lp, log_pi.grad)

    # the reparameterised tanh-Gaussian sample, the log-std clamp included (some entries outside it)
    out = torch.randn(5, 6, generator=g) * 4
    out.requires_grad_(True)
    noise = torch.randn(5, 3, generator=g)
    mean, raw = out.chunk(2, -1)
    log_std = raw.clamp(nets.LOG_STD_MIN, nets.LOG_STD_MAX)
    u = mean + noise * log_std.exp()
    action = torch.tanh(u)
    log_prob = nets.gaussian_log_prob(u, mean, log_std) - nets.tanh_log_det_jacobian(u).sum(-1)
    w_a, w_lp = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    ((action * w_a).sum() + (log_prob * w_lp).sum()).backward()
    assert bool((raw.detach() > nets.LOG_STD_MAX).any() and (raw.detach() < nets.LOG_STD_MIN).any())
    got = fast_sac.tanh_gaussian_sample_grad(
        w_a, w_lp, action.detach(), noise, log_std.detach().exp(), raw.detach()
    )
    torch.testing.assert_close(got, out.grad, rtol=1e-4, atol=1e-5)


def test_sac_fast_step_runs_every_backward_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = relu.backward

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(relu, "backward", spy)
    algo = SAC(SACConfig(**SMALL_SAC), OBS, BOX, seed=6)
    for b in _batches(False, 3, size=24):
        algo.update(b)
    assert calls == [1, 1, 1] * 3  # critic, critic input (actor loss) and actor, in each of the 3 updates


def test_cuda_graph_steps_stay_off_without_cuda() -> None:
    """On CPU ``_run_step`` is the plain step: no graph runner is made and results match a run with
    graphs disabled (CUDA graphs themselves are checked on a GPU by benchmarks/gpu_check.py)."""
    import gymnasium as gym
    import numpy as np

    from offrl.algos.cql import CQL, CQLConfig
    from offrl.types import Batch

    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    cfg = CQLConfig(actor_hidden=(8,), critic_hidden=(8,), batch_size=4, n_actions=2)
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        obs=torch.randn(4, 3, generator=g),
        actions=torch.rand(4, 2, generator=g) * 2 - 1,
        rewards=torch.randn(4, generator=g),
        next_obs=torch.randn(4, 3, generator=g),
        terminals=torch.zeros(4),
    )
    on, off = CQL(cfg, obs_space, act_space, seed=0), CQL(cfg, obs_space, act_space, seed=0)
    off.cuda_graphs = False
    if not torch.cuda.is_available():
        assert not graphs.CudaGraphSteps.supported()
    for _ in range(5):
        m_on, m_off = on.update(batch), off.update(batch)
    assert on._graph_steps is None
    assert all(torch.equal(m_on[k], m_off[k]) for k in m_on)
    # optimisers keep their step counters on the host unless the parameters live on a GPU
    assert all(not group["capturable"] for opt in on.optimizers.values() for group in opt.param_groups)


def test_train_cuda_graphs_setting_reaches_the_algorithm(builtin_dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from offrl.data.format import read_raw
    from offrl.train import Trainer, resolve_config

    data = builtin_dataset("builtin/pendulum-mixed")
    space = read_raw(data).action_space
    on = Trainer(
        resolve_config("cql", data, action_space=space, overrides={"train.epochs": 1}), tmp_path / "on"
    )
    off = Trainer(
        resolve_config(
            "cql", data, action_space=space, overrides={"train.epochs": 1, "train.cuda_graphs": False}
        ),
        tmp_path / "off",
    )
    assert on.algo.cuda_graphs and not off.algo.cuda_graphs
