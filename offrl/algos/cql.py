"""Conservative Q-Learning for continuous actions (Kumar et al. 2020, "CQL(H)"), built on SAC.

The critics learn soft TD targets plus a conservative penalty that pushes Q down on actions the
current policy and a uniform proposal would pick and up on the dataset's actions:

    penalty_e = mean_s [ T · logsumexp_m ((Q_e(s, a_m) − log μ(a_m|s)) / T) − Q_e(s, a_data) ]

with ``a_m`` N uniform actions in [−1, 1]^A, N policy actions at s and N policy actions at s′
(all evaluated at s), ``μ`` their proposal densities (importance weighting). The rest is SAC's:
the TD target, the critics' TD loss and the actor and temperature losses come from ``offrl.losses``.
Defaults follow the locomotion settings of CORL and OfflineRL-Kit (see ``CQLConfig``); like both,
the logsumexp is not corrected by log(3N), which shifts the penalty by a constant and matters only
for the Lagrange gap.

One update, in order: critic step (TD + penalty), [α' step], actor step against the updated
critics, α step, Polyak update of the target critics. Costs are kept down by: one actor pass for
the N draws at s and s′ (the network runs once per state; the TD target reuses the first s′ draw),
one ensemble call for the data actions and all 3N proposals, the TD loss summed over critics (as
CORL), and an actor loss that sees the critic weights as detached constants
(``nets.call_frozen``), so its backward builds no critic weight gradients and the term
can be checked to move the actor only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import GaussianActorCritic
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.fast.packing import backward, clip_grad_norm
from offrl.losses import critic_loss, sac_actor_loss, sac_alpha_loss, td_target
from offrl.types import Batch

ALPHA_PRIME_MAX = 1e6


@dataclass(frozen=True)
class CQLConfig:
    """Defaults reproduce CQL on D4RL locomotion as run by CORL (Tarasov et al. 2022) and OfflineRL-Kit."""

    actor_hidden: tuple[int, ...] = option(
        (256, 256, 256), "actor MLP hidden sizes (CORL: 3×256)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (256, 256, 256), "critic MLP hidden sizes (CORL: 3×256)", low=1, nonempty=True
    )
    n_critics: int = option(2, "critics in the Q-ensemble; targets and the actor use their minimum", low=1)
    critic_lr: float = option(3e-4, "critic Adam learning rate", low=0.0, low_open=True)
    actor_lr: float = option(
        1e-4, "actor Adam learning rate (OfflineRL-Kit 1e-4, CORL 3e-5)", low=0.0, low_open=True
    )
    alpha_lr: float = option(3e-4, "entropy temperature Adam learning rate", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(5e-3, "Polyak rate of the target critics", low=0.0, high=1.0, low_open=True)
    auto_alpha: bool = option(True, "tune the entropy temperature α towards the target entropy")
    init_alpha: float = option(1.0, "initial entropy temperature α (CORL: log α = 0)", low=0.0, low_open=True)
    target_entropy: float | None = option(None, "target policy entropy for α tuning; none: −|A|")
    cql_alpha: float = option(5.0, "conservative penalty weight (OfflineRL-Kit 5, CORL 10)", low=0.0)
    n_actions: int = option(10, "sampled actions per proposal (uniform, π(s), π(s′)) in the penalty", low=1)
    cql_temperature: float = option(1.0, "temperature of the penalty's logsumexp", low=0.0, low_open=True)
    backup_entropy: bool = option(False, "subtract α·log π(a′|s′) in the TD target (CORL: off)")
    max_q_backup: bool = option(False, "TD target takes the max over n_actions policy samples at s′")
    lagrange: bool = option(
        False, "learn the penalty weight α' so the penalty gap approaches target_action_gap"
    )
    target_action_gap: float = option(10.0, "Lagrange target of the penalty gap (logsumexp − Q(s, a_data))")
    alpha_prime_lr: float = option(
        3e-4, "Adam learning rate of log α' (Lagrange variant)", low=0.0, low_open=True
    )
    bc_steps: int = option(
        0, "warm-up updates whose actor loss is the behaviour-cloning log-likelihood", low=0
    )
    normalize_obs: bool = option(True, "normalise observations by dataset mean/std")
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )

    def __post_init__(self) -> None:
        validate(self, "cql")  # the declared ranges and choices of every field


# -- losses (pure) -------------------------------------------------------------------------------
def importance_logsumexp(q_sampled: Tensor, log_density: Tensor, temperature: float) -> Tensor:
    """T·logsumexp over sampled actions of (Q − log density)/T: (E,B,M), (B,M) -> (E,B)."""
    return temperature * torch.logsumexp((q_sampled - log_density) / temperature, dim=-1)


def cql_penalty(q_data: Tensor, q_sampled: Tensor, log_density: Tensor, temperature: float) -> Tensor:
    """Conservative gap per critic: (E,B), (E,B,M), (B,M) -> (E,)."""
    return (importance_logsumexp(q_sampled, log_density, temperature) - q_data).mean(-1)


def alpha_prime_loss(alpha_prime: Tensor, penalty: Tensor, cql_alpha: float, target_gap: float) -> Tensor:
    """Lagrange dual loss: α' grows while the penalty gap exceeds the target: (), (E,) -> ()."""
    return -(alpha_prime * cql_alpha * (penalty.detach() - target_gap)).sum()


