"""Calibrated Q-Learning (Nakamoto et al. 2023, "Cal-QL"): CQL whose conservative penalty never pushes the
Q-values of the policy's actions below a reference value of the state, so the offline critic stays on the
scale of real returns and online fine-tuning does not start by unlearning it.

The one change to CQL (:mod:`offrl.algos.cql`): inside the penalty's logsumexp, the Q-values of the
policy-sampled actions (at s and at s′, both evaluated at s) become max(Q, V_ref(s)); the uniform samples
and the push-up on the dataset's actions are unchanged. V_ref is the row's Monte-Carlo discounted
return-to-go in the dataset (:func:`offrl.losses.return_to_go`), a lower bound of the behaviour policy's
value. An episode cut by a time limit has rewards after its last row that the data does not hold; they
are bounded below by γ^k·r_min/(1 − γ), with r_min the dataset's smallest reward, so V_ref stays a lower
bound where rewards can be negative (Pendulum). Cal-QL's paper gives no discrete form, and offrl has none.

Every other setting is CQL's, with CQL's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from offrl.algos.cql import CQL, CQLConfig
from offrl.algos.registry import register
from offrl.config import validate
from offrl.data.dataset import TransitionDataset
from offrl.errors import ConfigError
from offrl.losses import return_to_go
from offrl.types import Batch


@dataclass(frozen=True)
class CalQLConfig(CQLConfig):
    """CQL's settings and defaults (the calibration itself has none)."""

    def __post_init__(self) -> None:
        validate(self, "calql")


# -- losses (pure) -------------------------------------------------------------------------------
def calibrated(q_sampled: Tensor, reference: Tensor, n_uniform: int) -> Tensor:
    """Q-values of sampled actions with the policy's bounded below by the reference value of their state:
    (E, B, M) with the first ``n_uniform`` of M uniform, (B,) -> (E, B, M)."""
    uniform, policy = q_sampled[..., :n_uniform], q_sampled[..., n_uniform:]
    return torch.cat([uniform, torch.maximum(policy, reference[:, None])], dim=-1)


@register
class CalQL(CQL):
    """CQL with the policy's penalised Q-values bounded below by the data's Monte-Carlo returns."""

    name: ClassVar[str] = "calql"
    needs_returns: ClassVar[bool] = True
    online_form: ClassVar[str | None] = (
        "Cal-QL, the same losses; online rows get their returns when their episode ends"
    )
    Config: ClassVar[type] = CalQLConfig
    config: CalQLConfig

    def penalised_values(self, q_sampled: Tensor, batch: Batch) -> Tensor:
        if batch.returns is None:
            raise ConfigError(
                "calql: batches need the rows' returns-to-go (Batch.returns); train through the offline "
                "trainer, or prepare the dataset with CalQL.prepare_dataset"
            )
        return calibrated(q_sampled, batch.returns, self.config.n_actions)

    def prepare_dataset(self, dataset: TransitionDataset) -> TransitionDataset:
        """CQL's learning-unit view, with each row's discounted return-to-go attached as ``returns``."""
        prepared = super().prepare_dataset(dataset)
        floor = float(dataset.rewards.min()) if len(dataset) else 0.0
        returns, _ = return_to_go(
            dataset.rewards, dataset.terminals, dataset.episode_ends, self.config.gamma, reward_floor=floor
        )
        return prepared.with_tensors(returns=returns.to(dataset.device))
