"""Discrete CQL: a double DQN whose Q-network is also pushed down on every action and up on the
data's action, so actions the dataset never shows cannot look better than the ones it does.

Kumar et al. 2020, "Conservative Q-Learning for Offline Reinforcement Learning" (the CQL(H)
penalty ``α · E_s[logsumexp_a Q(s, a) − Q(s, a_data)]`` on a DQN/QR-DQN backbone, α ∈ [1, 4]);
double-Q targets after van Hasselt et al. 2016.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import OfflineAlgorithm, apply_gradients, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import double_q_target, td_loss
from offrl.policies.artifact import TorchPolicy
from offrl.types import Batch


# -- losses (pure) -------------------------------------------------------------------------------
def discrete_cql_penalty(q_all: Tensor, actions: Tensor) -> Tensor:  # (B, A), (B,) int64 -> scalar
    """Mean over the batch of ``logsumexp_a Q(s, a) − Q(s, a_data)``; always ≥ 0."""
    q_data = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)  # (B,)
    return (torch.logsumexp(q_all, dim=1) - q_data).mean()


def cql_loss_and_grad(
    q_all: Tensor, actions: Tensor, target: Tensor, kind: Literal["huber", "mse"], alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # (B, A), (B,), (B,) -> 2 scalars, (B,), (B,), (B, A)
    """TD loss, CQL penalty, Q(s, a_data), max_a Q(s, a) and the gradient of ``td + alpha · penalty``
    w.r.t. ``q_all``.

    The penalty's gradient is (softmax(Q) − onehot(a_data))/B; the TD loss's reaches Q(s, a_data) only:
    clamp(δ, −1, 1)/B for Huber (δ = 1), 2δ/B for the squared error. Written out in elementary ops:
    torch's softmax, logsumexp and smooth-L1 kernels cost several times more on a few actions.
    """
    batch = q_all.shape[0]
    idx = actions.unsqueeze(1)
    q_data = q_all.gather(1, idx).squeeze(1)
    delta = q_data - target
    if kind == "huber":
        g_data = delta.clamp(-1.0, 1.0)  # Huber(δ) = c·(δ − c/2) with c = clamp(δ, −1, 1)
        td = torch.dot(g_data, torch.add(delta, g_data, alpha=-0.5)) / batch
    else:
        td = torch.dot(delta, delta) / batch
        g_data = delta.mul_(2.0)
    top = q_all.amax(dim=1, keepdim=True)
    grad = (q_all - top).exp_()
    total = grad.sum(dim=1, keepdim=True)
    grad.div_(total).mul_(alpha / batch)  # alpha · softmax(Q) / B
    penalty = (total.log_().add_(top).squeeze(1) - q_data).mean()  # logsumexp − Q(s, a_data)
    grad.scatter_add_(1, idx, g_data.sub_(alpha).div_(batch).unsqueeze(1))
    return td, penalty, q_data, top.squeeze(1), grad


def discrete_cql_grads(
    obs: Tensor,  # (B, obs_dim)
    next_obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B,) int64
    rewards: Tensor,  # (B,), already scaled
    terminals: Tensor,  # (B,)
    target_weights: list[Tensor],
    target_biases: list[Tensor],
    gamma: float,
    kind: Literal["huber", "mse"],
    alpha: float,
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of ``td + alpha · penalty`` w.r.t. the Q-network's parameters: the
    hand-written step, a function of tensors only so that it compiles (see :func:`nets.run_hand_step`).

    The online network sees s and s′ in one forward (gradient only from the s rows); the target
    network's forward keeps no tape.
    """
    b = obs.shape[0]
    q_both, tape = nets.mlp_train_forward(weights, biases, torch.cat([obs, next_obs]), dtype, b)
    q_all, next_q_online = q_both[:b], q_both[b:]
    next_q_target = nets.mlp_train_forward(target_weights, target_biases, next_obs, dtype, 0)[0]
    target = double_q_target(rewards, terminals, next_q_online, next_q_target, gamma)
    td, penalty, q_data, q_max, grad = cql_loss_and_grad(q_all, actions, target, kind, alpha)
    metrics = {
        "loss": torch.add(td, penalty, alpha=alpha) if alpha != 0 else td,
        "td_loss": td,
        "cql_penalty": penalty,
        "q_data_mean": q_data.mean(),
        "q_max_mean": q_max.mean(),
    }
    return metrics, nets.mlp_backward(weights, tape, grad, out)


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiscreteCQLConfig:
    """Defaults follow the CQL paper's discrete setting on a double-DQN backbone, adapted to
    low-dimensional observations (MLP instead of a conv net, Adam 3e-4 instead of Atari's 6.25e-5)."""

    hidden: tuple[int, ...] = option(
        (256, 256), "hidden layer sizes of the Q-network MLP", low=1, nonempty=True
    )
    lr: float = option(
        3e-4,
        "Adam learning rate (d3rlpy's Atari DiscreteCQL uses 6.25e-5; 3e-4 is the usual choice for low-dim tasks)",
        low=0.0,
        low_open=True,
    )
    batch_size: int = option(256, "transitions per gradient step", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    cql_alpha: float = option(
        1.0,
        "weight α of the conservative penalty logsumexp_a Q − Q(s, a_data) (published range 1–4; 0 gives double DQN)",
        low=0.0,
    )
    target_update: Literal["soft", "hard"] = option(
        "hard",
        "target network update: 'hard' copies every target_update_interval steps, 'soft' is Polyak with tau",
    )
    target_update_interval: int = option(
        1000, "gradient steps between hard target copies (target_update='hard')", low=1
    )
    tau: float = option(
        5e-3, "Polyak rate of the soft target update (target_update='soft')", low=0.0, high=1.0, low_open=True
    )
    loss: Literal["huber", "mse"] = option("huber", "TD loss: 'huber' (δ = 1, as in DQN) or 'mse'")
    max_grad_norm: float | None = option(
        10.0, "clip the Q-network's gradient norm to this (none: no clipping)", low=0.0, low_open=True
    )
    reward_scale: float = option(1.0, "multiply rewards by this before the TD target")
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of the hidden layers in update: 'bf16' runs them in bfloat16 (fast on CPUs with "
        "AMX/AVX-512 BF16) with float32 master weights, output layer, Q-values and losses",
    )
    compile: Literal["default", "max-autotune-no-cudagraphs"] | None = option(
        None,
        "torch.compile mode of the update step (none: eager). On CPU it compiles the hand-written step of "
        "relu networks, which inductor fuses into one graph (bf16, one thread: ~1.2-1.3x the eager steps/s; "
        "benchmarks/README.md); elsewhere the autograd step. Needs a C++ compiler on CPU and takes seconds "
        "on first use; a frame that fails to compile runs eagerly",
    )
    normalize_obs: bool = option(True, "standardise observations with the dataset's mean and std")

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "cql_alpha": self.cql_alpha >= 0,
            "target_update_interval": self.target_update_interval >= 1,
            "tau": 0.0 < self.tau <= 1.0,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "hidden": len(self.hidden) > 0 and all(h >= 1 for h in self.hidden),
        }
        validate(self, "cql (discrete)", checks)


