"""Shared network modules: MLP builder, vectorised ensembles, policy heads, target updates.

Everything numeric that more than one algorithm needs lives here, once, as plain autograd modules.
Relu ensembles and the MLP heads have a ``kernel`` slot through which the speed layer
(:mod:`offrl.fast`) runs the same function faster; empty, the modules compute it with torch ops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offrl.fast.packing import packed_draw, packed_lerp_

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}
# a faster ``seq(x)`` of an MLP head, or of a relu ensemble on (state or None, rest) (None: not here)
HeadKernel = Callable[[nn.Sequential, Tensor], Tensor]
EnsembleKernel = Callable[["EnsembleMLP", Tensor | None, Tensor], Tensor | None]


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int],
    activation: str = "relu",
    output_activation: str | None = None,
) -> nn.Sequential:
    """``in_dim → hidden… → out_dim`` with ``activation`` between layers."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(dims[-1], out_dim))
    if output_activation is not None:
        layers.append(ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul.

    Input ``(E, B, in)`` → output ``(E, B, out)``. Each member is initialised like ``nn.Linear``.
    """

    def __init__(self, members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.members, self.in_dim, self.out_dim = members, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """Layer normalisation over the features of ``(E, B, D)``, with a gain and bias per member."""

    def __init__(self, members: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class EnsembleMLP(nn.Module):
    """``E`` MLPs with identical shapes evaluated together (no Python loop over members).

    ``forward`` takes ``(B, in)`` (shared by all members) or ``(E, B, in)`` and returns ``(E, B, out)``.
    ``layer_norm`` normalises every hidden layer's output before its activation (RLPD's critics).
    """

    def __init__(
        self,
        members: int,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        layer_norm: bool = False,
    ):
        super().__init__()
        self.members = members
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(EnsembleLayerNorm(members, d) for d in hidden) if layer_norm else None
        self.activation = ACTIVATIONS[activation]()
        # relu between at least two layers, nothing else: what the speed layer's kernels compute
        self.relu_hidden = activation == "relu" and len(dims) > 2 and not layer_norm
        self.width = max(dims[1:])
        self.kernel: EnsembleKernel | None = None  # set by offrl.fast for relu ensembles

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None and x.dim() == 2:
            out = self.kernel(self, None, x)
            if out is not None:
                return out
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = x.relu_() if self.relu_hidden else self.activation(x)
        return x

    def forward_split(self, state: Tensor, rest: Tensor) -> Tensor:
        """The MLP on ``[state repeated M times | rest]``: (B, Ds), (B·M, Da) -> (E, B·M, out); a kernel
        may project each state once in the first layer instead of once per row."""
        if self.kernel is not None:
            out = self.kernel(self, state, rest)
            if out is not None:
                return out
        m = rest.shape[0] // state.shape[0]
        return self(torch.cat([state.repeat_interleave(m, 0), rest], dim=-1))


class QEnsemble(nn.Module):
    """``E`` critics Q(s, a) → ``(E, B)``, evaluated as one batched network."""

    def __init__(
        self,
        members: int,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        layer_norm: bool = False,
    ):
        super().__init__()
        self.net = EnsembleMLP(members, obs_dim + act_dim, 1, hidden, activation, layer_norm)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        # obs (B, obs_dim) or (E, B, obs_dim); actions likewise → (E, B)
        if obs.dim() == actions.dim() == 2:
            return self.net.forward_split(obs, actions).squeeze(-1)
        if obs.dim() != actions.dim():
            if obs.dim() == 2:
                obs = obs.unsqueeze(0).expand(actions.shape[0], -1, -1)
            else:
                actions = actions.unsqueeze(0).expand(obs.shape[0], -1, -1)
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def q_sampled(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Q at M actions per state: (B, obs_dim), (B, M, act_dim) -> (E, B, M).

        The observation part of the first layer (W·[s; a] = W_s·s + W_a·a) is computed once per
        state and broadcast over its M actions.
        """
        batch, m = actions.shape[0], actions.shape[1]
        q = self.net.forward_split(obs, actions.reshape(batch * m, -1))  # (E, B·M, 1)
        return q.view(-1, batch, m)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def tanh_log_det_jacobian(pre_tanh: Tensor) -> Tensor:
    """log |d tanh(u)/du| = log(1 - tanh(u)^2), computed stably as 2·(log 2 − u − softplus(−2u))."""
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


def gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Sum over the last axis of the diagonal Gaussian log-density."""
    z = (u - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class TanhGaussianActor(nn.Module):
    """A Gaussian in pre-tanh space squashed into (−1, 1): samples already lie in the bounds.

    ``sample`` returns actions with exact log-probabilities (tanh Jacobian included);
    ``mode`` is tanh of the mean.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim, 2 * act_dim, hidden, activation)
        self.kernel: HeadKernel | None = None  # set by offrl.fast within low-precision update steps

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(obs) if self.kernel is None else self.kernel(self.net, obs)
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(
        self, obs: Tensor, generator: torch.Generator | None = None, std_scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised sample and its log-probability: ``(…, act_dim)``, ``(…)``. ``std_scale``
        samples a narrower (< 1) or wider Gaussian than the learned one, with its own exact density."""
        mean, log_std = self(obs)
        if std_scale != 1.0:
            log_std = log_std + math.log(std_scale)
        noise = randn(mean.shape, generator, mean.device, mean.dtype)
        u = mean + noise * log_std.exp()
        log_prob = gaussian_log_prob(u, mean, log_std) - tanh_log_det_jacobian(u).sum(-1)
        return torch.tanh(u), log_prob

    def mode(self, obs: Tensor) -> Tensor:
        return torch.tanh(self(obs)[0])

    def log_prob(self, obs: Tensor, actions: Tensor, eps: float = 1e-6, std_scale: float = 1.0) -> Tensor:
        """Log-density of given actions in (−1, 1) (clamped by ``eps`` away from ±1)."""
        mean, log_std = self(obs)
        if std_scale != 1.0:
            log_std = log_std + math.log(std_scale)
        a = actions.clamp(-1.0 + eps, 1.0 - eps)
        u = torch.atanh(a)
        return gaussian_log_prob(u, mean, log_std) - tanh_log_det_jacobian(u).sum(-1)


class DeterministicActor(nn.Module):
    """obs → tanh-squashed action in (−1, 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, activation, output_activation="tanh")
        self.kernel: HeadKernel | None = None  # set by offrl.fast within low-precision update steps

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs) if self.kernel is None else self.kernel(self.net, obs)


class DiscreteHead(nn.Module):
    """obs → one score per action: logits for a categorical policy, or Q-values."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, hidden, activation)
        self.kernel: HeadKernel | None = None  # set by offrl.fast within low-precision update steps

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs) if self.kernel is None else self.kernel(self.net, obs)


class LearnedScalar(nn.Module):
    """One scalar parameter ``value`` (learnable or fixed), a module so that it is saved with the networks
    (SAC's and CQL's log α, CQL's log α')."""

    def __init__(self, value: float, learn: bool = True) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)), requires_grad=learn)

    def forward(self) -> Tensor:
        return self.value


def call_frozen(module: nn.Module, *args: Tensor) -> Tensor:
    """``module(*args)`` with its parameters as constants: the gradient reaches the inputs (e.g. an actor's
    actions through the critics), never the module's weights, and the backward builds none for them."""
    frozen = {k: v.detach() for k, v in module.named_parameters()}
    out: Tensor = torch.func.functional_call(module, frozen, args)
    return out


def randn(
    shape: Sequence[int], generator: torch.Generator | None, device: Any, dtype: torch.dtype | None = None
) -> Tensor:
    """Standard normal draws from ``generator``: the one way algorithms draw noise, so that a packed step
    (:mod:`offrl.fast.packing`) can give each member its own generator's draws."""
    packed = packed_draw(torch.randn, shape, generator, device, dtype)
    return (
        packed if packed is not None else torch.randn(shape, generator=generator, device=device, dtype=dtype)
    )


def rand(
    shape: Sequence[int], generator: torch.Generator | None, device: Any, dtype: torch.dtype | None = None
) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` (see :func:`randn`)."""
    packed = packed_draw(torch.rand, shape, generator, device, dtype)
    return (
        packed if packed is not None else torch.rand(shape, generator=generator, device=device, dtype=dtype)
    )


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``target ← (1 − τ)·target + τ·source`` as one fused foreach op."""
    tgt: list[Tensor] = list(target.parameters())
    src: list[Tensor] = list(source.parameters())
    if not packed_lerp_(tgt, src, tau):  # inside a packed step, it runs on the stacked parameters
        torch._foreach_lerp_(tgt, src, tau)


@torch.no_grad()
def hard_update(target: nn.Module, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


def freeze(module: nn.Module) -> nn.Module:
    """Mark a (target) network as not trainable, so no gradient can reach it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
