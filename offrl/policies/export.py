"""Policies out of offrl: one self-contained graph from raw observations to actions in environment units.

:class:`DeployedPolicy` is the whole of ``TorchPolicy.act(obs, deterministic=True)`` as one module: the
observation normaliser, the network, the deterministic choice (tanh of a deterministic actor, the mode of a
tanh-Gaussian, argmax of logits or Q-values, BCQ's best candidate) and the action scaling (or the Discrete
space's start). :func:`export_policy` saves it as

- ``onnx``: an ONNX model (opset 20 or newer) for onnxruntime and other ONNX runtimes, written by torch's
  dynamo exporter (needs the ``export`` extra: onnx, onnxscript, onnxruntime);
- ``pt2``: ``torch.export``'s saved program, loaded with ``torch.export.load(FILE).module()`` (torch only).

The graph takes one input, ``observations`` of shape ``(N, *observation_shape)`` float32 with ``N``
dynamic, and returns one output, ``actions``: ``(N, *action_shape)`` in the action space's dtype for Box
actions, ``(N,)`` int64 for Discrete ones. TorchScript is not offered: ``torch.jit.trace`` and
``torch.jit.script`` are deprecated in the torch offrl pins and warn on every call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offrl import nets
from offrl.errors import OfflineRLError
from offrl.policies.artifact import POLICY_KINDS, TorchPolicy, load_policy
from offrl.policies.modules import DETERMINISTIC_LATENT_SEED, ContinuousBCQPolicyNet
from offrl.preprocess import ActionScaler, ObsNormalizer
from offrl.utils import WriteError, atomic_path

if TYPE_CHECKING:
    from offrl.audit.ood import OODMonitor

FORMATS = ("onnx", "pt2")
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "observations", "actions", "N"
OOD_OUTPUT_NAME = "ood_score"  # the optional second output (export with ood=True)
ONNX_OPSET = 20  # ArgMax with select_last_index (ties → lowest index, as torch.argmax)

# Every policy kind and what its exported graph computes; a kind missing here is refused with its reason
# (in REFUSED). Every kind of POLICY_KINDS appears in one of the two (tests check).
EXPORTED: dict[str, str] = {
    "deterministic": "the actor's tanh output",
    "tanh_gaussian": "the mode, tanh of the Gaussian's mean",
    "categorical": "argmax of the logits",
    "q_greedy": "argmax of the Q-values",
    "bcq": "the best of the n perturbed decoded candidates by the first critic, latents baked in as constants",
    "bcq_discrete": "argmax of the Q-values over the actions the imitation head allows",
}
REFUSED: dict[str, str] = {}


class ExportError(OfflineRLError):
    """A policy cannot be exported (its kind, a missing extra, a failed write); one line."""


def _plain(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` with every speed-layer kernel slot empty: the plain torch-op path, which
    computes the same function and exports (oneDNN's fused linear does not)."""
    out = copy.deepcopy(module).cpu().eval()
    for m in out.modules():
        if hasattr(m, "kernel"):
            m.kernel = None  # type: ignore[assignment]
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class OODScore(nn.Module):
    """The policy's out-of-distribution score (:meth:`TorchPolicy.ood_score`) as a module: the distance of
    standardised raw observations (N, obs_dim) to the monitor's nearest codeword, computed as the
    monitor computes it."""

    mean: Tensor  # (obs_dim,)
    inv_std: Tensor  # (obs_dim,)
    centroids_t: Tensor  # (obs_dim, codewords)
    c_sq: Tensor  # (codewords,) squared norms of the codewords

    def __init__(self, monitor: OODMonitor) -> None:
        super().__init__()
        centroids = torch.from_numpy(monitor.centroids.copy())
        std = torch.from_numpy(monitor.std.copy())
        self.register_buffer("mean", torch.from_numpy(monitor.mean.copy()))
        self.register_buffer("inv_std", 1.0 / std)
        self.register_buffer("centroids_t", centroids.t().contiguous())
        self.register_buffer("c_sq", (centroids.double() ** 2).sum(1).float())

    def forward(self, flat: Tensor) -> Tensor:
        z = (flat - self.mean) * self.inv_std
        d2 = (z * z).sum(1, keepdim=True) - 2.0 * (z @ self.centroids_t) + self.c_sq
        return d2.min(1).values.clamp_min(0.0).sqrt()


