"""Proximal Policy Optimization (Schulman et al. 2017), clipped objective, for discrete and continuous actions.

Defaults are CleanRL's ``ppo.py`` for classic control: 4 sub-environments × 128 steps per rollout,
GAE λ = 0.95, γ = 0.99, 4 epochs of 4 minibatches, clip 0.2 (value clipping too), entropy 0.01,
value 0.5, gradient norm 0.5, Adam 2.5e-4 (ε = 1e-5) annealed linearly to 0, separate 64-64 tanh
actor and critic MLPs with orthogonal initialisation.

Discrete actions use a categorical policy. Continuous actions use a tanh-squashed Gaussian, so
samples lie in the bounds without clipping and log-probabilities are exact: the rollout keeps each
pre-tanh sample ``u`` and the ratio is evaluated at ``u`` (the tanh Jacobian cancels in it). Its
entropy bonus is the single-sample estimate −log π(a|s).

Advantages bootstrap through time-limit truncations, never through terminations: the rollout keeps
the true next observation of every step (the final one at episode ends), and the critic values
all of them in one pass at update time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import step
from offrl.algos.registry import register
from offrl.config import option
from offrl.errors import ConfigError
from offrl.losses import td_target
from offrl.online.buffer import RolloutBuffer
from offrl.online.loop import OnlineAlgorithm, Storage
from offrl.policies.artifact import TorchPolicy


@dataclass(frozen=True)
class PPOConfig:
    """Defaults: CleanRL ``ppo.py`` (classic control)."""

    hidden: tuple[int, ...] = option(
        (64, 64), "actor and critic MLP hidden sizes (CleanRL: 64, 64)", low=1, nonempty=True
    )
    activation: str = option("tanh", "hidden activation (CleanRL: tanh)")
    lr: float = option(2.5e-4, "Adam learning rate", low=0.0, low_open=True)
    anneal_lr: bool = option(True, "anneal the learning rate linearly to 0 over the run")
    num_envs: int = option(4, "parallel training sub-environments", low=1)
    n_steps: int = option(128, "steps per sub-environment in each rollout", low=1)
    n_epochs: int = option(4, "passes over each rollout", low=1)
    n_minibatches: int = option(
        4, "minibatches per pass (batch_size = num_envs·n_steps / n_minibatches)", low=1
    )
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    gae_lambda: float = option(0.95, "GAE λ", low=0.0, high=1.0)
    clip: float = option(0.2, "probability-ratio clipping ε", low=0.0, low_open=True)
    clip_value: bool = option(True, "clip the value update around the rollout's values by ε as well")
    normalize_advantages: bool = option(True, "standardise advantages within each minibatch")
    ent_coef: float = option(0.01, "entropy bonus weight", low=0.0)
    vf_coef: float = option(0.5, "value loss weight", low=0.0)
    max_grad_norm: float = option(0.5, "clip the joint gradient norm", low=0.0, low_open=True)
    ortho_init: bool = option(True, "orthogonal initialisation (gain √2; policy output 0.01, value output 1)")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.n_steps // self.n_minibatches


# -- losses (pure) -------------------------------------------------------------------------------
def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminals: Tensor,
    ends: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and value targets: (T,N) ×5 -> (T,N), (T,N).

    δ_t = r_t + γ(1 − terminal_t)·V(s′_t) − V(s_t) with s′_t the true next state (``next_values``),
    A_t = δ_t + γλ(1 − end_t)·A_{t+1}; ``ends`` marks every episode end (termination or truncation),
    so a truncated step bootstraps from V(s′_t) but the recursion does not run into the next episode.
    """
    deltas = td_target(rewards, terminals, next_values, gamma) - values
    carry = (gamma * lam) * (1.0 - ends)
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        running = deltas[t] + carry[t] * running
        advantages[t] = running
    return advantages, advantages + values


