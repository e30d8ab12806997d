"""An out-of-distribution monitor small enough to travel inside a policy artefact.

The scorer is a **k-means codebook** over the training dataset's standardised states: the score of an
observation is its Euclidean distance, in dataset standard deviations per dimension, to the nearest of
K prototypes (K = 128 by default). It is a compressed 1-nearest-neighbour distance: unlike a single
Gaussian (Mahalanobis distance), it sees holes inside multimodal state distributions (a swing-up that
visits two separate regions, a behaviour mixture), and unlike keeping every state it costs K·D floats.

The threshold is the ``quantile`` (0.99) of the scores of dataset states *held out from the fit*
(whole episodes, ``calib_fraction`` of the rows), so about 1 % of fresh states from the data's own
distribution score above it; a policy whose visited states score above it far more often has left the
data. The monitor is stored as safetensors tensors (``ood.mean``, ``ood.std``, ``ood.centroids``) plus
JSON fields (``ood_monitor`` in ``policy.json``), never pickled, within ``size_cap`` bytes (1 MB): K is
reduced for wide observations, and no monitor is fitted when not even 8 prototypes fit.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offrl.errors import CheckpointError

MONITOR_KIND = "kmeans"
MONITOR_VERSION = 1
SIZE_CAP = 1 << 20  # bytes of tensors a monitor may add to an artefact
MIN_CODEWORDS = 8
TENSOR_PREFIX = "ood."
NO_MONITOR = "no monitor"


class OODMonitor:
    """Distance to the nearest codeword in standardised state space; ``threshold`` calibrated on held-out
    dataset states. Scoring is plain numpy (no torch dispatch): at batch 1 it costs a few microseconds."""

    def __init__(
        self, mean: np.ndarray, std: np.ndarray, centroids: np.ndarray, threshold: float, info: dict[str, Any]
    ):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        d = self.mean.shape[0]
        if self.std.shape != (d,) or self.centroids.ndim != 2 or self.centroids.shape[1] != d:
            raise CheckpointError(
                f"OOD monitor tensors disagree: mean {self.mean.shape}, std {self.std.shape}, "
                f"centroids {self.centroids.shape}"
            )
        if not (self.std > 0).all():
            raise CheckpointError("OOD monitor: 'ood.std' must be positive")
        self.threshold = float(threshold)
        self.info = dict(info)
        self._inv_std = (1.0 / self.std).astype(np.float32)
        self._c_sq = (self.centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self._ct = np.ascontiguousarray(self.centroids.T)

    @property
    def obs_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def codewords(self) -> int:
        return int(self.centroids.shape[0])

    def score(self, obs: Any) -> np.ndarray:
        """One score per observation: ``obs`` is one observation or a batch (leading axis)."""
        x = np.asarray(obs, dtype=np.float32)
        x = x.reshape(1, -1) if x.size == self.obs_dim or x.ndim == 0 else x.reshape(x.shape[0], -1)
        if x.shape[1] != self.obs_dim:
            raise CheckpointError(
                f"OOD monitor: observations of {x.shape[1]} values, the monitor expects {self.obs_dim}"
            )
        z = (x - self.mean) * self._inv_std
        d2 = (z * z).sum(1, keepdims=True) - 2.0 * (z @ self._ct) + self._c_sq
        return np.sqrt(np.maximum(d2.min(1), 0.0)).astype(np.float32)

    # -- artefact --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {
            f"{TENSOR_PREFIX}mean": torch.from_numpy(self.mean.copy()),
            f"{TENSOR_PREFIX}std": torch.from_numpy(self.std.copy()),
            f"{TENSOR_PREFIX}centroids": torch.from_numpy(self.centroids.copy()),
        }

    @property
    def nbytes(self) -> int:
        return int(self.mean.nbytes + self.std.nbytes + self.centroids.nbytes)

    def describe(self) -> dict[str, Any]:
        """The JSON fields stored under ``ood_monitor`` in ``policy.json``."""
        return {
            **self.info,
            "kind": MONITOR_KIND,
            "version": MONITOR_VERSION,
            "threshold": self.threshold,
            "codewords": self.codewords,
            "bytes": self.nbytes,
        }

    @classmethod
    def from_artifact(cls, fields: dict[str, Any], tensors: dict[str, Tensor], where: str) -> OODMonitor:
        kind = fields.get("kind")
        if kind != MONITOR_KIND:
            raise CheckpointError(f"{where}: 'ood_monitor' kind is {kind!r}, offrl knows {MONITOR_KIND!r}")
        threshold = fields.get("threshold")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise CheckpointError(
                f"{where}: 'ood_monitor' field 'threshold' is {threshold!r}, expected a finite number"
            )
        missing = [k for k in ("mean", "std", "centroids") if TENSOR_PREFIX + k not in tensors]
        if missing:
            raise CheckpointError(f"{where}: 'ood_monitor' is declared but tensors {missing} are missing")
        t = {
            k: tensors[TENSOR_PREFIX + k].detach().cpu().float().numpy() for k in ("mean", "std", "centroids")
        }
        return cls(t["mean"], t["std"], t["centroids"], float(threshold), fields)

    def summary(self) -> str:
        """One line: what the monitor is and how its threshold was set."""
        q = self.info.get("quantile")
        n = self.info.get("n_calib")
        how = f"{100 * q:g}th percentile of {n:,} held-out dataset states" if q and n else "calibrated"
        return (
            f"OOD monitor: distance to the nearest of {self.codewords} codewords over {self.obs_dim} "
            f"standardised state dims; threshold {self.threshold:.4g} ({how}); {self.nbytes:,} bytes"
        )


def summary(monitor: OODMonitor | None) -> str:
    """The one-line description of a policy's monitor, or ``"no monitor"``."""
    return NO_MONITOR if monitor is None else monitor.summary()