class DeployedPolicy(nn.Module):
    """``TorchPolicy.act(obs, deterministic=True)`` as one module on CPU: raw observations
    ``(N, *obs_shape)`` → actions in environment units, computed with the same ops in the same order."""

    latents: Tensor  # continuous BCQ: the deterministic action's latents, (n_actions, latent_dim)

    def __init__(self, policy: TorchPolicy, *, ood: bool = False) -> None:
        super().__init__()
        self.ood: OODScore | None = None
        if ood:
            if policy.ood_monitor is None:
                raise ExportError(
                    "the policy carries no OOD monitor (an artefact from before monitors, or trained with "
                    "train.ood_monitor=false), so there is no ood_score to export"
                )
            self.ood = OODScore(policy.ood_monitor)
        if policy.kind in REFUSED or policy.kind not in EXPORTED:
            reason = REFUSED.get(policy.kind, "offrl does not know how to export it")
            raise ExportError(f"a {policy.kind} policy cannot be exported: {reason}")
        self.kind = policy.kind
        self.net = _plain(policy.net)
        self.normalizer: ObsNormalizer = _plain(policy.normalizer)  # type: ignore[assignment]
        space = policy.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.scaler: ActionScaler | None = None
        if self.discrete:
            assert isinstance(space, gym.spaces.Discrete)
            self.start = int(space.start)
            self.action_shape: tuple[int, ...] = ()
            self.action_dtype = torch.int64
        else:
            if policy.scaler is None or not isinstance(space, gym.spaces.Box):
                raise ExportError(
                    f"a policy for actions in {space} cannot be exported: it has no action scaling"
                )
            self.scaler = _plain(policy.scaler)  # type: ignore[assignment]
            self.start = 0
            self.action_shape = tuple(space.shape)
            self.action_dtype = torch.from_numpy(space.low[:0]).dtype
        if isinstance(self.net, ContinuousBCQPolicyNet):
            # act_unit(deterministic=True) draws these from a generator seeded afresh on every call, on the
            # policy's device; drawn once here, they are constants of the graph
            fixed = torch.Generator(policy.device).manual_seed(DETERMINISTIC_LATENT_SEED)
            z = self.net.decoder.prior_latents((self.net.n_actions,), fixed, policy.device)
            self.register_buffer("latents", z.detach().cpu().clone())

    def unit_actions(self, x: Tensor) -> Tensor:
        """Normalised observations (N, obs_dim) → actions in learning units, as ``TorchPolicy.act_tensor``."""
        net = self.net
        if self.kind == "deterministic":
            return net(x)
        if self.kind == "tanh_gaussian":
            return cast(nets.TanhGaussianActor, net).mode(x)
        if isinstance(net, ContinuousBCQPolicyNet):
            batch = x.shape[0]
            z = self.latents.unsqueeze(0).expand(batch, -1, -1)
            actions, q1 = net.candidates(x, z)
            best = q1.argmax(dim=1)  # (B,): ties → the lowest index, as in act_unit
            index = best.view(batch, 1, 1).expand(batch, 1, actions.shape[-1])
            return actions.gather(1, index).squeeze(1)
        return net(x).argmax(-1)  # categorical, q_greedy, bcq_discrete (its forward masks the Q-values)

    def forward(self, observations: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        flat = observations.reshape(observations.shape[0], -1).float()
        unit = self.unit_actions(self.normalizer(flat))
        if self.scaler is None:
            actions = unit.long() + self.start
        else:
            out = self.scaler.from_unit(unit).to(self.action_dtype)
            actions = out.reshape(out.shape[0], *self.action_shape)
        return actions if self.ood is None else (actions, self.ood(flat))


def deployable(policy: TorchPolicy | str | os.PathLike[str], *, ood: bool = False) -> DeployedPolicy:
    """The :class:`DeployedPolicy` of a policy, or of the artefact in a policy or run folder; with
    ``ood``, it also returns the OOD score."""
    if not isinstance(policy, TorchPolicy):
        policy = load_policy(policy)
    return DeployedPolicy(policy, ood=ood).eval()


def _example(policy: TorchPolicy) -> Tensor:
    """Two observations (a batch of one would fix the batch size): the normaliser's mean, and a step away."""
    shape = tuple(policy.observation_space.shape or (int(policy.arch["obs_dim"]),))
    mean = policy.normalizer.mean.detach().cpu().float()
    first = mean.reshape(shape) if mean.numel() == int(torch.Size(shape).numel()) else torch.zeros(shape)
    return torch.stack([first, first + 0.5])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines, warnings and log records (e.g. of absent torchvision) stay out of
    the user's terminal; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _exported_program(model: DeployedPolicy, example: Tensor) -> torch.export.ExportedProgram:
    with _quiet(), torch.no_grad():
        return torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), strict=False
        )