def clipped_policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (to minimise), approximate KL and clipped fraction: (B,) ×3 -> () ×3.

    loss = mean max(−A·r, −A·clip(r, 1 − ε, 1 + ε)), r = π/π_old; KL ≈ mean((r − 1) − log r).
    """
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip).float().mean()
    return loss, approx_kl, clip_fraction


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """½·mean squared error to the returns; clipped: the larger of the errors of V and of
    old V + clip(V − old V, ±ε): (B,) ×3 -> ()."""
    err = (values - returns).pow(2)
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.max(err, (clipped - returns).pow(2))
    return 0.5 * err.mean()


def _orthogonal(net: nn.Module, out_gain: float) -> None:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        nn.init.orthogonal_(m.weight, out_gain if i == len(linears) - 1 else math.sqrt(2.0))
        nn.init.zeros_(m.bias)


@register
class PPO(OnlineAlgorithm):
    """PPO with a tanh-squashed Gaussian policy (continuous actions)."""

    name: ClassVar[str] = "ppo"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = PPOConfig
    on_policy: ClassVar[bool] = True
    config: PPOConfig

    def build(self) -> None:
        cfg = self.config
        if cfg.n_minibatches < 1 or (cfg.num_envs * cfg.n_steps) % cfg.n_minibatches:
            raise ConfigError(
                f"ppo: num_envs·n_steps = {cfg.num_envs * cfg.n_steps} must split into n_minibatches = "
                f"{cfg.n_minibatches} equal minibatches"
            )
        actor: nn.Module
        if self.discrete:
            actor = nets.DiscreteHead(self.obs_dim, self.act_dim, cfg.hidden, cfg.activation)
        else:
            actor = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.hidden, cfg.activation)
        critic = nets.mlp(self.obs_dim, 1, cfg.hidden, cfg.activation)
        if cfg.ortho_init:
            _orthogonal(actor, 0.01)
            _orthogonal(critic, 1.0)
        self.nets["actor"] = actor
        self.nets["critic"] = critic
        self.optimize("ppo", actor, critic, lr=cfg.lr, eps=1e-5)

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.config.n_steps

    def policy(self) -> TorchPolicy:
        kind = "categorical" if self.discrete else "tanh_gaussian"
        return self._policy(kind, self.nets["actor"], self.config.hidden, self.config.activation)

    # -- policy pieces -------------------------------------------------------------------------------
    def log_prob_entropy(
        self, obs: Tensor, actions: Tensor, pre_tanh: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """log π(a|s) and the entropy (estimate) per row: (B, obs_dim), (B,)|(B, A), (B, A)|None -> (B,), (B,)."""
        if self.discrete:
            log_p = torch.log_softmax(self.nets["actor"](obs), -1)
            lp = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            return lp, -(log_p.exp() * log_p).sum(-1)
        assert pre_tanh is not None
        mean, log_std = self.nets["actor"](obs)
        lp = nets.gaussian_log_prob(pre_tanh, mean, log_std) - nets.tanh_log_det_jacobian(pre_tanh).sum(-1)
        return lp, -lp

    # -- loop hooks --------------------------------------------------------------------------------
    def make_storage(self) -> RolloutBuffer:
        cfg = self.config
        return RolloutBuffer(
            cfg.n_steps, cfg.num_envs, self.obs_dim, self.act_dim, discrete=self.discrete, device=self.device
        )

    @torch.no_grad()
    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.normalizer(obs)
        if self.discrete:
            log_p = torch.log_softmax(self.nets["actor"](x), -1)
            a = torch.multinomial(log_p.exp(), 1, generator=self.generator)  # (N, 1)
            return a.squeeze(-1), {"log_prob": log_p.gather(-1, a).squeeze(-1)}
        mean, log_std = self.nets["actor"](x)
        noise = torch.randn(mean.shape, generator=self.generator, device=self.device)
        u = mean + noise * log_std.exp()
        lp = nets.gaussian_log_prob(u, mean, log_std) - nets.tanh_log_det_jacobian(u).sum(-1)
        return torch.tanh(u), {"log_prob": lp, "pre_tanh": u}

    def learn(self, storage: Storage, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        assert isinstance(storage, RolloutBuffer)
        if not storage.full:
            return []
        cfg = self.config
        t, n = storage.n_steps, storage.num_envs
        obs = self.normalizer(storage.obs.reshape(t * n, -1))
        next_obs = self.normalizer(storage.next_obs.reshape(t * n, -1))
        critic = self.nets["critic"]
        with torch.no_grad():
            v = critic(torch.cat([obs, next_obs])).view(2, t, n)
            advantages, returns = gae(
                storage.rewards,
                v[0],
                v[1],
                storage.terminals,
                storage.terminals + storage.timeouts,
                cfg.gamma,
                cfg.gae_lambda,
            )
        if cfg.anneal_lr:
            frac = max(1.0 - (env_steps - t * n) / total_steps, 0.0)
            for group in self.optimizers["ppo"].param_groups:
                group["lr"] = frac * cfg.lr
        flat = {
            "actions": storage.actions.reshape(t * n, *storage.actions.shape[2:]),
            "log_prob": storage.extras["log_prob"].reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
            "values": v[0].reshape(-1),
        }
        pre_tanh = storage.extras["pre_tanh"].reshape(t * n, -1) if "pre_tanh" in storage.extras else None
        out = []
        for _ in range(cfg.n_epochs):
            order = torch.randperm(t * n, generator=self.generator, device=self.device)
            for idx in order.view(cfg.n_minibatches, -1):
                out.append(
                    self._update_minibatch(obs[idx], {k: x[idx] for k, x in flat.items()}, pre_tanh, idx)
                )
        storage.clear()
        return out

    def _update_minibatch(
        self, obs: Tensor, mb: dict[str, Tensor], pre_tanh: Tensor | None, idx: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.config
        adv = mb["advantages"]
        if cfg.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        log_prob, entropy = self.log_prob_entropy(
            obs, mb["actions"], None if pre_tanh is None else pre_tanh[idx]
        )
        pg_loss, approx_kl, clip_fraction = clipped_policy_loss(log_prob, mb["log_prob"], adv, cfg.clip)
        values = self.nets["critic"](obs).squeeze(-1)
        v_loss = value_loss(values, mb["values"], mb["returns"], cfg.clip if cfg.clip_value else None)
        ent = entropy.mean()
        loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss
        opt = self.optimizers["ppo"]
        step(opt, loss, [p for group in opt.param_groups for p in group["params"]], cfg.max_grad_norm)
        self.num_updates += 1
        return {
            "policy_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": ent.detach(),
            "approx_kl": approx_kl,
            "clip_fraction": clip_fraction,
        }


@register
class PPODiscrete(PPO):
    """PPO with a categorical policy (discrete actions)."""

    discrete: ClassVar[bool] = True
