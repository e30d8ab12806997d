"""Trained policies as self-contained artefacts: weights as safetensors, everything else as JSON.

A policy artefact is a folder with ``policy.json`` (kind, architecture, spaces, offrl version) and
``policy.safetensors`` (network weights, observation normaliser, action scaling). Loading needs
only :mod:`offrl.nets`, never the training code, and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offrl import nets
from offrl.audit.ood import TENSOR_PREFIX as OOD_PREFIX
from offrl.audit.ood import OODMonitor
from offrl.audit.ood import summary as ood_summary
from offrl.checkpoint import (
    Fields,
    FileContentError,
    WeightsFileError,
    read_json,
    read_tensors,
    write_tensors,
)
from offrl.errors import CheckpointError, OfflineRLError
from offrl.policies.modules import build_continuous_bcq, build_discrete_bcq
from offrl.preprocess import ActionScaler, ObsNormalizer
from offrl.spaces import space_from_dict, space_to_dict
from offrl.utils import WriteError, atomic_path, replace_folder, staging_folder

ARTIFACT_VERSION = 1
POLICY_JSON = "policy.json"
POLICY_WEIGHTS = "policy.safetensors"
ARTIFACT_FILES = (POLICY_JSON, POLICY_WEIGHTS)


class ObservationShapeError(OfflineRLError, ValueError):
    """An observation given to a policy has neither the observation space's shape (one observation) nor
    ``(N, *shape)`` (a batch); the message names both shapes."""


class PolicyFileError(FileContentError, CheckpointError):
    """An artefact's ``policy.json`` is not JSON, not an object, or lacks a field or holds one of the
    wrong type (the message names the file and the field)."""


def _build_deterministic(a: dict[str, Any]) -> nn.Module:
    return nets.DeterministicActor(a["obs_dim"], a["act_dim"], a["hidden"], a.get("activation", "relu"))


def _build_tanh_gaussian(a: dict[str, Any]) -> nn.Module:
    return nets.TanhGaussianActor(a["obs_dim"], a["act_dim"], a["hidden"], a.get("activation", "relu"))


def _build_discrete(a: dict[str, Any]) -> nn.Module:
    return nets.DiscreteHead(a["obs_dim"], a["act_dim"], a["hidden"], a.get("activation", "relu"))


# kind → (builder from the architecture dict, acts stochastically when asked). A module with an
# ``act_unit(x, deterministic=..., generator=...)`` method chooses its own actions (composite policies);
# its classes live outside the training code (offrl.nets or offrl.policies) so artefacts load without it.
POLICY_KINDS: dict[str, tuple[Callable[[dict[str, Any]], nn.Module], bool]] = {
    "deterministic": (_build_deterministic, False),  # obs → tanh action
    "tanh_gaussian": (_build_tanh_gaussian, True),  # obs → squashed Gaussian
    "categorical": (_build_discrete, True),  # obs → logits
    "q_greedy": (_build_discrete, False),  # obs → Q-values, argmax
    "bcq": (build_continuous_bcq, False),  # obs → best of n perturbed VAE actions by Q1
    "bcq_discrete": (build_discrete_bcq, False),  # obs → argmax Q over imitation-allowed actions
}


class TorchPolicy:
    """A network plus everything needed to act in the environment's own units.

    ``act`` normalises observations, runs the network, maps actions from [−1, 1] back into the
    Box bounds (or shifts Discrete indices by the space's start) and returns numpy.
    """

    def __init__(
        self,
        kind: str,
        net: nn.Module,
        arch: dict[str, Any],
        normalizer: ObsNormalizer,
        scaler: ActionScaler | None,
        observation_space: gym.Space,
        action_space: gym.Space,
        *,
        seed: int | None = None,
    ) -> None:
        if kind not in POLICY_KINDS:
            raise CheckpointError(f"unknown policy kind {kind!r}; known: {', '.join(POLICY_KINDS)}")
        self.kind, self.net, self.arch = kind, net, dict(arch)
        self.normalizer, self.scaler = normalizer, scaler
        self.observation_space, self.action_space = observation_space, action_space
        self.is_stochastic = POLICY_KINDS[kind][1]
        self.std_scale = 1.0  # tanh_gaussian: scales the sampling std (see set_std_scale)
        self.device = next(net.parameters()).device
        self.generator = torch.Generator(self.device)
        self.seed(seed)
        self.ood_monitor: OODMonitor | None = None  # saved with the artefact when set (offrl.audit.ood)

    def __repr__(self) -> str:
        return f"TorchPolicy({self.kind}, hidden={self.arch.get('hidden')})"

    def seed(self, seed: int | None) -> None:
        """Seed the sampling of stochastic actions (None: from the OS)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def set_std_scale(self, scale: float) -> TorchPolicy:
        """Sample from the policy's Gaussian with its std multiplied by ``scale`` (log-probabilities are
        those of the scaled distribution); e.g. a data-collection policy less noisy than the learned one."""
        if self.kind != "tanh_gaussian":
            raise CheckpointError(f"std_scale applies to tanh_gaussian policies, not {self.kind}")
        if not scale > 0.0:
            raise CheckpointError(f"std_scale must be positive, got {scale}")
        self.std_scale = float(scale)
        return self

    def _batch(self, obs: np.ndarray | Tensor) -> tuple[Tensor, bool]:
        """``obs`` as a batch on the device, and whether it was one unbatched observation: the
        observation space's shape is one observation, ``(N, *shape)`` (or ``(N, flat size)``) a batch;
        any other shape is an :class:`ObservationShapeError` naming the expected and the given shape."""
        x = torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs, device=self.device)
        shape = tuple(self.observation_space.shape or ())
        given = tuple(x.shape)
        if given == shape:
            return x.unsqueeze(0), True
        flat = int(self.arch.get("obs_dim", int(np.prod(shape))))
        if x.dim() >= 1 and (given[1:] == shape or given[1:] == (flat,)):
            return x, False
        batch = "(" + ", ".join(["N", *map(str, shape)]) + ")"
        raise ObservationShapeError(
            f"observation of shape {given} does not fit the policy's observation space: expected {shape} "
            f"(one observation) or {batch} (a batch of N)"
        )

    def _obs(self, obs: Tensor) -> Tensor:
        return self.normalizer(obs.reshape(obs.shape[0], -1).float())

    def _to_env(self, actions: Tensor) -> np.ndarray:
        if isinstance(self.action_space, gym.spaces.Discrete):
            return (actions.long() + int(self.action_space.start)).cpu().numpy()
        assert self.scaler is not None and isinstance(self.action_space, gym.spaces.Box)
        out = self.scaler.from_unit(actions).cpu().numpy().astype(self.action_space.dtype)
        return out.reshape(out.shape[0], *self.action_space.shape)

    @torch.no_grad()
    def act_tensor(self, obs: Tensor, *, deterministic: bool = True) -> Tensor:
        """Actions in learning units ([−1, 1] or 0-based indices) for raw observations on the device."""
        x = self.normalizer(obs.reshape(obs.shape[0], -1).float())
        if self.kind == "deterministic":
            return self.net(x)
        if self.kind == "tanh_gaussian":
            actor: nets.TanhGaussianActor = self.net  # type: ignore[assignment]
            return actor.mode(x) if deterministic else actor.sample(x, self.generator, self.std_scale)[0]
        if hasattr(self.net, "act_unit"):  # composite policies (e.g. BCQ) decide for themselves
            return self.net.act_unit(x, deterministic=deterministic, generator=self.generator)  # type: ignore[operator]
        scores = self.net(x)
        if self.kind == "q_greedy" or deterministic:
            return scores.argmax(-1)
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator).squeeze(-1)

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        """Actions in environment units for a batch ``(N, *obs_shape)`` of observations, or the one
        action (no batch axis) for one observation of the observation space's shape."""
        obs_t, single = self._batch(obs)
        out = self._to_env(self.act_tensor(obs_t, deterministic=deterministic))
        return out.reshape(out.shape[1:]) if single else out

    @torch.no_grad()
    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Log-probability (density for Box actions, in the environment's units) of given actions: one per
        row of a batch of observations, or one (a 0-d array) for one unbatched observation and action."""
        if not self.is_stochastic:
            raise CheckpointError(f"a {self.kind} policy is deterministic and has no log-probabilities")
        obs_t, single = self._batch(obs)
        x = self._obs(obs_t)
        if self.kind == "tanh_gaussian":
            assert self.scaler is not None
            a = torch.as_tensor(np.asarray(actions), device=self.device).float().reshape(x.shape[0], -1)
            actor: nets.TanhGaussianActor = self.net  # type: ignore[assignment]
            lp = (
                actor.log_prob(x, self.scaler.to_unit(a), std_scale=self.std_scale)
                - self.scaler.log_abs_det()
            )
        else:
            idx = torch.as_tensor(np.asarray(actions), device=self.device).long().reshape(-1)
            idx = idx - int(getattr(self.action_space, "start", 0))
            lp = torch.log_softmax(self.net(x), -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        out = lp.cpu().numpy().astype(np.float32)
        return out.reshape(()) if single else out

    # -- out-of-distribution monitor ---------------------------------------------------------------
    def ood_score(self, obs: np.ndarray) -> np.ndarray:
        """One OOD score per observation (one observation or a batch): distance to the training data's
        states (see :mod:`offrl.audit.ood`); above :attr:`ood_threshold` is unusual for the dataset."""
        if self.ood_monitor is None:
            raise CheckpointError("this policy carries no OOD monitor (no monitor)")
        return self.ood_monitor.score(obs)

    @property
    def ood_threshold(self) -> float:
        if self.ood_monitor is None:
            raise CheckpointError("this policy carries no OOD monitor (no monitor)")
        return self.ood_monitor.threshold

    def ood_summary(self) -> str:
        """One line: the monitor and its threshold, or "no monitor"."""
        return ood_summary(self.ood_monitor)

    # -- artefact ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        out.update({f"normalizer.{k}": v for k, v in self.normalizer.state_dict().items()})
        if self.scaler is not None:
            out.update({f"scaler.{k}": v for k, v in self.scaler.state_dict().items()})
        if self.ood_monitor is not None:
            out.update(self.ood_monitor.tensors())
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def describe(self) -> dict[str, Any]:
        from offrl import __version__

        return {
            "artifact_version": ARTIFACT_VERSION,
            "kind": self.kind,
            "arch": self.arch,
            "observation_space": space_to_dict(self.observation_space),
            "action_space": space_to_dict(self.action_space),
            "offrl_version": __version__,
            **({"ood_monitor": self.ood_monitor.describe()} if self.ood_monitor is not None else {}),
        }

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write the artefact folder atomically: both files are written in a hidden staging folder
        beside it, which then takes its place, so a reader never pairs the JSON of one save with the
        weights of another. A folder that holds other files too keeps them: there each file is
        replaced atomically, one after the other. A failed write raises :class:`offrl.utils.WriteError`."""
        folder = Path(path)
        if folder.is_dir() and any(p.name not in ARTIFACT_FILES for p in folder.iterdir()):
            self._write_files(folder, folder, extra)
            return folder
        staged = staging_folder(folder)
        try:
            self._write_files(staged, folder, extra)
            replace_folder(staged, folder)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return folder

    def _write_files(self, where: Path, folder: Path, extra: dict[str, Any] | None) -> None:
        """Write the weights, then the JSON, into ``where``; errors name them in ``folder``."""
        text = json.dumps({**self.describe(), **(extra or {})}, indent=2, sort_keys=True, allow_nan=False)
        for name in (POLICY_WEIGHTS, POLICY_JSON):
            try:
                with atomic_path(where / name) as tmp:
                    if name == POLICY_WEIGHTS:
                        write_tensors(self.tensors(), tmp, folder / name)
                    else:
                        tmp.write_text(text + "\n")
            except OSError as exc:
                raise WriteError(f"{folder / name}: could not be written ({exc.strerror or exc})") from None


def find_artifact(path: Path) -> Path:
    """Accept the artefact folder itself, or a run folder holding one under ``policy/``."""
    for candidate in (path, path / "policy"):
        if (candidate / POLICY_JSON).is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no policy artefact ('{POLICY_JSON}' not found there or in its 'policy/' folder)"
    )