def _pt2_bytes(model: DeployedPolicy, example: Tensor) -> bytes:
    buffer = io.BytesIO()
    with _quiet():
        torch.export.save(_exported_program(model, example), buffer)
    return buffer.getvalue()


def _onnx_bytes(model: DeployedPolicy, example: Tensor) -> bytes:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"--format onnx needs the 'export' extra (pip install \"offrl[export]\"): {exc.name} is not installed"
        ) from None
    with _quiet(), torch.no_grad():
        onnx_program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME] if model.ood is None else [OUTPUT_NAME, OOD_OUTPUT_NAME],
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
            report=False,
        )
        assert onnx_program is not None
        return onnx_program.model_proto.SerializeToString()


def signature(policy: TorchPolicy | str | os.PathLike[str], *, ood: bool = False) -> str:
    """The exported graph's input and output, e.g. ``observations (N, 3) float32 -> actions (N, 1) float32``."""
    if not isinstance(policy, TorchPolicy):
        policy = load_policy(policy)
    obs_shape = ", ".join(["N", *map(str, policy.observation_space.shape or ())])
    space = policy.action_space
    if isinstance(space, gym.spaces.Discrete):
        actions = f"(N) int64 in {int(space.start)}..{int(space.start) + int(space.n) - 1}"
    else:
        actions = "(" + ", ".join(["N", *map(str, space.shape or ())]) + f") {np.dtype(space.dtype).name}"
    out = f"{INPUT_NAME} ({obs_shape}) float32 -> {OUTPUT_NAME} {actions}"
    return out + (f", {OOD_OUTPUT_NAME} (N) float32" if ood else "")


def export_policy(
    policy: TorchPolicy | str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], *, ood: bool = False
) -> Path:
    """Write ``policy`` (a :class:`TorchPolicy`, or the path of a policy artefact or run folder) as one
    file in ``fmt`` (``"onnx"`` or ``"pt2"``) at ``out``, atomically. The file maps a batch of raw
    observations ``(N, *obs_shape)`` float32 to the deterministic actions in environment units that
    ``policy.act(obs)`` returns; with ``ood``, also the OOD score ``policy.ood_score(obs)`` (N,) as a second
    output, ``ood_score``. Returns ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not isinstance(policy, TorchPolicy):
        policy = load_policy(policy)
    model = deployable(policy, ood=ood)
    example = _example(policy)
    dest = Path(out)
    if dest.is_dir():
        raise ExportError(f"{dest}: is a folder; --out names the file to write")
    data = _pt2_bytes(model, example) if fmt == "pt2" else _onnx_bytes(model, example)
    try:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise WriteError(f"{dest}: could not be written ({exc.strerror or exc})") from None
    return dest


def _check_kinds() -> None:
    missing = set(POLICY_KINDS) - set(EXPORTED) - set(REFUSED)
    assert not missing, f"policy kinds neither exported nor refused: {sorted(missing)}"


_check_kinds()
