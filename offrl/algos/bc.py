"""Behaviour cloning: supervised regression (or classification) of the dataset's actions.

Continuous BC follows CORL's ``any_percent_bc`` defaults (MLP 2×256 relu, tanh output, MSE, Adam
3e-4, batch 256); ``policy="gaussian"`` instead fits a tanh-squashed Gaussian by maximum likelihood
of the dataset actions. Discrete BC is a categorical policy trained with cross-entropy (Adam 1e-3,
as in the discrete BC baselines of d3rlpy and of Fujimoto et al. 2019, "Benchmarking Batch Deep RL").
Both variants share one config and the name ``bc``; the dataset's action space picks the variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from offrl import nets
from offrl.algos.base import OfflineAlgorithm, apply_gradients, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.errors import ConfigError
from offrl.policies.artifact import TorchPolicy
from offrl.types import Batch

CONTINUOUS_LR = 3e-4  # CORL any_percent_bc
DISCRETE_LR = 1e-3
# Dataset actions on the bounds (±1) have infinite pre-tanh values; the likelihood is taken just inside.
ACTION_EPS = 1e-6


@dataclass(frozen=True)
class BCConfig:
    batch_size: int = option(256, "transitions per gradient step (CORL: 256)", low=1)
    hidden: tuple[int, ...] = option(
        (256, 256), "hidden layer widths of the policy MLP, relu (CORL: 256, 256)", low=1, nonempty=True
    )
    lr: float | None = option(
        None,
        "Adam learning rate; none means 3e-4 for continuous actions (CORL) and 1e-3 for discrete actions",
        low=0.0,
        low_open=True,
    )
    policy: Literal["deterministic", "gaussian"] = option(
        "deterministic",
        "continuous only: 'deterministic' regresses tanh(MLP) on the actions with MSE (CORL); "
        "'gaussian' fits a tanh-squashed Gaussian by log-likelihood. Discrete BC is always categorical "
        "(and rejects 'gaussian')",
    )
    weight_decay: float = option(0.0, "L2 penalty added by Adam (0: none, as in CORL)", low=0.0)
    normalize_obs: bool = option(True, "standardise observations with dataset statistics (CORL: true)")
    max_grad_norm: float | None = option(
        None,
        "clip the policy gradient's global norm to this value (none: no clipping)",
        low=0.0,
        low_open=True,
    )
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of the hidden layers in update: 'bf16' runs them in bfloat16 (fast on CPUs with "
        "AMX/AVX-512 BF16) with float32 master weights, output layer and loss",
    )
    compile: Literal["default", "max-autotune-no-cudagraphs"] | None = option(
        None,
        "torch.compile mode of the update step (none: eager). On CPU it compiles the hand-written step of "
        "relu networks, which inductor fuses into one graph (bf16, one thread: ~1.1x the eager steps/s; "
        "benchmarks/README.md); elsewhere the autograd step. Needs a C++ compiler on CPU and takes seconds "
        "on first use; a frame that fails to compile runs eagerly",
    )

    def __post_init__(self) -> None:
        validate(self, "bc")


# -- losses ------------------------------------------------------------------------------------------
def bc_mse_loss(pred: Tensor, target: Tensor) -> Tensor:  # (B, A), (B, A) -> scalar
    """Mean squared error over every action component."""
    return F.mse_loss(pred, target)


def bc_nll_loss(log_prob: Tensor) -> Tensor:  # (B,) -> scalar
    """Negative mean log-likelihood of the dataset actions."""
    return -log_prob.mean()


def bc_cross_entropy_loss(logits: Tensor, actions: Tensor) -> Tensor:  # (B, N), (B,) int64 -> scalar
    """Mean cross-entropy of the dataset actions under softmax(logits)."""
    return F.cross_entropy(logits, actions)


def tanh_mse_loss_and_grad(pre: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:  # (B, A), (B, A)
    """:func:`bc_mse_loss` of ``tanh(pre)`` and its gradient w.r.t. ``pre``: 2·(a − target)·(1 − a²)/(B·A)."""
    a = torch.tanh(pre)
    diff = a - target
    grad = torch.addcmul(diff, diff, a.square_(), value=-1.0).mul_(2.0 / diff.numel())
    return diff.square_().mean(), grad


def cross_entropy_loss_and_grad(logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:  # (B, N), (B,)
    """:func:`bc_cross_entropy_loss` and its gradient w.r.t. ``logits``: (softmax − onehot(actions))/B."""
    idx = actions.unsqueeze(1)
    grad = torch.softmax(logits, dim=1)
    grad.scatter_add_(1, idx, torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return bc_cross_entropy_loss(logits, actions), grad.div_(logits.shape[0])


# -- hand-written steps: functions of tensors only, so that they compile once for every instance ------
def deterministic_bc_grads(
    obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B, A)
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of :func:`bc_mse_loss` of ``tanh(MLP(obs))`` (see :func:`nets.run_hand_step`)."""
    pre, tape = nets.mlp_train_forward(weights, biases, obs, dtype)
    loss, grad = tanh_mse_loss_and_grad(pre, actions)
    return {"loss": loss}, nets.mlp_backward(weights, tape, grad, out)


