"""Soft Actor-Critic (Haarnoja et al. 2018, with automatic entropy tuning), online, continuous actions.

Defaults follow Stable-Baselines3 and CleanRL (``sac_continuous_action.py``): Adam 3e-4, batch 256,
buffer 10⁶, 5000 uniform-random steps before learning, τ = 5e-3, γ = 0.99, twin (256, 256) critics,
α tuned towards entropy −|A|. One update, in order: critic step on the soft TD target, actor step
against the updated critics, α step, Polyak update of the target critics. One actor pass over
``[s; s′]`` serves both the TD target (s′ half, detached) and the actor loss (s half): the critic
step does not touch the actor, so the samples are still the current policy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import GaussianActorCritic, apply_gradients, step
from offrl.config import option, validate
from offrl.losses import LearnedScalar, critic_loss, sac_actor_loss, sac_alpha_loss, soft_td_target
from offrl.online.buffer import ReplayBuffer
from offrl.online.loop import OnlineAlgorithm, Storage
from offrl.types import Batch


@dataclass(frozen=True)
class SACConfig:
    """Defaults: Stable-Baselines3 SAC and CleanRL ``sac_continuous_action.py``."""

    actor_hidden: tuple[int, ...] = option(
        (256, 256), "actor MLP hidden sizes (SB3/CleanRL: 256, 256)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (256, 256), "critic MLP hidden sizes (SB3/CleanRL: 256, 256)", low=1, nonempty=True
    )
    n_critics: int = option(2, "critics in the Q-ensemble (twin critics); targets use their minimum", low=1)
    actor_lr: float = option(3e-4, "actor Adam learning rate (SB3 3e-4)", low=0.0, low_open=True)
    critic_lr: float = option(
        3e-4, "critic Adam learning rate (SB3 3e-4; CleanRL 1e-3)", low=0.0, low_open=True
    )
    alpha_lr: float = option(3e-4, "entropy temperature Adam learning rate", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step", low=1)
    buffer_size: int = option(1_000_000, "replay buffer capacity", low=1)
    learning_starts: int = option(5000, "environment steps of uniform random actions before learning", low=0)
    train_freq: int = option(1, "vector-env steps between training phases", low=1)
    gradient_steps: int = option(1, "gradient steps per training phase", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(5e-3, "Polyak rate of the target critics", low=0.0, high=1.0, low_open=True)
    auto_alpha: bool = option(True, "tune the entropy temperature α towards the target entropy")
    init_alpha: float = option(1.0, "initial entropy temperature α", low=0.0, low_open=True)
    target_entropy: float | None = option(None, "target policy entropy for α tuning; none: −|A|")
    num_envs: int = option(1, "parallel training sub-environments", low=1)
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "compute precision of the hidden layers in update: 'bf16' runs them in bfloat16 (fast on CPUs with "
        "AMX/AVX-512 BF16) with float32 master weights, output layers, Q-values and losses",
    )

    def __post_init__(self) -> None:
        validate(self, "sac")


# -- the same losses with their gradients, for the hand-written step (tests check them against autograd)
def critic_loss_and_grad(q: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`critic_loss` and its gradient w.r.t. ``q``: (E,B), (B,) -> (), (E,B)."""
    diff = q - target
    return diff.pow(2).mean(-1).sum(), diff * (2.0 / q.shape[-1])