def read_policy_json(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """An artefact's ``policy.json``, with the fields offrl reads checked (:class:`PolicyFileError`
    names the file and the field): ``kind``, ``arch``, the spaces, and the optional ``env_id`` and
    reference returns."""
    path = Path(folder) / POLICY_JSON
    doc = Fields(read_json(path, PolicyFileError), path, PolicyFileError)
    version = doc.integer("artifact_version", 0, minimum=0)
    if version > ARTIFACT_VERSION:
        raise CheckpointError(
            f"{folder}: artefact version {version} is newer than this offrl reads ({ARTIFACT_VERSION})"
        )
    kind = doc.text("kind")
    if kind not in POLICY_KINDS:
        raise doc.fail("kind", f"is {kind!r}, not a policy kind offrl knows ({', '.join(POLICY_KINDS)})")
    arch = doc.fields("arch")
    arch.integer("obs_dim", minimum=1)
    arch.integer("act_dim", minimum=1)
    for key in ("hidden", "critic_hidden", "decoder_hidden"):
        if key in arch.data:
            widths = arch.get(key, list, "a list of layer widths")
            if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
                raise arch.fail(key, f"is {widths!r}, expected a list of positive integer layer widths")
    arch.text("activation", "relu")
    for key in ("observation_space", "action_space"):
        doc.fields(key)
    doc.get("env_id", (str, type(None)), "a string (an environment id)", None)
    for key in ("ref_min_return", "ref_max_return"):
        doc.get(key, (int, float, type(None)), "a number", None)
    return doc.data


def load_policy(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", seed: int | None = None
) -> TorchPolicy:
    """Rebuild a policy from its artefact folder (or a run folder) without the training code.

    Every field read from ``policy.json`` is checked (:class:`PolicyFileError`), and the weights file
    must be a complete safetensors file without NaN or infinity (:class:`WeightsFileError`); nothing
    is ever unpickled."""
    folder = find_artifact(Path(path))
    meta = read_policy_json(folder)
    doc = Fields(meta, folder / POLICY_JSON, PolicyFileError)
    kind = str(meta["kind"])
    arch = meta["arch"]
    obs_space = doc.use("observation_space", space_from_dict)
    act_space = doc.use("action_space", space_from_dict)
    tensors = read_tensors(folder / POLICY_WEIGHTS, device)
    net = doc.use("arch", lambda a: POLICY_KINDS[kind][0](a).to(device))

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        net.load_state_dict(part("net."))
        normalizer = ObsNormalizer(arch["obs_dim"]).to(device)
        normalizer.load_state_dict(part("normalizer."))
        scaler = None
        if "scaler.low" in tensors:
            scaler = ActionScaler(tensors["scaler.low"], tensors["scaler.high"]).to(device)
    except (RuntimeError, KeyError) as exc:
        raise WeightsFileError(
            folder / POLICY_WEIGHTS, f"does not match the architecture in {POLICY_JSON} ({exc})"
        ) from None
    net.eval()
    policy = TorchPolicy(kind, net, arch, normalizer, scaler, obs_space, act_space, seed=seed)
    if "ood_monitor" in meta:  # artefacts written before monitors existed have none
        fields = doc.fields("ood_monitor").data
        policy.ood_monitor = OODMonitor.from_artifact(
            fields, {k: v for k, v in tensors.items() if k.startswith(OOD_PREFIX)}, str(folder / POLICY_JSON)
        )
    return policy
