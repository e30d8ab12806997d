"""Batch-Constrained deep Q-learning for continuous actions (Fujimoto, Meger & Precup 2019,
"Off-Policy Deep Reinforcement Learning without Exploration").

A conditional VAE G(a | s) models the dataset's actions; the policy decodes ``n`` candidate actions
per state from clipped prior latents, nudges each by a perturbation actor ξ(s, a) of range ±Φ and
takes the candidate with the highest Q1. Critics learn from the soft clipped double-Q target

    y = r + γ(1 − terminal) · max_j [ λ · min_e Q′_e(s′, a′_j) + (1 − λ) · max_e Q′_e(s′, a′_j) ]

over ``n`` candidates a′_j from the VAE and the target actor. The actor maximises Q1(s, ξ(s, G(s))).

One update, in order (as the authors' code): VAE step, critic step, actor step, Polyak update of the
target actor and critics. Costs are kept down by: one decoder pass for the s′ candidates of the
target and the s samples of the actor step (both drawn after the VAE step, without gradient), one
ensemble call per critic evaluation, and an actor loss that sees the critic weights as detached
constants (``nets.call_frozen``) so that its backward builds no critic weight gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import ActorCritic, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import critic_loss, td_target
from offrl.policies.artifact import TorchPolicy
from offrl.policies.modules import ContinuousBCQPolicyNet, PerturbationActor, VAEDecoder
from offrl.types import Batch

LOG_STD_MIN, LOG_STD_MAX = -4.0, 15.0  # encoder log-std clamp of the authors' code


@dataclass(frozen=True)
class BCQConfig:
    """Defaults follow the paper and the authors' code (Fujimoto et al. 2019; d3rlpy's BCQ agrees on
    λ, Φ, n, KL weight and τ), except the batch size: 256 like this package's other algorithms
    instead of the paper's 100."""

    actor_hidden: tuple[int, ...] = option(
        (400, 300), "perturbation actor MLP hidden sizes (paper: 400, 300)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (400, 300), "critic MLP hidden sizes (paper: 400, 300)", low=1, nonempty=True
    )
    encoder_hidden: tuple[int, ...] = option(
        (750, 750), "VAE encoder MLP hidden sizes (paper: 750, 750)", low=1, nonempty=True
    )
    decoder_hidden: tuple[int, ...] = option(
        (750, 750), "VAE decoder MLP hidden sizes (paper: 750, 750)", low=1, nonempty=True
    )
    latent_dim: int | None = option(None, "VAE latent size; none: 2·|A| (paper)", low=1)
    latent_clip: float = option(
        0.5, "prior latents are clipped to ±this when decoding without the encoder", low=0.0, low_open=True
    )
    kl_weight: float = option(0.5, "weight of the KL term in the VAE loss (paper: 0.5)", low=0.0)
    n_critics: int = option(2, "critics in the Q-ensemble (paper: 2)", low=1)
    phi: float = option(
        0.05, "Φ: largest perturbation of a decoded action, in [−1, 1] units (paper: 0.05)", low=0.0
    )
    lam: float = option(
        0.75, "λ of the soft clipped double-Q target: λ·min + (1 − λ)·max (paper: 0.75)", low=0.0, high=1.0
    )
    n_actions: int = option(10, "decoded candidate actions per next state in the target (paper: 10)", low=1)
    act_actions: int = option(
        10, "decoded candidate actions per state when acting (paper: 10; code: 100)", low=1
    )
    actor_lr: float = option(
        1e-3, "perturbation actor Adam learning rate (authors' code: 1e-3)", low=0.0, low_open=True
    )
    critic_lr: float = option(1e-3, "critic Adam learning rate (authors' code: 1e-3)", low=0.0, low_open=True)
    vae_lr: float = option(
        1e-3, "VAE Adam learning rate (authors' code: Adam default 1e-3)", low=0.0, low_open=True
    )
    batch_size: int = option(256, "transitions per gradient step (paper: 100; 256 for parity here)", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(5e-3, "Polyak rate of the target actor and critics", low=0.0, high=1.0, low_open=True)
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )
    normalize_obs: bool = option(True, "normalise observations by dataset mean/std")

    def __post_init__(self) -> None:
        validate(self, "bcq")  # the declared ranges and choices of every field