def actor_loss_and_grads(q_pi: Tensor, log_prob: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`actor_loss` and its gradients w.r.t. ``q_pi`` and ``log_prob``: (E,B), (B,), () -> (),
    (E,B), (B,). The minimum's gradient goes to the member torch.min picks, as autograd's does."""
    b = q_pi.shape[-1]
    q_min, member = q_pi.min(0)
    loss = (alpha * log_prob - q_min).mean()
    g_q = torch.zeros_like(q_pi).scatter_(0, member.unsqueeze(0), -1.0 / b)
    return loss, g_q, (alpha / b).expand(b)


def tanh_gaussian_sample_grad(
    g_action: Tensor, g_log_prob: Tensor, action: Tensor, noise: Tensor, std: Tensor, raw_log_std: Tensor
) -> Tensor:
    """Gradient w.r.t. the actor's outputs ``[mean, raw log-std]`` (B, 2A) of a loss of a reparameterised
    sample ``action = tanh(mean + noise·std)`` and its log-probability, given the loss's gradients
    w.r.t. both: (B,A), (B,), (B,A) ×3, (B,A) -> (B,2A).

    With u = mean + noise·std, log π = Σ(−noise²/2 − log std − log √(2π)) − Σ log(1 − tanh²u): the
    Gaussian term moves only with log std (−1 per dimension; z = noise whatever mean and std are), and
    the squashing term has d/du = 2·tanh(u). The log-std clamp passes gradient inside its bounds.
    """
    g_lp = g_log_prob.unsqueeze(-1)
    g_u = g_action * (1.0 - action * action) + g_lp * (2.0 * action)
    g_log_std = g_u * noise * std - g_lp
    inside = (raw_log_std >= nets.LOG_STD_MIN) & (raw_log_std <= nets.LOG_STD_MAX)
    return torch.cat([g_u, g_log_std * inside], dim=-1)


class SAC(GaussianActorCritic, OnlineAlgorithm):
    """Soft Actor-Critic with twin critics and automatic entropy tuning (continuous actions)."""

    name: ClassVar[str] = "sac"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = SACConfig
    config: SACConfig

    def build(self) -> None:
        cfg = self.config
        self.nets["actor"] = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        self.nets["critic"] = nets.QEnsemble(cfg.n_critics, self.obs_dim, self.act_dim, cfg.critic_hidden)
        self.nets["critic_target"] = nets.QEnsemble(
            cfg.n_critics, self.obs_dim, self.act_dim, cfg.critic_hidden
        )
        nets.hard_update(self.nets["critic_target"], self.nets["critic"])
        nets.freeze(self.nets["critic_target"])
        self.nets["log_alpha"] = LearnedScalar(math.log(cfg.init_alpha), learn=cfg.auto_alpha)
        self.target_entropy = -float(self.act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.optimize("actor", self.actor, lr=cfg.actor_lr)
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        if cfg.auto_alpha:
            self.optimize("alpha", self.nets["log_alpha"], lr=cfg.alpha_lr)
        # plain relu networks train through the hand-written passes (same maths, a third of the ops)
        layers = (
            nets.relu_linears(self.actor.net),
            nets.relu_ensemble_linears(self.critic.net),
            nets.relu_ensemble_linears(self.critic_target.net),
        )
        self._hand_layers = None if any(x is None for x in layers) else layers

    # -- loop hooks --------------------------------------------------------------------------------
    def make_storage(self) -> ReplayBuffer:
        return ReplayBuffer(
            self.config.buffer_size, self.obs_dim, self.act_dim, discrete=False, device=self.device
        )

    @torch.no_grad()
    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if env_steps < self.config.learning_starts:
            shape = (obs.shape[0], self.act_dim)
            return torch.rand(shape, generator=self.generator, device=self.device) * 2.0 - 1.0, {}
        return self.actor.sample(self.normalizer(obs), self.generator)[0], {}

    def learn(self, storage: Storage, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        cfg = self.config
        assert isinstance(storage, ReplayBuffer)
        if env_steps < cfg.learning_starts or (env_steps // self.num_envs) % cfg.train_freq:
            return []
        return [
            self.update(storage.sample(cfg.batch_size, self.generator)) for _ in range(cfg.gradient_steps)
        ]

    # -- update ------------------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, Tensor]:
        with nets.compute_precision(self.config.precision):
            if self._hand_layers is not None and nets.HAND_BACKWARD:
                return self._hand_step(batch, *self._hand_layers)  # type: ignore[arg-type]
            return self._update(batch)

    def _hand_step(
        self,
        batch: Batch,
        actor_layers: list[nn.Linear],
        critic_layers: list[nets.EnsembleLinear],
        target_layers: list[nets.EnsembleLinear],
    ) -> dict[str, Tensor]:
        """:meth:`_update` as explicit passes: the same samples, losses and order of steps."""
        cfg = self.config
        obs, next_obs = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        b = obs.shape[0]
        # one actor pass over [s; s′]; only the s rows are kept for the backward
        out, actor_tape = nets.relu_mlp_train_forward(actor_layers, torch.cat([obs, next_obs]), grad_rows=b)
        mean, raw_log_std = out.chunk(2, dim=-1)  # (2B, A) each
        log_std = raw_log_std.clamp(nets.LOG_STD_MIN, nets.LOG_STD_MAX)
        noise = torch.randn(mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
        std = log_std.exp()
        u = mean + noise * std
        pi = torch.tanh(u)
        log_pi = nets.gaussian_log_prob(u, mean, log_std) - nets.tanh_log_det_jacobian(u).sum(-1)  # (2B,)
        log_alpha: Tensor = self.nets["log_alpha"]()
        alpha = log_alpha.detach().exp()

        next_q = nets.relu_ensemble_train_forward(target_layers, torch.cat([next_obs, pi[b:]], 1), False)[0]
        target = soft_td_target(
            batch.rewards, batch.terminals, next_q.squeeze(-1), log_pi[b:], alpha, cfg.gamma
        )
        q, critic_tape = nets.relu_ensemble_train_forward(critic_layers, torch.cat([obs, batch.actions], 1))
        q = q.squeeze(-1)  # (E, B)
        c_loss, g_q = critic_loss_and_grad(q, target)
        nets.relu_ensemble_backward(critic_layers, critic_tape, g_q.unsqueeze(-1))
        apply_gradients(self.optimizers["critic"], cfg.max_grad_norm)

        # the actor loss through the updated critics, their weights as constants
        q_pi, pi_tape = nets.relu_ensemble_train_forward(critic_layers, torch.cat([obs, pi[:b]], 1))
        a_loss, g_q_pi, g_log_pi = actor_loss_and_grads(q_pi.squeeze(-1), log_pi[:b], alpha)
        g_in = nets.relu_ensemble_backward(
            critic_layers, pi_tape, g_q_pi.unsqueeze(-1), params=False, input_grad=True
        )
        assert g_in is not None
        g_out = tanh_gaussian_sample_grad(
            g_in[:, obs.shape[1] :], g_log_pi, pi[:b], noise[:b], std[:b], raw_log_std[:b]
        )
        nets.relu_mlp_backward(actor_layers, actor_tape, g_out)
        apply_gradients(self.optimizers["actor"], cfg.max_grad_norm)
        entropy = -log_pi[:b].mean()
        metrics = {
            "critic_loss": c_loss,
            "actor_loss": a_loss,
            "q_mean": q.mean(),
            "alpha": alpha,
            "entropy": entropy,
        }
        if cfg.auto_alpha:
            # alpha_loss = −mean(log α · (log π + H̄)): its gradient is −mean(log π + H̄) = entropy − H̄
            log_alpha.grad = (entropy - self.target_entropy).reshape(())
            metrics["alpha_loss"] = -(log_alpha.detach() * (self.target_entropy - entropy))
            apply_gradients(self.optimizers["alpha"])
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        self.num_updates += 1
        return metrics

    def _update(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        obs, next_obs = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        b = obs.shape[0]
        pi, log_pi = self.actor.sample(torch.cat([obs, next_obs]), self.generator)  # (2B, A), (2B,)
        log_alpha = self.nets["log_alpha"]()
        alpha = log_alpha.detach().exp()
        with torch.no_grad():
            next_q = self.critic_target(next_obs, pi[b:])
            target = soft_td_target(batch.rewards, batch.terminals, next_q, log_pi[b:], alpha, cfg.gamma)
        q = self.critic(obs, batch.actions)
        c_loss = critic_loss(q, target)
        step(self.optimizers["critic"], c_loss, self.critic.parameters(), cfg.max_grad_norm)

        # the critic's weights enter as constants: the actor loss moves the actor only
        frozen = {k: v.detach() for k, v in self.critic.named_parameters()}
        q_pi = torch.func.functional_call(self.critic, frozen, (obs, pi[:b]))
        a_loss = sac_actor_loss(q_pi, log_pi[:b], alpha)
        step(self.optimizers["actor"], a_loss, self.actor.parameters(), cfg.max_grad_norm)
        metrics = {
            "critic_loss": c_loss.detach(),
            "actor_loss": a_loss.detach(),
            "q_mean": q.detach().mean(),
            "alpha": alpha,
            "entropy": -log_pi[:b].detach().mean(),
        }
        if cfg.auto_alpha:
            al = sac_alpha_loss(log_alpha, log_pi[:b], self.target_entropy)
            step(self.optimizers["alpha"], al)
            metrics["alpha_loss"] = al.detach()
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        self.num_updates += 1
        return metrics


ALGORITHMS = (SAC,)
