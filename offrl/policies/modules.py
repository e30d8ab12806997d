"""Acting modules of composite policies: several networks that choose actions together.

A policy artefact rebuilds its network from the architecture dict alone (``POLICY_KINDS`` in
:mod:`offrl.policies.artifact`), so every class an exported policy needs lives here or in
:mod:`offrl.nets`, never in the training code. Each module's ``act_unit(x, deterministic=…,
generator=…)`` maps normalised observations to actions in learning units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from offrl import nets

# The latent seed of deterministic continuous-BCQ acting (see ContinuousBCQPolicyNet.act_unit).
DETERMINISTIC_LATENT_SEED = 0


# -- discrete BCQ --------------------------------------------------------------------------------
def discrete_bcq_mask(bc_logits: Tensor, threshold: float) -> Tensor:  # (B, A) -> (B, A) bool
    """Actions the behaviour model deems plausible: π_bc(a|s) / max_a′ π_bc(a′|s) > threshold.

    The softmax normaliser cancels in the ratio, so it is exp(logit − max logit). For a threshold
    below 1 the most likely action always passes, so every row allows at least one action.
    """
    ratio = torch.exp(bc_logits - bc_logits.amax(dim=-1, keepdim=True))
    return ratio > threshold


def masked_q(q: Tensor, mask: Tensor) -> Tensor:  # (B, A), (B, A) bool -> (B, A)
    """Q-values with the disallowed actions at −inf, so argmax picks among the allowed ones."""
    return q.masked_fill(~mask, float("-inf"))


class DiscreteBCQPolicyNet(nn.Module):
    """Discrete BCQ's greedy policy: argmax of Q over the actions the imitation head allows.

    ``forward`` returns the masked Q-values (−inf on filtered actions), the scores acting maximises.
    """

    def __init__(self, q_head: nn.Module, bc_head: nn.Module, threshold: float) -> None:
        super().__init__()
        self.q_head, self.bc_head, self.threshold = q_head, bc_head, float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return masked_q(self.q_head(x), discrete_bcq_mask(self.bc_head(x), self.threshold))

    def act_unit(
        self, x: Tensor, deterministic: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        # deterministic either way: the greedy action is the policy
        return self(x).argmax(dim=-1)


def build_discrete_bcq(arch: dict[str, Any]) -> DiscreteBCQPolicyNet:
    act = arch.get("activation", "relu")
    obs_dim, act_dim, hidden = arch["obs_dim"], arch["act_dim"], arch["hidden"]
    return DiscreteBCQPolicyNet(
        nets.DiscreteHead(obs_dim, act_dim, hidden, act),
        nets.DiscreteHead(obs_dim, act_dim, arch.get("bc_hidden", hidden), act),
        arch["threshold"],
    )


# -- continuous BCQ ------------------------------------------------------------------------------
class VAEDecoder(nn.Module):
    """The generative half of BCQ's conditional VAE: (s, z) → action in (−1, 1)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden: Sequence[int],
        latent_clip: float = 0.5,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_dim, self.latent_clip = latent_dim, float(latent_clip)
        self.net = nets.mlp(obs_dim + latent_dim, act_dim, hidden, activation, output_activation="tanh")

    def forward(self, obs: Tensor, z: Tensor) -> Tensor:  # (N, obs_dim), (N, L) -> (N, A)
        return self.net(torch.cat([obs, z], dim=-1))

    def prior_latents(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Standard normal latents clipped to ±latent_clip (the paper's decoding without an encoder)."""
        z = nets.randn((*shape, self.latent_dim), generator, device)
        return z.clamp(-self.latent_clip, self.latent_clip)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One decoded action per row from clipped prior latents: (N, obs_dim) -> (N, A)."""
        return self(obs, self.prior_latents((obs.shape[0],), generator, obs.device))


class PerturbationActor(nn.Module):
    """ξ(s, a): a + Φ·tanh(MLP(s, a)), clamped to [−1, 1]; Φ bounds how far it moves the VAE's action."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden: Sequence[int], phi: float, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.phi = float(phi)
        self.net = nets.mlp(obs_dim + act_dim, act_dim, hidden, activation, output_activation="tanh")

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:  # (N, obs_dim), (N, A) -> (N, A)
        return (actions + self.phi * self.net(torch.cat([obs, actions], dim=-1))).clamp(-1.0, 1.0)


class ContinuousBCQPolicyNet(nn.Module):
    """Continuous BCQ's policy: decode ``n`` candidate actions per state, perturb them, keep the one
    with the highest first-critic value. All candidates go through each network as one batch.

    ``deterministic=True`` draws the latents from a generator seeded afresh with
    ``DETERMINISTIC_LATENT_SEED`` on every call, and shares them across the rows: the action is then
    a fixed function of the observation (independent of the batch it comes in). Otherwise the
    latents come from the policy's generator, independently per row.
    """

    def __init__(
        self, decoder: VAEDecoder, actor: PerturbationActor, critic: nets.QEnsemble, n_actions: int
    ) -> None:
        super().__init__()
        self.decoder, self.actor, self.critic, self.n_actions = decoder, actor, critic, int(n_actions)

    def candidates(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Perturbed decoded actions and their Q1: (B, obs_dim), (B, n, L) -> (B, n, A), (B, n)."""
        batch, n = z.shape[0], z.shape[1]
        obs = x.unsqueeze(1).expand(-1, n, -1).reshape(batch * n, -1)
        actions = self.actor(obs, self.decoder(obs, z.reshape(batch * n, -1)))
        q1 = self.critic(obs, actions)[0]  # (B·n,)
        return actions.view(batch, n, -1), q1.view(batch, n)

    def forward(self, x: Tensor) -> Tensor:
        return self.act_unit(x, deterministic=True)

    def act_unit(
        self, x: Tensor, deterministic: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        if deterministic:
            fixed = torch.Generator(x.device).manual_seed(DETERMINISTIC_LATENT_SEED)
            z = self.decoder.prior_latents((self.n_actions,), fixed, x.device)
            z = z.unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            z = self.decoder.prior_latents((x.shape[0], self.n_actions), generator, x.device)
        actions, q1 = self.candidates(x, z)
        best = q1.argmax(dim=1)  # (B,)
        return actions[torch.arange(x.shape[0], device=x.device), best]


def build_continuous_bcq(arch: dict[str, Any]) -> ContinuousBCQPolicyNet:
    act = arch.get("activation", "relu")
    obs_dim, act_dim = arch["obs_dim"], arch["act_dim"]
    return ContinuousBCQPolicyNet(
        VAEDecoder(obs_dim, act_dim, arch["latent_dim"], arch["decoder_hidden"], arch["latent_clip"], act),
        PerturbationActor(obs_dim, act_dim, arch["hidden"], arch["phi"], act),
        nets.QEnsemble(arch["n_critics"], obs_dim, act_dim, arch["critic_hidden"], act),
        arch["n_actions"],
    )
