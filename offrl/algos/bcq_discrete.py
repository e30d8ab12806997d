"""Discrete BCQ: a double DQN that only ever maximises over actions the data makes plausible.

Fujimoto, Conti, Ghavamzadeh & Pineau 2019, "Benchmarking Batch Deep Reinforcement Learning
Algorithms". An imitation head π_bc is fitted to the dataset's actions by cross-entropy; an action
is allowed in state s when π_bc(a|s) / max_a′ π_bc(a′|s) > τ. Acting is the argmax of Q over the
allowed actions, and the TD target picks a′ the same way at s′ (online Q, double-Q style) and
evaluates it with the target network. The Q-network and the imitation head are separate MLPs with
one optimiser (their losses touch disjoint parameters, so one backward pass serves both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from offrl import nets
from offrl.algos.base import DiscreteQ, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import double_q_target, td_loss
from offrl.policies.artifact import TorchPolicy
from offrl.policies.modules import DiscreteBCQPolicyNet, discrete_bcq_mask, masked_q
from offrl.types import Batch

__all__ = [
    "DiscreteBCQ",
    "DiscreteBCQConfig",
    "discrete_bcq_mask",
    "imitation_loss",
]


# -- losses (pure) -------------------------------------------------------------------------------
def imitation_loss(bc_logits: Tensor, actions: Tensor, logit_reg: float) -> Tensor:  # (B, A), (B,) -> scalar
    """Cross-entropy of the data actions plus ``logit_reg`` times the mean squared logit.

    The regulariser keeps the logits from growing without bound, which would make the
    probability ratios of the filter collapse to 0 or 1.
    """
    return F.cross_entropy(bc_logits, actions) + logit_reg * bc_logits.pow(2).mean()


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiscreteBCQConfig:
    """Defaults: threshold, Huber loss, logit regulariser and the 8000-step hard target copy follow
    the authors' discrete-BCQ code (Fujimoto et al. 2019) and d3rlpy's DiscreteBCQ; lr 3e-4 and
    (256, 256) MLPs are the authors' settings for low-dimensional tasks (which copy the target
    softly with τ = 0.005 every step: ``target_update='soft'``)."""

    hidden: tuple[int, ...] = option(
        (256, 256), "hidden layer sizes of the Q-network MLP", low=1, nonempty=True
    )
    bc_hidden: tuple[int, ...] = option(
        (256, 256), "hidden layer sizes of the imitation-head MLP", low=1, nonempty=True
    )
    threshold: float = option(
        0.3,
        "τ: allow actions with π_bc(a|s) / max π_bc(·|s) > τ (0: DQN; towards 1: imitation)",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    lr: float = option(
        3e-4,
        "Adam learning rate of the Q-network and imitation head (paper, low-dim: 3e-4)",
        low=0.0,
        low_open=True,
    )
    batch_size: int = option(256, "transitions per gradient step", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    logit_reg: float = option(
        1e-2, "weight of the mean squared imitation logit (authors' code 1e-2; d3rlpy's beta 0.5)", low=0.0
    )
    target_update: Literal["soft", "hard"] = option(
        "hard",
        "target network update: 'hard' copies every target_update_interval steps, 'soft' is Polyak with tau",
    )
    target_update_interval: int = option(
        8000, "gradient steps between hard target copies (target_update='hard'; paper: 8000)", low=1
    )
    tau: float = option(
        5e-3, "Polyak rate of the soft target update (target_update='soft')", low=0.0, high=1.0, low_open=True
    )
    loss: Literal["huber", "mse"] = option("huber", "TD loss: 'huber' (δ = 1, as in the paper) or 'mse'")
    max_grad_norm: float | None = option(
        None,
        "clip the joint gradient norm of both networks to this (none: no clipping)",
        low=0.0,
        low_open=True,
    )
    normalize_obs: bool = option(True, "standardise observations with the dataset's mean and std")

    def __post_init__(self) -> None:
        validate(self, "bcq (discrete)")  # the declared ranges and choices of every field


# -- algorithm -----------------------------------------------------------------------------------
@register
class DiscreteBCQ(DiscreteQ):
    """Q-learning restricted to plausible actions. Acts with policy kind ``bcq_discrete``."""

    name = "bcq"
    discrete = True
    Config = DiscreteBCQConfig

    def build(self) -> None:
        self.build_q(self.config.hidden)
        self.nets["imitator"] = nets.DiscreteHead(self.obs_dim, self.act_dim, self.config.bc_hidden)
        self.optimize("q", self.q, self.imitator, lr=self.config.lr)

    @property
    def imitator(self) -> nets.DiscreteHead:
        return self.nets["imitator"]  # type: ignore[return-value]

    def policy(self) -> TorchPolicy:
        net = DiscreteBCQPolicyNet(self.q, self.imitator, self.config.threshold)
        policy = self._policy("bcq_discrete", net, self.config.hidden)
        policy.arch.update(bc_hidden=list(self.config.bc_hidden), threshold=self.config.threshold)
        return policy

    def _losses(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TD loss, imitation loss, Q(s, a_data) (B,) and the allowed-action mask at s (B, A)."""
        cfg = self.config
        with torch.no_grad():
            # the online Q and imitator choose a′ among the allowed actions; the target net values it
            next_mask = discrete_bcq_mask(self.imitator(batch.next_obs), cfg.threshold)  # (B, A)
            next_q_online = masked_q(self.q(batch.next_obs), next_mask)  # (B, A)
            target = double_q_target(
                batch.rewards, batch.terminals, next_q_online, self.q_target(batch.next_obs), cfg.gamma
            )
        q_all, bc_logits = self.q(batch.obs), self.imitator(batch.obs)  # (B, A), (B, A)
        q_data = q_all.gather(1, batch.actions.unsqueeze(1)).squeeze(1)  # (B,)
        td = td_loss(q_data, target, cfg.loss)
        bc = imitation_loss(bc_logits, batch.actions, cfg.logit_reg)
        return td, bc, q_data, discrete_bcq_mask(bc_logits.detach(), cfg.threshold)

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """The minimised terms with their graphs: loss = td_loss + imitation_loss (one optimiser)."""
        td, bc, _, _ = self._losses(batch)
        return {"td_loss": td, "imitation_loss": bc}

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """One update on the device (host-side counters stay in :meth:`update`: it may be a CUDA graph)."""
        cfg = self.config
        td, bc, q_data, mask = self._losses(batch)
        loss = td + bc
        params = [*self.q.parameters(), *self.imitator.parameters()] if cfg.max_grad_norm else None
        step(self.optimizers["q"], loss, params, cfg.max_grad_norm)
        self.soft_update_target()
        return {
            "loss": loss.detach(),
            "td_loss": td.detach(),
            "imitation_loss": bc.detach(),
            "q_data_mean": q_data.detach().mean(),
            "allowed_actions": mask.float().sum(1).mean(),
        }