def sample_n(
    actor: nets.TanhGaussianActor, obs: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """N draws per row with their log-probabilities: (B, obs_dim) -> (B, N, A), (B, N).

    The draws of ``actor.sample`` on rows repeated N times, but the network runs once per row.
    """
    mean, log_std = (t.unsqueeze(1) for t in actor(obs))  # (B, 1, A)
    noise = nets.randn((obs.shape[0], n, mean.shape[-1]), generator, obs.device)
    u = mean + noise * log_std.exp()
    log_prob = nets.gaussian_log_prob(u, mean, log_std) - nets.tanh_log_det_jacobian(u).sum(-1)
    return torch.tanh(u), log_prob


@register
class CQL(GaussianActorCritic):
    """Continuous CQL(H) with SAC actor, automatic entropy tuning and optional Lagrange weight."""

    name: ClassVar[str] = "cql"
    discrete: ClassVar[bool] = False
    online_form: ClassVar[str | None] = "CQL, the same losses (the documented case of the unlearning dip)"
    # half offline, half online from the first step, as Cal-QL's mixing ratio (CQL alike, for comparison)
    online_offline_ratio: ClassVar[float | None] = 0.5
    cuda_graph_safe: ClassVar[bool] = True
    compile_safe: ClassVar[bool] = True
    Config: ClassVar[type] = CQLConfig
    config: CQLConfig

    def build(self) -> None:
        cfg = self.config
        self.nets["actor"] = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        self.build_critics(cfg.n_critics, cfg.critic_hidden)
        self.nets["log_alpha"] = nets.LearnedScalar(math.log(cfg.init_alpha), learn=cfg.auto_alpha)
        if cfg.lagrange:
            self.nets["log_alpha_prime"] = nets.LearnedScalar(0.0)
        self.target_entropy = -float(self.act_dim) if cfg.target_entropy is None else cfg.target_entropy

        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        self.optimize("actor", self.actor, lr=cfg.actor_lr)
        if cfg.auto_alpha:
            self.optimize("alpha", self.nets["log_alpha"], lr=cfg.alpha_lr)
        if cfg.lagrange:
            self.optimize("alpha_prime", self.nets["log_alpha_prime"], lr=cfg.alpha_prime_lr)

    # -- accessors ---------------------------------------------------------------------------------

    def _alpha_prime(self) -> Tensor:
        return self.nets["log_alpha_prime"]().exp().clamp(0.0, ALPHA_PRIME_MAX)

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def penalty_actions(self, obs: Tensor, next_obs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The penalty's proposal actions and their log-densities, without gradient.

        Returns ``actions`` (B, 3N, A) = [uniform | π(·|s) | π(·|s′)] along axis 1, their
        ``log_density`` (B, 3N), and the π(·|s′) draws again as ``next_actions`` (B, N, A),
        ``next_log_prob`` (B, N): the TD target reuses them (one draw from the current policy
        serves both, saving an actor pass).
        """
        n, batch = self.config.n_actions, obs.shape[0]
        uniform = nets.rand((batch, n, self.act_dim), self.generator, obs.device) * 2.0 - 1.0
        pi, log_pi = sample_n(
            self.actor, torch.cat([obs, next_obs]), n, self.generator
        )  # (2B, N, A), (2B, N)
        log_uniform = torch.full((batch, n), -self.act_dim * math.log(2.0), device=obs.device)
        actions = torch.cat([uniform, pi[:batch], pi[batch:]], dim=1)
        log_density = torch.cat([log_uniform, log_pi[:batch], log_pi[batch:]], dim=1)
        return actions, log_density, pi[batch:], log_pi[batch:]

    def critic_values(self, obs: Tensor, data_actions: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Q at the data actions and at sampled actions, as one ensemble call at s.

        (B, obs_dim), (B, A), (B, M, A) -> q_data (E, B), q_sampled (E, B, M).
        """
        all_actions = torch.cat([data_actions.unsqueeze(1), actions], dim=1)  # (B, 1 + M, A)
        q = self.critic.q_sampled(obs, all_actions)  # the observation projected once per state
        return q[..., 0], q[..., 1:]

    def penalised_values(self, q_sampled: Tensor, batch: Batch) -> Tensor:
        """The sampled actions' Q-values as the penalty's logsumexp sees them: (E, B, 3N) -> (E, B, 3N).
        CQL takes them as they are; Cal-QL (:mod:`offrl.algos.calql`) bounds the policy's from below."""
        return q_sampled

    @torch.no_grad()
    def soft_target(self, batch: Batch, next_actions: Tensor, next_log_prob: Tensor) -> Tensor:
        """TD target from the target critics' minimum at π(·|s′) draws (B, N, A), (B, N) -> (B,).

        Uses the first draw, or with ``max_q_backup`` the draw with the largest minimum.
        """
        cfg = self.config
        next_obs = batch.next_obs.flatten(1)
        if cfg.max_q_backup:
            q_next = self.critic_target.q_sampled(next_obs, next_actions)  # (E, B, N)
            next_v, best = q_next.min(0).values.max(-1)
            next_lp = next_log_prob.gather(1, best.unsqueeze(1)).squeeze(1)
        else:
            next_v = self.critic_target(next_obs, next_actions[:, 0]).min(0).values
            next_lp = next_log_prob[:, 0]
        if cfg.backup_entropy:
            next_v = next_v - self.nets["log_alpha"]().exp() * next_lp
        return td_target(batch.rewards, batch.terminals, next_v, cfg.gamma)

    # -- losses ------------------------------------------------------------------------------------
    def _critic_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cfg = self.config
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        actions, log_density, next_actions, next_log_prob = self.penalty_actions(obs, next_obs)
        target = self.soft_target(batch, next_actions, next_log_prob)
        q_data, q_sampled = self.critic_values(obs, batch.actions, actions)
        q_sampled = self.penalised_values(q_sampled, batch)
        td = critic_loss(q_data, target)  # summed over critics, as CORL
        penalty = cql_penalty(q_data, q_sampled, log_density, cfg.cql_temperature)  # (E,)
        terms: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        if cfg.lagrange:
            alpha_prime = self._alpha_prime()
            conservative = (alpha_prime.detach() * cfg.cql_alpha * (penalty - cfg.target_action_gap)).sum()
            terms["alpha_prime"] = alpha_prime_loss(
                alpha_prime, penalty, cfg.cql_alpha, cfg.target_action_gap
            )
            metrics["alpha_prime"] = alpha_prime.detach()
            metrics["alpha_prime_loss"] = terms["alpha_prime"].detach()
        else:
            conservative = cfg.cql_alpha * penalty.sum()
        terms["critic"] = td + conservative
        q_data_mean = q_data.detach().mean()
        metrics.update(
            critic_loss=terms["critic"].detach(),
            td_loss=td.detach(),
            cql_penalty=penalty.detach().mean(),
            q_data_mean=q_data_mean,
            # mean of the logsumexp term, recovered from the penalty without recomputing it
            q_sampled_logsumexp_mean=penalty.detach().mean() + q_data_mean,
        )
        return terms, metrics

    def _actor_terms(
        self, batch: Batch, bc_phase: bool | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cfg = self.config
        if bc_phase is None:
            bc_phase = self.num_updates < cfg.bc_steps
        obs = batch.obs.flatten(1)
        pi, log_pi = self.actor.sample(obs, self.generator)
        log_alpha = self.nets["log_alpha"]()
        alpha = log_alpha.detach().exp()
        if bc_phase:
            loss = (alpha * log_pi - self.actor.log_prob(obs, batch.actions)).mean()
        else:
            # critic weights enter as constants: the actor loss can only move the actor
            q_pi = nets.call_frozen(self.critic, obs, pi)
            loss = sac_actor_loss(q_pi, log_pi, alpha)
        terms = {"actor": loss}
        if cfg.auto_alpha:
            terms["alpha"] = sac_alpha_loss(log_alpha, log_pi, self.target_entropy)
        metrics = {"actor_loss": loss.detach(), "alpha": alpha, "entropy": -log_pi.detach().mean()}
        if cfg.auto_alpha:
            metrics["alpha_loss"] = terms["alpha"].detach()
        return terms, metrics

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term, graphs attached, nothing stepped; each key names the optimiser it drives."""
        critic_terms, _ = self._critic_terms(batch)
        actor_terms, _ = self._actor_terms(batch)
        return {**critic_terms, **actor_terms}

    # -- update --------------------------------------------------------------------------------------
    def step_args(self) -> tuple[bool]:
        return (self.num_updates < self.config.bc_steps,)  # the behaviour-cloning warm-up phase

    def _step(self, batch: Batch, bc_phase: bool) -> dict[str, Tensor]:
        """Everything one update computes; host-side counters stay outside (it may be compiled)."""
        cfg = self.config
        terms, metrics = self._critic_terms(batch)
        self._step_jointly(terms, self.critic)
        terms, actor_metrics = self._actor_terms(batch, bc_phase)
        self._step_jointly(terms, self.actor)
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        return {**metrics, **actor_metrics}

    def _step_jointly(self, terms: dict[str, Tensor], net: nn.Module) -> None:
        """Step every optimiser named in ``terms`` after one backward pass of their sum (``net``: the
        network whose gradient norm ``max_grad_norm`` clips).

        The terms reach disjoint parameters (the temperature terms see the other losses detached,
        which the contract tests check), so each optimiser gets exactly its own term's gradient. One
        backward pass is cheaper, and a compiled step needs it: a compiled graph can be backpropagated
        only once.
        """
        for name in terms:
            self.optimizers[name].zero_grad(set_to_none=True)
        backward(torch.stack(list(terms.values())).sum())
        if self.config.max_grad_norm is not None:
            clip_grad_norm(list(net.parameters()), self.config.max_grad_norm)
        for name in terms:
            self.optimizers[name].step()
