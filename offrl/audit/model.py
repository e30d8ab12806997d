"""The audit's anomaly model: a cross-fitted ensemble of one-step dynamics-and-reward predictors.

Why prediction error and not k-NN distance. A k-NN distance in normalised (s, a, r, s′) space measures
*rarity*: it scores the legitimately rare parts of a dataset (the tail of a medium-replay mixture, the
bottom of a swing-up) as high as broken rows, and a transition whose (s, a) is common but whose r or
s′ is wrong only stands out by the share of the distance that r or s′ carries. Prediction error asks
the question an audit cares about, *does this row obey the rule the rest of the data obeys*: a
reward spike, a glitched observation or an episode from an environment with other physics all break
the learned map (s, a) → (s′ − s, r), whatever their rarity. The same model also answers the
transition-consistency question (how predictable held-out data is), and its cost is linear in the
number of transitions (k-NN is quadratic, or approximate).

Cross-fitting: episodes are split into ``members`` folds; member m is trained on every fold but m
and scores fold m. Every transition is thus scored by a model that never saw it (a one-off anomaly
cannot be memorised away), and the residuals of all rows together are held-out residuals.

Scores, in robust standard units: each target dimension's held-out residual is divided by
1.4826 × its median absolute residual (floored at 0.01 data standard deviations); a transition's
score is the mean of the squared scaled residuals over the targets (about 1 for a typical row); its
``reward_z2`` and ``dynamics_score`` (mean over the s′ − s dimensions) are the two parts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offrl.data.format import RawDataset

RESIDUAL_FLOOR = 0.01  # data standard deviations


@dataclass(frozen=True)
class ModelConfig:
    members: int = 4  # folds = ensemble members
    hidden: int = 128
    layers: int = 2
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads while fitting (small nets: 1 is fastest; None: as set)


@dataclass
class ModelResult:
    score: np.ndarray  # (N,) mean squared robust z over targets
    reward_z2: np.ndarray  # (N,)
    dynamics_score: np.ndarray  # (N,)
    r2: np.ndarray  # (D + 1,) held-out R² per target (Δs dims, then reward); NaN for a constant one
    target_names: list[str]
    fold: np.ndarray  # (N,) fold of each row
    fit_seconds: float
    config: ModelConfig
    info: dict[str, float] = field(default_factory=dict)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std = np.where(std > 1e-8 * (1.0 + np.abs(mean)), std, 1.0)
    return ((x - mean) / std).astype(np.float32), mean, std


def features(raw: RawDataset) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``: inputs are standardised s and the action (one-hot for Discrete, scaled to
    [−1, 1] for bounded Box dims, standardised otherwise); targets are standardised s′ − s and r."""
    n = raw.num_transitions
    s = raw.observations.reshape(n, -1).astype(np.float32)
    s2 = raw.next_observations.reshape(n, -1).astype(np.float32)
    zs, _, _ = _standardise(s)
    space = raw.action_space
    if isinstance(space, gym.spaces.Discrete):
        a = np.zeros((n, int(space.n)), dtype=np.float32)
        a[np.arange(n), raw.actions.astype(np.int64).reshape(n) - int(space.start)] = 1.0
    else:
        a = raw.actions.reshape(n, -1).astype(np.float32)
        assert isinstance(space, gym.spaces.Box)
        low = np.asarray(space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(space.high, dtype=np.float64).reshape(-1)
        bounded = np.isfinite(low) & np.isfinite(high) & (high > low)
        za, _, _ = _standardise(a)
        unit = (2.0 * (a - np.where(bounded, low, 0.0)) / np.where(bounded, high - low, 1.0) - 1.0).astype(
            np.float32
        )
        a = np.where(bounded, unit, za).astype(np.float32)
    dz, _, _ = _standardise(s2 - s)
    rz, _, _ = _standardise(raw.rewards.astype(np.float32).reshape(n, 1))
    return np.concatenate([zs, a], 1), np.concatenate([dz, rz], 1)


class _Ensemble(nn.Module):
    """M independent ReLU MLPs evaluated together with batched matrix products: x (M, B, in) → (M, B, out)."""

    def __init__(self, members: int, d_in: int, d_out: int, hidden: int, layers: int, gen: torch.Generator):
        super().__init__()
        sizes = [d_in] + [hidden] * layers + [d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(sizes):
            bound = 1.0 / a**0.5
            self.weights.append(nn.Parameter((torch.rand(members, a, b, generator=gen) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(members, 1, b, generator=gen) * 2 - 1) * bound))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x

    def member(self, m: int, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b[m], x, w[m])
            if i < last:
                x = torch.relu(x)
        return x


def assign_folds(episode_ends: np.ndarray, members: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each row: whole episodes dealt at random (balanced by count); with fewer than 2 episodes
    per fold, contiguous row blocks instead."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    n = int(ends[-1])
    if ends.shape[0] < 2 * members:
        return np.minimum(np.arange(n) * members // max(n, 1), members - 1).astype(np.int64)
    ep_fold = np.empty(ends.shape[0], dtype=np.int64)
    ep_fold[rng.permutation(ends.shape[0])] = np.arange(ends.shape[0]) % members
    return np.repeat(ep_fold, np.diff(np.concatenate([[0], ends])))


def fit_and_score(raw: RawDataset, cfg: ModelConfig = ModelConfig()) -> ModelResult:
    """Fit the cross-fitted ensemble on ``raw`` and score every transition with its held-out member."""
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit_and_score(raw, cfg, t0)
    finally:
        torch.set_num_threads(old_threads)


def _fit_and_score(raw: RawDataset, cfg: ModelConfig, t0: float) -> ModelResult:
    x_np, y_np = features(raw)
    n, d_in = x_np.shape
    d_out = y_np.shape[1]
    m = cfg.members
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xA0D1]))
    fold = assign_folds(raw.episode_ends, m, rng)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    train_rows = [torch.from_numpy(np.flatnonzero(fold != k)) for k in range(m)]
    net = _Ensemble(m, d_in, d_out, cfg.hidden, cfg.layers, gen)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    for _ in range(cfg.steps):
        idx = torch.stack(
            [rows[torch.randint(rows.shape[0], (cfg.batch_size,), generator=gen)] for rows in train_rows]
        )
        pred = net(x[idx])
        loss = (pred - y[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    resid = np.empty_like(y_np)
    with torch.no_grad():
        for k in range(m):
            rows = np.flatnonzero(fold == k)
            for s in range(0, rows.shape[0], 65536):
                r = torch.from_numpy(rows[s : s + 65536])
                resid[rows[s : s + 65536]] = (net.member(k, x[r]) - y[r]).numpy()
    mse = (resid.astype(np.float64) ** 2).mean(0)
    var = y_np.astype(np.float64).var(0)
    r2 = np.where(var > 0, 1.0 - mse / np.where(var > 0, var, 1.0), np.nan)  # NaN: a constant target
    scale = np.maximum(1.4826 * np.median(np.abs(resid), axis=0), RESIDUAL_FLOOR).astype(np.float32)
    z2 = (resid / scale) ** 2
    dims = raw.observations.reshape(n, -1).shape[1]
    names = [f"ds[{j}]" for j in range(dims)] + ["reward"]
    return ModelResult(
        score=z2.mean(1),
        reward_z2=z2[:, -1],
        dynamics_score=z2[:, :-1].mean(1),
        r2=r2,
        target_names=names,
        fold=fold,
        fit_seconds=time.perf_counter() - t0,
        config=cfg,
        info={"final_train_loss": float(loss.detach()) if cfg.steps else float("nan")},
    )