# -- losses (pure) -------------------------------------------------------------------------------
def gaussian_kl(mean: Tensor, log_std: Tensor) -> Tensor:  # (B, L), (B, L) -> scalar
    """KL(N(mean, std²) ‖ N(0, 1)) per latent dimension, averaged over rows and dimensions."""
    return (-0.5 * (1.0 + 2.0 * log_std - mean.pow(2) - (2.0 * log_std).exp())).mean()


def vae_loss(recon: Tensor, target: Tensor, mean: Tensor, log_std: Tensor, kl_weight: float) -> Tensor:
    """Mean squared reconstruction error + kl_weight · mean KL: (B, A), (B, A), (B, L), (B, L) -> ().

    Both terms are element means, as in the authors' code (d3rlpy sums the KL over latent dims).
    """
    return F.mse_loss(recon, target) + kl_weight * gaussian_kl(mean, log_std)


def bcq_soft_clipped_target(q_next: Tensor, lam: float) -> Tensor:  # (E, B, n) -> (B,)
    """Value of s′: max over the n candidates of λ·min_e Q_e + (1 − λ)·max_e Q_e."""
    mixed = lam * q_next.amin(dim=0) + (1.0 - lam) * q_next.amax(dim=0)  # (B, n)
    return mixed.amax(dim=1)