def _kmeans(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Lloyd's algorithm from a k-means++ start on a 4k-row candidate set; empty clusters restart at the
    point farthest from its codeword. ``x`` (N, D) float32 on CPU; returns (k, D)."""
    n = x.shape[0]
    cand = x[torch.randperm(n, generator=gen)[: min(n, 4096)]]
    first = int(torch.randint(cand.shape[0], (1,), generator=gen))
    cents = [cand[first]]
    d2 = ((cand - cand[first]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:
            nxt = int(torch.randint(cand.shape[0], (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
        cents.append(cand[nxt])
        d2 = torch.minimum(d2, ((cand - cand[nxt]) ** 2).sum(1))
    c = torch.stack(cents)
    for _ in range(iters):
        dist = _nearest(x, c)
        assign, dmin = dist
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        new = sums / counts.clamp(min=1).unsqueeze(1)
        if empty.any():
            far = torch.topk(dmin, int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, c, atol=1e-5):
            c = new
            break
        c = new
    return c


def _nearest(x: Tensor, c: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """(index, distance) of each row's nearest codeword, in row chunks (memory stays at chunk × k)."""
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = torch.cdist(x[s : s + chunk], c)
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values)
    return torch.cat(idx), torch.cat(dist)


def split_episodes(
    episode_ends: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row masks (first, second): whole episodes, chosen at random, go to ``second`` until it holds at
    least ``fraction`` of the rows; with fewer than 5 episodes, rows are split at random instead."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    n = int(ends[-1])
    second = np.zeros(n, dtype=bool)
    if ends.shape[0] < 5:
        second[rng.permutation(n)[: max(1, round(fraction * n))]] = True
        return ~second, second
    starts = np.concatenate([[0], ends[:-1]])
    taken = 0
    for e in rng.permutation(ends.shape[0]):
        if taken >= fraction * n:
            break
        second[starts[e] : ends[e]] = True
        taken += int(ends[e] - starts[e])
    return ~second, second


def fit_monitor(
    observations: np.ndarray | Tensor,
    episode_ends: np.ndarray | Tensor,
    *,
    codewords: int = 128,
    quantile: float = 0.99,
    calib_fraction: float = 0.2,
    max_fit_rows: int = 100_000,
    iters: int = 30,
    seed: int = 0,
    size_cap: int = SIZE_CAP,
) -> tuple[OODMonitor | None, str]:
    """Fit a monitor on a dataset's states; ``(monitor, message)`` where the message reports the fit cost
    or why no monitor was fitted. Uses its own random generators: the caller's RNG streams are untouched."""
    t0 = time.perf_counter()
    obs = torch.as_tensor(observations).detach().cpu()
    x_all = obs.reshape(obs.shape[0], -1).float()
    n, d = x_all.shape
    k = min(codewords, (size_cap - 8 * d) // (4 * d))
    if k < MIN_CODEWORDS:
        return (
            None,
            f"no OOD monitor: {d} observation values per state leave room for {max(k, 0)} codewords in {size_cap:,} bytes",
        )
    ends = torch.as_tensor(episode_ends).cpu().numpy().astype(np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x00D]))
    fit_mask, calib_mask = split_episodes(ends, calib_fraction, rng)
    x_fit, x_cal = x_all[torch.from_numpy(fit_mask)], x_all[torch.from_numpy(calib_mask)]
    if x_fit.shape[0] < 2 * k:
        k = max(1, x_fit.shape[0] // 2)
        if k < MIN_CODEWORDS:
            return None, f"no OOD monitor: {n} states are too few to fit one"
    mean = x_fit.double().mean(0)
    std = x_fit.double().std(0, unbiased=False)
    std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))
    mean32, std32 = mean.float(), std.float()
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    z_fit = (x_fit - mean32) / std32
    if z_fit.shape[0] > max_fit_rows:
        z_fit = z_fit[torch.randperm(z_fit.shape[0], generator=gen)[:max_fit_rows]]
    cents = _kmeans(z_fit, k, iters, gen)
    monitor = OODMonitor(mean32.numpy(), std32.numpy(), cents.numpy(), 0.0, {})
    cal_scores = monitor.score(x_cal.numpy())
    threshold = float(np.quantile(cal_scores, quantile))
    seconds = time.perf_counter() - t0
    info = {
        "quantile": quantile,
        "n_fit": int(x_fit.shape[0]),
        "n_calib": int(x_cal.shape[0]),
        "fit_seconds": round(seconds, 4),
        "seed": seed,
    }
    monitor = OODMonitor(mean32.numpy(), std32.numpy(), cents.numpy(), threshold, info)
    return monitor, (
        f"OOD monitor fitted in {seconds:.2f} s: {monitor.codewords} codewords on {info['n_fit']:,} states, "
        f"threshold {threshold:.4g} at the {100 * quantile:g}th percentile of {info['n_calib']:,} held-out states"
    )
