"""Implicit Q-Learning for discrete actions (Kostrikov et al. 2021, applied to a categorical policy).

The update is the continuous variant's (:class:`offrl.algos.iql.IQL`: value expectile → critic TD
on V(s′) → advantage-weighted actor → Polyak target update) with the same losses; only the
networks differ: the critics are an ensemble of Q(s, ·) heads (one output per action, read at the
dataset's action) and the actor is a categorical policy over logits, whose AWR loss is
``−w · log_softmax(logits)[a_data]``. Acting greedily takes the most likely action.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offrl import nets
from offrl.algos.iql import IQL, IQLConfig
from offrl.algos.registry import register
from offrl.policies.artifact import TorchPolicy


def gather_actions(values: Tensor, actions: Tensor) -> Tensor:  # (..., B, A), (B,) int64 -> (..., B)
    """Each row's entry at its action index, for every leading (ensemble) index."""
    index = actions.view(*([1] * (values.dim() - 2)), -1, 1).expand(*values.shape[:-1], 1)
    return values.gather(-1, index).squeeze(-1)


@register
class DiscreteIQL(IQL):
    """IQL with an ensemble of Q(s, ·) heads, a state-value net and a categorical actor."""

    name: ClassVar[str] = "iql"
    discrete: ClassVar[bool] = True
    Config: ClassVar[type] = IQLConfig

    def _build_critic(self) -> nn.Module:
        return nets.EnsembleMLP(self.config.n_critics, self.obs_dim, self.act_dim, self.config.hidden)

    def _build_actor(self) -> nn.Module:
        return nets.DiscreteHead(self.obs_dim, self.act_dim, self.config.hidden)

    def q_data(self, critic: nn.Module, obs: Tensor, actions: Tensor) -> Tensor:
        """Each critic's Q at the dataset actions: (B, obs_dim), (B,) int64 -> (E, B)."""
        return gather_actions(critic(obs), actions)  # (E, B, A) -> (E, B)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log softmax(logits)[a_data] with its graph: (B, obs_dim), (B,) int64 -> (B,)."""
        return gather_actions(F.log_softmax(self.actor(obs), dim=-1), actions)

    def policy(self) -> TorchPolicy:
        return self._policy("categorical", self.actor, self.config.hidden)

    @torch.no_grad()
    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        probs = F.softmax(self.actor(obs), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
