"""Discrete CQL: a double DQN whose Q-network is also pushed down on every action and up on the
data's action, so actions the dataset never shows cannot look better than the ones it does.

Kumar et al. 2020, "Conservative Q-Learning for Offline Reinforcement Learning" (the CQL(H)
penalty ``α · E_s[logsumexp_a Q(s, a) − Q(s, a_data)]`` on a DQN/QR-DQN backbone, α ∈ [1, 4]);
double-Q targets after van Hasselt et al. 2016.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from offrl.algos.base import DiscreteQ, step
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
    normalize_obs: bool = option(True, "standardise observations with the dataset's mean and std")

    def __post_init__(self) -> None:
        validate(self, "cql (discrete)")  # the declared ranges and choices of every field


# -- algorithm -----------------------------------------------------------------------------------
EPSILON = 0.05  # ε-greedy rate of online fine-tuning (DQN's final rate in SB3's and CleanRL's defaults)


@register
class DiscreteCQL(DiscreteQ):
    """Double DQN + the CQL(H) penalty. Acts greedily on Q (policy kind ``q_greedy``)."""

    name = "cql"
    discrete = True
    online_form = "double DQN: the penalty is off online (cql_alpha 0), ε-greedy exploration (ε 0.05)"
    Config = DiscreteCQLConfig
    cuda_graph_safe = True
    compile_safe = True

    def build(self) -> None:
        self.build_q(self.config.hidden)
        self.optimize("q", self.q, lr=self.config.lr)

    def policy(self) -> TorchPolicy:
        return self._policy("q_greedy", self.q, self.config.hidden)

    @torch.no_grad()
    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        epsilon = EPSILON if exploration is None else exploration
        greedy = self.q(obs).argmax(-1)
        n = obs.shape[0]
        random = torch.randint(self.act_dim, (n,), generator=self.generator, device=obs.device)
        explore = torch.rand(n, generator=self.generator, device=obs.device) < epsilon
        return torch.where(explore, random, greedy)

    def online_settings(self, progress: float) -> dict[str, float]:
        return {"cql_alpha": 0.0}

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
        td, penalty, _, _ = self._losses(batch)
        return {"td_loss": td, "cql_penalty": penalty}

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """Losses, the gradient step and a soft target update; device-only (it may be compiled), the hard copy
        is in ``after_update``."""
        cfg = self.config
        td, penalty, q_all, q_data = self._losses(batch)
        loss = td + cfg.cql_alpha * penalty if cfg.cql_alpha != 0 else td
        step(self.optimizers["q"], loss, self.q.parameters(), cfg.max_grad_norm)
        self.soft_update_target()
        return {
            "loss": loss.detach(),
            "td_loss": td.detach(),
            "cql_penalty": penalty.detach(),
            "q_data_mean": q_data.detach().mean(),
            "q_max_mean": q_all.detach().amax(dim=1).mean(),
        }
