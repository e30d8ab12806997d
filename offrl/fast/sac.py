"""SAC's hand-written step: critic, actor and temperature steps through explicit passes."""

from __future__ import annotations

import torch
from torch import Tensor

from offrl import nets
from offrl.fast import hand, relu
from offrl.fast.optim import apply_gradients
from offrl.fast.registry import StepFn, register
from offrl.losses import soft_td_target
from offrl.online.sac import SAC
from offrl.types import Batch


def critic_loss_and_grad(q: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """SAC's critic loss and its gradient w.r.t. ``q``: (E,B), (B,) -> (), (E,B)."""
    diff = q - target
    return diff.pow(2).mean(-1).sum(), diff * (2.0 / q.shape[-1])


def actor_loss_and_grads(q_pi: Tensor, log_prob: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SAC's actor loss and its gradients w.r.t. ``q_pi`` and ``log_prob``: (E,B), (B,), () -> (),
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


@register(SAC)
def sac_step(algo: SAC, dtype: torch.dtype) -> StepFn | None:
    """SAC's ``_step`` as explicit passes: the same samples, losses and order of steps."""
    if algo.config.target_subset is not None and algo.config.target_subset < algo.config.n_critics:
        return None  # the random subset of critics is the reference step's
    actor_layers = hand.relu_linears(algo.actor.net)
    critic_layers = hand.relu_ensemble_linears(algo.critic.net)
    target_layers = hand.relu_ensemble_linears(algo.critic_target.net)
    if actor_layers is None or critic_layers is None or target_layers is None:
        return None
    cfg = algo.config
    actor_params, critic_params = hand.params(actor_layers), hand.params(critic_layers)

    def fast_step(batch: Batch) -> dict[str, Tensor]:
        obs, next_obs = algo.normalizer(batch.obs), algo.normalizer(batch.next_obs)
        b = obs.shape[0]
        # one actor pass over [s; s′]; only the s rows are kept for the backward
        actor_w, actor_b = hand.weights(actor_layers)
        out, actor_tape = relu.forward(actor_w, actor_b, torch.cat([obs, next_obs]), dtype, b)
        mean, raw_log_std = out.chunk(2, dim=-1)  # (2B, A) each
        log_std = raw_log_std.clamp(nets.LOG_STD_MIN, nets.LOG_STD_MAX)
        noise = torch.randn(mean.shape, generator=algo.generator, device=mean.device, dtype=mean.dtype)
        std = log_std.exp()
        u = mean + noise * std
        pi = torch.tanh(u)
        log_pi = nets.gaussian_log_prob(u, mean, log_std) - nets.tanh_log_det_jacobian(u).sum(-1)  # (2B,)
        log_alpha: Tensor = algo.nets["log_alpha"]()
        alpha = log_alpha.detach().exp()

        critic_w, critic_b = hand.weights(critic_layers)
        target_w, target_b = hand.weights(target_layers)
        next_q = relu.forward(target_w, target_b, torch.cat([next_obs, pi[b:]], 1), dtype, 0)[0]
        target = soft_td_target(
            batch.rewards, batch.terminals, next_q.squeeze(-1), log_pi[b:], alpha, cfg.gamma
        )
        q, critic_tape = relu.forward(critic_w, critic_b, torch.cat([obs, batch.actions], 1), dtype)
        q = q.squeeze(-1)  # (E, B)
        c_loss, g_q = critic_loss_and_grad(q, target)
        grads, _, _ = relu.backward(critic_tape, g_q.unsqueeze(-1), out=[p.grad for p in critic_params])
        hand.set_grads(critic_params, grads)
        apply_gradients(algo.optimizers["critic"], cfg.max_grad_norm)

        # the actor loss through the updated critics, their weights as constants
        critic_w, critic_b = hand.weights(critic_layers)
        q_pi, pi_tape = relu.forward(critic_w, critic_b, torch.cat([obs, pi[:b]], 1), dtype)
        a_loss, g_q_pi, g_log_pi = actor_loss_and_grads(q_pi.squeeze(-1), log_pi[:b], alpha)
        n = len(critic_layers)
        _, g_in, _ = relu.backward(
            pi_tape, g_q_pi.unsqueeze(-1), need_w=[False] * n, need_b=[False] * n, input_grad=True
        )
        assert g_in is not None
        g_out = tanh_gaussian_sample_grad(
            g_in[:, obs.shape[1] :], g_log_pi, pi[:b], noise[:b], std[:b], raw_log_std[:b]
        )
        grads, _, _ = relu.backward(actor_tape, g_out, out=[p.grad for p in actor_params])
        hand.set_grads(actor_params, grads)
        apply_gradients(algo.optimizers["actor"], cfg.max_grad_norm)
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
            log_alpha.grad = (entropy - algo.target_entropy).reshape(())
            metrics["alpha_loss"] = -(log_alpha.detach() * (algo.target_entropy - entropy))
            apply_gradients(algo.optimizers["alpha"])
        nets.soft_update(algo.critic_target, algo.critic, cfg.tau)
        return metrics

    return fast_step