def categorical_bc_grads(
    obs: Tensor,  # (B, obs_dim)
    actions: Tensor,  # (B,) int64
    weights: list[Tensor],
    biases: list[Tensor],
    dtype: torch.dtype,
    out: list[Tensor | None] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Metrics and float32 gradients of :func:`bc_cross_entropy_loss` of the MLP's logits."""
    logits, tape = nets.mlp_train_forward(weights, biases, obs, dtype)  # (B, N)
    loss, grad = cross_entropy_loss_and_grad(logits, actions)
    grads = nets.mlp_backward(weights, tape, grad, out)
    accuracy = (logits.argmax(-1) == actions).float().mean()
    return {"loss": loss, "accuracy": accuracy}, grads


def _lr(config: BCConfig, discrete: bool) -> float:
    if config.lr is not None:
        return config.lr
    return DISCRETE_LR if discrete else CONTINUOUS_LR


# -- algorithms --------------------------------------------------------------------------------------
@register
class ContinuousBC(OfflineAlgorithm):
    """BC for Box actions: a deterministic tanh policy (MSE) or a tanh-Gaussian policy (likelihood)."""

    name: ClassVar[str] = "bc"
    discrete: ClassVar[bool] = False
    cuda_graph_safe: ClassVar[bool] = True
    Config: ClassVar[type] = BCConfig
    config: BCConfig

    def build(self) -> None:
        actor: torch.nn.Module
        if self.config.policy == "gaussian":
            actor = nets.TanhGaussianActor(self.obs_dim, self.act_dim, self.config.hidden)
        else:
            actor = nets.DeterministicActor(self.obs_dim, self.act_dim, self.config.hidden)
        self.nets["actor"] = actor
        self.optimize("actor", actor, lr=_lr(self.config, False), weight_decay=self.config.weight_decay)
        self._train_step = nets.compiled(self._step, self.config.compile)
        # the deterministic policy trains through the hand-written passes (same numbers, fewer ops)
        self._layers = (
            nets.relu_linears(actor.net, torch.nn.Tanh) if self.config.policy == "deterministic" else None
        )
        self._hand_grads = nets.compiled(deterministic_bc_grads, self.config.compile)

    def update(self, batch: Batch) -> dict[str, Tensor]:
        with nets.compute_precision(self.config.precision):
            if self._layers is not None and nets.hand_step_applies(self.config.compile, self.device):
                metrics = self._run_step(self._hand_step, batch, self._layers)
            else:
                metrics = self._run_step(self._train_step, batch)
        self.num_updates += 1
        return metrics

    def _hand_step(self, batch: Batch, layers: list[torch.nn.Linear]) -> dict[str, Tensor]:
        in_place = self.config.compile is None
        metrics = nets.run_hand_step(self._hand_grads, layers, batch.obs, batch.actions, in_place=in_place)
        apply_gradients(self.optimizers["actor"], self.config.max_grad_norm)
        return metrics

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        actor = self.nets["actor"]
        if self.config.policy == "gaussian":
            loss = bc_nll_loss(actor.log_prob(batch.obs, batch.actions, ACTION_EPS))  # type: ignore[operator]
        else:
            loss = bc_mse_loss(actor(batch.obs), batch.actions)
        step(self.optimizers["actor"], loss, actor.parameters(), self.config.max_grad_norm)
        return {"loss": loss.detach()}

    def policy(self) -> TorchPolicy:
        kind = "tanh_gaussian" if self.config.policy == "gaussian" else "deterministic"
        return self._policy(kind, self.nets["actor"], self.config.hidden)


@register
class DiscreteBC(OfflineAlgorithm):
    """BC for Discrete actions: a categorical policy trained with cross-entropy; acts by argmax when deterministic."""

    name: ClassVar[str] = "bc"
    discrete: ClassVar[bool] = True
    cuda_graph_safe: ClassVar[bool] = True
    Config: ClassVar[type] = BCConfig
    config: BCConfig

    def build(self) -> None:
        if self.config.policy != "deterministic":
            raise ConfigError(
                f"bc: policy={self.config.policy!r} applies to continuous actions only; discrete BC is always a "
                f"categorical policy (action space {self.action_space})"
            )
        actor = nets.DiscreteHead(self.obs_dim, self.act_dim, self.config.hidden)
        self.nets["actor"] = actor
        self.optimize("actor", actor, lr=_lr(self.config, True), weight_decay=self.config.weight_decay)
        self._train_step = nets.compiled(self._step, self.config.compile)
        self._layers = nets.relu_linears(actor.net)
        self._hand_grads = nets.compiled(categorical_bc_grads, self.config.compile)

    def update(self, batch: Batch) -> dict[str, Tensor]:
        with nets.compute_precision(self.config.precision):
            if self._layers is not None and nets.hand_step_applies(self.config.compile, self.device):
                metrics = self._run_step(self._hand_step, batch, self._layers)
            else:
                metrics = self._run_step(self._train_step, batch)
        self.num_updates += 1
        return metrics

    def _hand_step(self, batch: Batch, layers: list[torch.nn.Linear]) -> dict[str, Tensor]:
        in_place = self.config.compile is None
        metrics = nets.run_hand_step(self._hand_grads, layers, batch.obs, batch.actions, in_place=in_place)
        apply_gradients(self.optimizers["actor"], self.config.max_grad_norm)
        return metrics

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        actor = self.nets["actor"]
        logits = actor(batch.obs)  # (B, N)
        loss = bc_cross_entropy_loss(logits, batch.actions)
        step(self.optimizers["actor"], loss, actor.parameters(), self.config.max_grad_norm)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == batch.actions).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy}

    def policy(self) -> TorchPolicy:
        return self._policy("categorical", self.nets["actor"], self.config.hidden)