# -- algorithm -----------------------------------------------------------------------------------
@register
class DiscreteCQL(OfflineAlgorithm):
    """Double DQN + the CQL(H) penalty. Acts greedily on Q (policy kind ``q_greedy``)."""

    name = "cql"
    discrete = True
    Config = DiscreteCQLConfig
    cuda_graph_safe = True

    def build(self) -> None:
        q = nets.DiscreteHead(self.obs_dim, self.act_dim, self.config.hidden)
        self.nets["q"] = q
        self.nets["q_target"] = nets.freeze(copy.deepcopy(q))
        self.optimize("q", self.q, lr=self.config.lr)
        self._train_step = nets.compiled(self._step, self.config.compile)
        # plain relu Q-networks train through the hand-written passes (same numbers, fewer ops)
        self._layers = nets.relu_linears(self.q.net)
        self._target_layers = nets.relu_linears(self.q_target.net)
        self._hand_grads = nets.compiled(discrete_cql_grads, self.config.compile)

    @property
    def q(self) -> nets.DiscreteHead:
        return self.nets["q"]  # type: ignore[return-value]

    @property
    def q_target(self) -> nets.DiscreteHead:
        return self.nets["q_target"]  # type: ignore[return-value]

    def target_networks(self) -> tuple[nn.Module, ...]:
        return (self.q_target,)

    def policy(self) -> TorchPolicy:
        return self._policy("q_greedy", self.q, self.config.hidden)

    def _losses(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TD loss, CQL penalty (unweighted), Q(s, ·) (B, A) and Q(s, a_data) (B,)."""
        cfg = self.config
        with torch.no_grad():
            # The online net picks a′ (double Q); it runs without a graph, so no extra backward work.
            next_q_online = self.q(batch.next_obs)  # (B, A)
            next_q_target = self.q_target(batch.next_obs)  # (B, A)
            target = double_q_target(
                batch.rewards * cfg.reward_scale, batch.terminals, next_q_online, next_q_target, cfg.gamma
            )
        q_all = self.q(batch.obs)  # (B, A)
        q_data = q_all.gather(1, batch.actions.unsqueeze(1)).squeeze(1)  # (B,)
        return td_loss(q_data, target, cfg.loss), discrete_cql_penalty(q_all, batch.actions), q_all, q_data

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """The minimised terms with their graphs: loss = td_loss + cql_alpha · cql_penalty."""
        with nets.compute_precision(self.config.precision):
            td, penalty, _, _ = self._losses(batch)
        return {"td_loss": td, "cql_penalty": penalty}

    def update(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        with nets.compute_precision(cfg.precision):
            if (
                self._layers is not None
                and self._target_layers is not None
                and nets.hand_step_applies(cfg.compile, self.device)
            ):
                metrics = self._run_step(self._hand_step, batch, self._layers, self._target_layers)
            else:
                metrics = self._run_step(self._train_step, batch)
        self.num_updates += 1  # host-side counter: the interval check below needs no device sync
        if cfg.target_update == "hard" and self.num_updates % cfg.target_update_interval == 0:
            nets.hard_update(self.q_target, self.q)
        return metrics

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """Losses, the gradient step and a soft target update (host-side counters stay outside: it may be compiled)."""
        cfg = self.config
        td, penalty, q_all, q_data = self._losses(batch)
        loss = td + cfg.cql_alpha * penalty if cfg.cql_alpha != 0 else td
        step(self.optimizers["q"], loss, self.q.parameters(), cfg.max_grad_norm)
        if cfg.target_update == "soft":
            nets.soft_update(self.q_target, self.q, cfg.tau)
        return {
            "loss": loss.detach(),
            "td_loss": td.detach(),
            "cql_penalty": penalty.detach(),
            "q_data_mean": q_data.detach().mean(),
            "q_max_mean": q_all.detach().amax(dim=1).mean(),
        }

    def _hand_step(
        self, batch: Batch, layers: list[nn.Linear], target_layers: list[nn.Linear]
    ) -> dict[str, Tensor]:
        """:meth:`_step` through the hand-written passes (:func:`discrete_cql_grads`)."""
        cfg = self.config
        rewards = batch.rewards * cfg.reward_scale if cfg.reward_scale != 1.0 else batch.rewards
        target_weights, target_biases = nets.layer_params(target_layers)
        metrics = nets.run_hand_step(
            self._hand_grads,
            layers,
            batch.obs,
            batch.next_obs,
            batch.actions,
            rewards,
            batch.terminals,
            target_weights,
            target_biases,
            cfg.gamma,
            cfg.loss,
            cfg.cql_alpha,
            in_place=cfg.compile is None,
        )
        apply_gradients(self.optimizers["q"], cfg.max_grad_norm)
        if cfg.target_update == "soft":
            nets.soft_update(self.q_target, self.q, cfg.tau)
        return metrics
