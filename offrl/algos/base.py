"""What every offline algorithm shares: spaces, preprocessing, its own RNG, optimiser plumbing,
state (de)serialisation and export of its acting policy. Algorithms only update; the trainer loops.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, cast

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offrl import nets
from offrl.data.dataset import TransitionDataset
from offrl.errors import CheckpointError, ConfigError
from offrl.fast.graphs import CudaGraphSteps
from offrl.fast.optim import adam
from offrl.fast.packing import backward, clip_grad_norm
from offrl.fast.runner import StepRunner
from offrl.policies.artifact import TorchPolicy
from offrl.preprocess import ActionScaler, ObsNormalizer
from offrl.runtime import Runtime
from offrl.types import Batch


def flat_obs_dim(space: gym.Space) -> int:
    if not isinstance(space, gym.spaces.Box):
        raise ConfigError(f"observations must be a Box space, got {space}")
    return int(np.prod(space.shape))


class Algorithm:
    """Base of every algorithm, offline and online.

    A subclass declares ``name``, ``discrete`` and ``Config``, and implements three methods:
    :meth:`build` (networks into ``self.nets``, a ModuleDict whose state is the model, and optimisers
    declared with :meth:`optimize`), :meth:`update` and :meth:`policy`. The base owns construction:
    spaces, the normaliser and action scaler, the RNG, the device move, the optimisers and the counters.
    Batches given to :meth:`update` are in *learning units*: observations normalised, continuous
    actions in [−1, 1], discrete actions 0-based; :meth:`prepare_dataset` converts a dataset once.
    """

    name: ClassVar[str]
    discrete: ClassVar[bool]
    Config: ClassVar[type]
    online: ClassVar[bool] = False  # trained by the online loop (``OnlineAlgorithm``), not from a dataset
    # whose update steps (run through ``_run_step``) are checked to replay correctly as CUDA graphs
    cuda_graph_safe: ClassVar[bool] = False
    # whose reference steps are checked to run under torch.compile (the runtime's ``compile``)
    compile_safe: ClassVar[bool] = False
    # whose batches carry the rows' Monte-Carlo returns-to-go (``Batch.returns``, from prepare_dataset)
    needs_returns: ClassVar[bool] = False
    # how an offline algorithm continues online (``offrl finetune``, docs/finetune.md); None: it does not
    online_form: ClassVar[str | None] = None
    # the share of each fine-tuning batch from the offline data; None: uniform over offline and online rows
    online_offline_ratio: ClassVar[float | None] = None

    def __init__(
        self,
        config: Any,
        observation_space: gym.Space,
        action_space: gym.Space,
        *,
        normalizer: ObsNormalizer | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        runtime: Runtime | None = None,
    ) -> None:
        is_discrete = isinstance(action_space, gym.spaces.Discrete)
        if is_discrete != self.discrete:
            kind = "discrete" if is_discrete else "continuous"
            raise ConfigError(
                f"algorithm '{self.name}' has no {kind} variant for action space {action_space}"
            )
        self.config = config
        self.runtime = runtime if runtime is not None else Runtime()
        self.observation_space = observation_space
        self.action_space = action_space
        self.device = torch.device(device)
        self.obs_dim = flat_obs_dim(observation_space)
        self.act_dim = (
            int(action_space.n)
            if isinstance(action_space, gym.spaces.Discrete)
            else int(
                np.prod(action_space.shape)  # type: ignore[arg-type]
            )
        )
        self.seed = seed
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # Parameter initialisation draws from torch's global RNG; seed it so that the same seed
        # builds the same networks, whatever ran before in this process.
        torch.manual_seed(seed)
        self.nets = nn.ModuleDict()
        self.nets["normalizer"] = normalizer if normalizer is not None else ObsNormalizer(self.obs_dim)
        if not is_discrete:
            self.nets["action_scaler"] = ActionScaler.from_space(action_space)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.num_updates = 0
        self._acting_policy: TorchPolicy | None = None
        self.cuda_graphs = self.runtime.cuda_graphs
        self._graph_steps: CudaGraphSteps | None = None
        self._runner: StepRunner | None = None
        self._optimizer_specs: list[tuple[str, tuple[nn.Module, ...], float, dict[str, Any]]] = []
        self.build()
        self.nets.to(self.device)
        # optimisers are made after the move: fused and capturable Adam depend on the parameters' device
        for opt_name, modules, lr, kwargs in self._optimizer_specs:
            params = [p for m in modules for p in m.parameters()]
            self.optimizers[opt_name] = adam(params, lr, **kwargs)
        self._optimizer_specs.clear()

    # -- to implement ----------------------------------------------------------------------------
    def build(self) -> None:
        """Create the networks in ``self.nets`` (on the CPU: the base moves them to the device) and declare
        the optimisers with :meth:`optimize`. ``self.config``, the spaces' dimensions, ``self.runtime``
        and the normaliser are set; the global torch RNG is seeded, so the same seed builds the same
        networks."""
        raise NotImplementedError

    def optimize(self, name: str, *modules: nn.Module, lr: float, **kwargs: Any) -> None:
        """Declare the Adam optimiser ``name`` (see :func:`adam`) of the parameters of ``modules``; it is
        made once the networks are on the device, in declaration order."""
        self._optimizer_specs.append((name, modules, lr, kwargs))

    def update(self, batch: Batch) -> dict[str, Tensor]:
        """One gradient step on a batch (in learning units offline; online algorithms normalise inside):
        the reference step :meth:`_step` with the host-side arguments of :meth:`step_args`, run as the
        runtime says; then the update counter; then :meth:`after_update`. Returns detached scalar
        tensors (no host sync)."""
        metrics = self._run_step(self._step, batch, *self.step_args())
        self.num_updates += 1
        return self.after_update(metrics)

    def _step(self, batch: Batch, *args: Any) -> dict[str, Tensor]:
        """The reference update, the definition of the algorithm's maths: losses, optimiser steps, soft
        target updates; detached scalar metrics. It runs on the device only: no host sync, no branch on
        a tensor's value, and host-side counters stay outside (it may be compiled or graphed)."""
        raise NotImplementedError

    def step_args(self) -> tuple[Any, ...]:
        """Host-side arguments of this update's :meth:`_step` (e.g. a phase flag from ``num_updates``)."""
        return ()

    def after_update(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Host-side work after a step, ``num_updates`` already counting it (e.g. hard target copies)."""
        return metrics

    def policy(self) -> TorchPolicy:
        """The acting policy, sharing this algorithm's live networks."""
        raise NotImplementedError

    def _run_step(self, fn: Callable[..., dict[str, Tensor]], batch: Batch, *args: Any) -> dict[str, Tensor]:
        """``fn(batch, *args)``: the part of an update that runs on the device, as the runtime says
        (:class:`offrl.fast.runner.StepRunner`: a registered fast step in place of ``self._step``,
        compile, precision). On CUDA, for algorithms marked ``cuda_graph_safe``, it is captured once and
        replayed as a CUDA graph (``args`` must be hashable settings such as a phase flag: each value gets
        its own graph)."""
        if self._runner is None or self._runner.runtime is not self.runtime:
            self._runner = StepRunner(self)
        run = self._runner.step(fn)
        if not (self.cuda_graphs and self.cuda_graph_safe and batch.obs.is_cuda):
            return run(batch, *args)
        if self._graph_steps is None:
            if not CudaGraphSteps.supported():
                return run(batch, *args)
            self._graph_steps = CudaGraphSteps([self.generator])
        return self._graph_steps.run(run, batch, args)

    def target_networks(self) -> Iterable[nn.Module]:
        """Networks that must never receive gradients (for the contract tests)."""
        return ()

    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        """Online fine-tuning: exploratory actions for (N, obs_dim) observations in learning units, in
        learning units. ``exploration``: the algorithm's knob (Gaussian noise, ε), None: its default.
        Only algorithms with an ``online_form`` implement it."""
        raise NotImplementedError(f"{self.name} has no online form")

    def online_settings(self, progress: float) -> dict[str, Any]:
        """Online fine-tuning: config values that differ from the offline run's, at ``progress`` in [0, 1]
        of the fine-tuning (e.g. a BC weight decayed to 0); none by default: the same losses online."""
        return {}

    def q_values(self, obs: Tensor, actions: Tensor) -> Tensor | None:
        """The algorithm's Q estimate of (s, a) in learning units, (B, obs_dim), (B, A) | (B,) -> (B,), for
        the ``diag/`` metrics (:mod:`offrl.diagnostics`); None where it has no Q-function."""
        return None

    # -- shared ----------------------------------------------------------------------------------
    @property
    def normalizer(self) -> ObsNormalizer:
        return self.nets["normalizer"]  # type: ignore[return-value]

    @property
    def action_scaler(self) -> ActionScaler | None:
        scaler = self.nets["action_scaler"] if "action_scaler" in self.nets else None  # noqa: SIM401
        return scaler  # type: ignore[return-value]

    def _policy(
        self, kind: str, net: nn.Module, hidden: Iterable[int], activation: str = "relu"
    ) -> TorchPolicy:
        arch = {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "hidden": list(hidden),
            "activation": activation,
        }
        return TorchPolicy(
            kind,
            net,
            arch,
            self.normalizer,
            self.action_scaler,
            self.observation_space,
            self.action_space,
            seed=self.seed,
        )

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        # One acting policy per algorithm: it shares the live networks and keeps its own sampling
        # generator, so stochastic acting neither repeats draws nor disturbs the training RNG.
        if self._acting_policy is None:
            self._acting_policy = self.policy()
        return self._acting_policy.act(obs, deterministic=deterministic)

    def prepare_dataset(self, dataset: TransitionDataset) -> TransitionDataset:
        """A view of ``dataset`` in learning units (normalised observations, scaled actions), made once."""
        with torch.no_grad():
            norm = self.normalizer.to(dataset.device)
            obs = norm(dataset.observations.float().reshape(len(dataset), -1))
            next_obs = norm(dataset.next_observations.float().reshape(len(dataset), -1))
            actions = dataset.actions
            scaler = self.action_scaler
            if scaler is not None:
                actions = scaler.to(dataset.device).to_unit(actions).clamp(-1.0, 1.0)
        return dataset.with_tensors(observations=obs, next_observations=next_obs, actions=actions)

    def to(self, device: str | torch.device) -> Algorithm:
        self.device = torch.device(device)
        self.nets.to(self.device)
        self._graph_steps = None  # graphs captured on the old storage would be stale
        return self

    def train_mode(self, mode: bool = True) -> None:
        self.nets.train(mode)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything learning needs to continue exactly: networks, optimisers, RNG, counters."""
        return {
            "nets": self.nets.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "generator": self.generator.get_state(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._graph_steps = None  # optimiser state is replaced: captured graphs would point at old storage
        try:
            self.nets.load_state_dict(state["nets"])
            missing = set(self.optimizers) ^ set(state["optimizers"])
            if missing:
                raise CheckpointError(f"optimiser names differ: {sorted(missing)}")
            for k, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][k])
            self.generator.set_state(state["generator"].cpu())  # generator states are CPU byte tensors
            self.num_updates = int(state["num_updates"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"state does not fit algorithm '{self.name}' ({exc})") from None


class ActorCritic(Algorithm):
    """Accessors shared by actor-critic algorithms: a Q-ensemble ``nets["critic"]`` with its Polyak
    target ``nets["critic_target"]``, and an ``actor_target`` where the algorithm keeps one."""

    @property
    def critic(self) -> nets.QEnsemble:
        return cast(nets.QEnsemble, self.nets["critic"])

    @property
    def critic_target(self) -> nets.QEnsemble:
        return cast(nets.QEnsemble, self.nets["critic_target"])

    def target_networks(self) -> list[nn.Module]:
        return [self.nets[k] for k in ("actor_target", "critic_target") if k in self.nets]

    def q_values(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.critic(obs, actions).min(0).values  # the ensemble's minimum, as the targets use

    def build_critics(self, n_critics: int, hidden: Sequence[int], layer_norm: bool = False) -> None:
        """``nets["critic"]``, an ensemble of ``n_critics`` Q(s, a) networks, and ``nets["critic_target"]``,
        a frozen copy of it (built as a second ensemble, then copied: initialisation draws as for two)."""
        self.nets["critic"] = nets.QEnsemble(
            n_critics, self.obs_dim, self.act_dim, hidden, layer_norm=layer_norm
        )
        self.nets["critic_target"] = nets.freeze(
            nets.QEnsemble(n_critics, self.obs_dim, self.act_dim, hidden, layer_norm=layer_norm)
        )
        nets.hard_update(self.nets["critic_target"], self.nets["critic"])


class DiscreteQ(Algorithm):
    """What the offline Q-learners on discrete actions share (CQL, BCQ): a Q-network over all actions
    ``nets["q"]`` and its frozen copy ``nets["q_target"]``, copied every ``target_update_interval``
    steps (``config.target_update == "hard"``) or Polyak-averaged with ``tau`` in the step ("soft"); their
    configs carry ``target_update``, ``target_update_interval`` and ``tau``."""

    @property
    def q(self) -> nets.DiscreteHead:
        return cast(nets.DiscreteHead, self.nets["q"])

    @property
    def q_target(self) -> nets.DiscreteHead:
        return cast(nets.DiscreteHead, self.nets["q_target"])

    def build_q(self, hidden: Sequence[int]) -> None:
        """``nets["q"]`` and ``nets["q_target"]``, a frozen copy of it (no second initialisation draw)."""
        q = nets.DiscreteHead(self.obs_dim, self.act_dim, hidden)
        self.nets["q"] = q
        self.nets["q_target"] = nets.freeze(copy.deepcopy(q))

    def target_networks(self) -> list[nn.Module]:
        return [self.q_target]

    def q_values(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.q(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)

    def soft_update_target(self) -> None:
        """The per-step Polyak update, in ``_step`` (device-only work: it may be compiled or graphed)."""
        if self.config.target_update == "soft":
            nets.soft_update(self.q_target, self.q, self.config.tau)

    def after_update(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config  # a host-side counter: the interval check needs no device sync
        if cfg.target_update == "hard" and self.num_updates % cfg.target_update_interval == 0:
            nets.hard_update(self.q_target, self.q)
        return metrics


class GaussianActorCritic(ActorCritic):
    """An actor-critic whose policy is the tanh-Gaussian ``nets["actor"]`` (SAC-style: CQL, AWAC, SAC)."""

    @property
    def actor(self) -> nets.TanhGaussianActor:
        return cast(nets.TanhGaussianActor, self.nets["actor"])

    def policy(self) -> TorchPolicy:
        return self._policy("tanh_gaussian", self.actor, self.config.actor_hidden)

    @torch.no_grad()
    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        return self.actor.sample(obs, self.generator)[0]  # the stochastic policy explores by itself


def step(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    params: Iterable[nn.Parameter] | None = None,
    max_grad_norm: float | None = None,
) -> None:
    """zero_grad → backward → optional clip → step, in one call."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    if max_grad_norm is not None and params is not None:
        clip_grad_norm(list(params), max_grad_norm)
    optimizer.step()