# -- networks ------------------------------------------------------------------------------------
class ConditionalVAE(nn.Module):
    """Encoder (s, a) → N(mean, std²) over latents and the acting decoder (s, z) → a."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        encoder_hidden: tuple[int, ...],
        decoder_hidden: tuple[int, ...],
        latent_clip: float,
    ) -> None:
        super().__init__()
        self.encoder = nets.mlp(obs_dim + act_dim, 2 * latent_dim, encoder_hidden)
        self.decoder = VAEDecoder(obs_dim, act_dim, latent_dim, decoder_hidden, latent_clip)

    def forward(
        self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction, latent mean and log-std: (B, obs_dim), (B, A) -> (B, A), (B, L), (B, L)."""
        mean, log_std = self.encoder(torch.cat([obs, actions], dim=-1)).chunk(2, dim=-1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        noise = nets.randn(mean.shape, generator, mean.device, mean.dtype)
        return self.decoder(obs, mean + noise * log_std.exp()), mean, log_std


@register
class BCQ(ActorCritic):
    """Continuous BCQ: VAE behaviour model, perturbation actor, soft clipped double-Q critics."""

    name: ClassVar[str] = "bcq"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = BCQConfig
    config: BCQConfig

    def build(self) -> None:
        cfg = self.config
        self.latent_dim = 2 * self.act_dim if cfg.latent_dim is None else cfg.latent_dim
        obs_dim, act_dim = self.obs_dim, self.act_dim
        self.nets["vae"] = ConditionalVAE(
            obs_dim, act_dim, self.latent_dim, cfg.encoder_hidden, cfg.decoder_hidden, cfg.latent_clip
        )
        self.nets["actor"] = PerturbationActor(obs_dim, act_dim, cfg.actor_hidden, cfg.phi)
        self.nets["actor_target"] = nets.freeze(
            PerturbationActor(obs_dim, act_dim, cfg.actor_hidden, cfg.phi)
        )
        self.build_critics(cfg.n_critics, cfg.critic_hidden)
        nets.hard_update(self.actor_target, self.actor)
        self.optimize("vae", self.vae, lr=cfg.vae_lr)
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        self.optimize("actor", self.actor, lr=cfg.actor_lr)

    # -- accessors ---------------------------------------------------------------------------------
    @property
    def vae(self) -> ConditionalVAE:
        return self.nets["vae"]  # type: ignore[return-value]

    @property
    def actor(self) -> PerturbationActor:
        return self.nets["actor"]  # type: ignore[return-value]

    @property
    def actor_target(self) -> PerturbationActor:
        return self.nets["actor_target"]  # type: ignore[return-value]

    def policy(self) -> TorchPolicy:
        cfg = self.config
        net = ContinuousBCQPolicyNet(self.vae.decoder, self.actor, self.critic, cfg.act_actions)
        policy = self._policy("bcq", net, cfg.actor_hidden)
        policy.arch.update(
            critic_hidden=list(cfg.critic_hidden),
            decoder_hidden=list(cfg.decoder_hidden),
            n_critics=cfg.n_critics,
            latent_dim=self.latent_dim,
            latent_clip=cfg.latent_clip,
            phi=cfg.phi,
            n_actions=cfg.act_actions,
        )
        return policy

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decoded_actions(self, obs: Tensor, next_obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder pass for both uses, without gradient.

        Returns the s′ rows repeated ``n_actions`` times (B·n, obs_dim), their decoded candidates
        (B·n, A) and one decoded action per s row (B, A).
        """
        batch, n = obs.shape[0], self.config.n_actions
        rep_next = next_obs.unsqueeze(1).expand(-1, n, -1).reshape(batch * n, -1)
        decoded = self.vae.decoder.sample(torch.cat([rep_next, obs]), self.generator)
        return rep_next, decoded[: batch * n], decoded[batch * n :]

    @torch.no_grad()
    def target(self, batch: Batch, rep_next: Tensor, next_candidates: Tensor) -> Tensor:
        """TD target from perturbed candidates at s′: (B·n, obs_dim), (B·n, A) -> (B,)."""
        cfg = self.config
        actions = self.actor_target(rep_next, next_candidates)
        q_next = self.critic_target(rep_next, actions).view(cfg.n_critics, -1, cfg.n_actions)  # (E, B, n)
        next_v = bcq_soft_clipped_target(q_next, cfg.lam)
        return td_target(batch.rewards, batch.terminals, next_v, cfg.gamma)

    # -- losses ------------------------------------------------------------------------------------
    def _vae_terms(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        recon, mean, log_std = self.vae(obs, actions, self.generator)
        loss = vae_loss(recon, actions, mean, log_std, self.config.kl_weight)
        return loss, {"vae_loss": loss.detach(), "vae_kl": gaussian_kl(mean.detach(), log_std.detach())}

    def _critic_terms(self, batch: Batch, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        q = self.critic(batch.obs.flatten(1), batch.actions)  # (E, B)
        loss = critic_loss(q, target)
        return loss, {"critic_loss": loss.detach(), "q_data_mean": q.detach().mean()}

    def _actor_terms(self, obs: Tensor, decoded: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # critic weights enter as constants: the actor loss can only move the actor
        q_pi = nets.call_frozen(self.critic, obs, self.actor(obs, decoded))
        loss = -q_pi[0].mean()  # the first critic, as the paper
        return loss, {"actor_loss": loss.detach()}

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term, graphs attached, nothing stepped; each key names the optimiser it drives."""
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        vae, _ = self._vae_terms(obs, batch.actions)
        rep_next, next_candidates, decoded = self.decoded_actions(obs, next_obs)
        critic, _ = self._critic_terms(batch, self.target(batch, rep_next, next_candidates))
        actor, _ = self._actor_terms(obs, decoded)
        return {"vae": vae, "critic": critic, "actor": actor}

    # -- update --------------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """One update on the device (host-side counters stay in :meth:`update`: it may be a CUDA graph)."""
        cfg = self.config
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        loss, metrics = self._vae_terms(obs, batch.actions)
        step(self.optimizers["vae"], loss, self.vae.parameters(), cfg.max_grad_norm)
        rep_next, next_candidates, decoded = self.decoded_actions(obs, next_obs)
        loss, critic_metrics = self._critic_terms(batch, self.target(batch, rep_next, next_candidates))
        step(self.optimizers["critic"], loss, self.critic.parameters(), cfg.max_grad_norm)
        loss, actor_metrics = self._actor_terms(obs, decoded)
        step(self.optimizers["actor"], loss, self.actor.parameters(), cfg.max_grad_norm)
        nets.soft_update(self.actor_target, self.actor, cfg.tau)
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        return {**metrics, **critic_metrics, **actor_metrics}
