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
from offrl.algos.base import Algorithm, step
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


# -- algorithm ---------------------------------------------------------------------------------------
@register
class BC(Algorithm):
    """Behaviour cloning: a deterministic tanh policy (MSE) or a tanh-Gaussian one (likelihood).

    For Discrete actions (:class:`DiscreteBC`), a categorical policy (cross-entropy) that acts by argmax
    when deterministic: only the network and the loss differ between the two."""

    name: ClassVar[str] = "bc"
    discrete: ClassVar[bool] = False
    cuda_graph_safe: ClassVar[bool] = True
    compile_safe: ClassVar[bool] = True
    Config: ClassVar[type] = BCConfig
    config: BCConfig

    def build(self) -> None:
        cfg = self.config
        actor: torch.nn.Module
        if self.discrete:
            if cfg.policy != "deterministic":
                raise ConfigError(
                    f"bc: policy={cfg.policy!r} applies to continuous actions only; discrete BC is always a "
                    f"categorical policy (action space {self.action_space})"
                )
            actor = nets.DiscreteHead(self.obs_dim, self.act_dim, cfg.hidden)
        elif cfg.policy == "gaussian":
            actor = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.hidden)
        else:
            actor = nets.DeterministicActor(self.obs_dim, self.act_dim, cfg.hidden)
        self.nets["actor"] = actor
        lr = cfg.lr if cfg.lr is not None else DISCRETE_LR if self.discrete else CONTINUOUS_LR
        self.optimize("actor", actor, lr=lr, weight_decay=cfg.weight_decay)

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        actor = self.nets["actor"]
        extra: dict[str, Tensor] = {}
        if self.discrete:
            logits = actor(batch.obs)  # (B, N)
            loss = bc_cross_entropy_loss(logits, batch.actions)
            with torch.no_grad():
                extra["accuracy"] = (logits.argmax(-1) == batch.actions).float().mean()
        elif self.config.policy == "gaussian":
            loss = bc_nll_loss(actor.log_prob(batch.obs, batch.actions, ACTION_EPS))  # type: ignore[operator]
        else:
            loss = bc_mse_loss(actor(batch.obs), batch.actions)
        step(self.optimizers["actor"], loss, actor.parameters(), self.config.max_grad_norm)
        return {"loss": loss.detach(), **extra}

    def policy(self) -> TorchPolicy:
        if self.discrete:
            kind = "categorical"
        else:
            kind = "tanh_gaussian" if self.config.policy == "gaussian" else "deterministic"
        return self._policy(kind, self.nets["actor"], self.config.hidden)


@register
class DiscreteBC(BC):
    """Behaviour cloning with a categorical policy (cross-entropy); acts by argmax when deterministic."""

    discrete: ClassVar[bool] = True
