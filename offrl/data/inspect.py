"""What is in a dataset: the summary behind ``offrl info`` (text, JSON and a return histogram).

The summary is built from a checked file (:func:`offrl.data.format.load_checked`), so ``info``
refuses an invalid file with the same ``DatasetError`` lines as ``offrl validate``. It is plain
JSON (no NaN or Infinity) and stays small whatever the dataset's size: the episode returns are
kept as a histogram, not as a list.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.data import format as fmt
from offrl.spaces import space_to_dict
from offrl.utils import atomic_path

PER_DIM_LIMIT = 32
"""Observations with more elements than this (images) get overall statistics, not per-dimension ones."""

QUANTILES = (5, 25, 50, 75, 95)
MAX_HISTOGRAM_BINS = 50


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by strings: metadata JSON may carry NaN (Python's
    ``json`` writes it by default), and the summary must stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _stats(x: np.ndarray) -> dict[str, float]:
    """min/mean/std/max and the quantiles of a non-empty 1-D array of finite numbers."""
    x = np.asarray(x, dtype=np.float64)
    out = {"min": float(x.min()), "mean": float(x.mean()), "std": float(x.std()), "max": float(x.max())}
    for q, v in zip(QUANTILES, np.percentile(x, QUANTILES)):
        out[f"q{q:02d}"] = float(v)
    return out


def _per_dim(a: np.ndarray) -> dict[str, Any]:
    """Per-element statistics over rows of ``a`` (N, *shape), or overall ones for large rows."""
    flat = a.reshape(a.shape[0], -1)
    if flat.shape[1] > PER_DIM_LIMIT:
        # reductions with a float64 accumulator: no float copy of a large image array
        return {
            "per_dim": False,
            "min": float(flat.min()),
            "max": float(flat.max()),
            "mean": float(flat.mean(dtype=np.float64)),
        }
    f64 = flat.astype(np.float64)
    return {
        "per_dim": True,
        "min": f64.min(axis=0).tolist(),
        "max": f64.max(axis=0).tolist(),
        "mean": f64.mean(axis=0).tolist(),
        "std": f64.std(axis=0).tolist(),
    }


def _histogram(returns: np.ndarray) -> dict[str, list[float] | list[int]]:
    bins = int(min(MAX_HISTOGRAM_BINS, max(1, math.ceil(math.sqrt(returns.size)))))
    counts, edges = np.histogram(returns, bins=bins)
    return {"bin_edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def _policies(raw: fmt.RawDataset, returns: np.ndarray) -> list[dict[str, Any]]:
    """One entry per listed behaviour policy with its episode count and mean return."""
    if raw.episode_policy_ids is None:
        # no per-episode ids: every episode belongs to the one listed policy (or an unknown one)
        desc = raw.policies[0] if len(raw.policies) == 1 else "unknown"
        return [{"id": 0, "policy": desc, "episodes": raw.num_episodes, "mean_return": float(returns.mean())}]
    ids = raw.episode_policy_ids.astype(np.int64)
    n_pol = max(len(raw.policies), int(ids.max()) + 1)
    out = []
    for i in range(n_pol):
        mask = ids == i
        count = int(mask.sum())
        out.append(
            {
                "id": i,
                "policy": raw.policies[i] if i < len(raw.policies) else "unknown",
                "episodes": count,
                "mean_return": float(returns[mask].mean()) if count else None,
            }
        )
    return out


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a valid dataset file as a JSON-ready dict; ``DatasetError`` if the file is invalid.

    Observation statistics are over the ``observations`` rows (the states actions were taken in).
    """
    raw = fmt.load_checked(path)
    ends = raw.episode_ends.astype(np.int64)
    starts = raw.episode_starts
    cums = np.concatenate([[0.0], np.cumsum(raw.rewards, dtype=np.float64)])
    returns = cums[ends] - cums[starts]
    lengths = ends - starts
    terminals = raw.terminals.astype(bool)
    timeouts = raw.timeouts.astype(bool)

    act_space = raw.action_space
    actions: dict[str, Any]
    if isinstance(act_space, gym.spaces.Discrete):
        start, n = int(act_space.start), int(act_space.n)
        counts = np.bincount(raw.actions.astype(np.int64) - start, minlength=n)
        actions = {"kind": "discrete", "counts": {str(start + i): int(c) for i, c in enumerate(counts)}}
    else:
        actions = {
            "kind": "continuous",
            "shape": list(raw.actions.shape[1:]),
            "dtype": raw.actions.dtype.name,
        }
        actions.update(_per_dim(raw.actions))

    reference: dict[str, float] | None = None
    if raw.ref_min_return is not None and raw.ref_max_return is not None:
        lo, hi = raw.ref_min_return, raw.ref_max_return
        reference = {
            "min_return": lo,
            "max_return": hi,
            "normalized_score": 100.0 * (float(returns.mean()) - lo) / (hi - lo),
        }

    name = raw.metadata.get("name")
    return {
        "path": str(path),
        "name": str(name) if name else Path(path).stem,
        "format_version": raw.format_version,
        "env_id": raw.env_id,
        "num_episodes": raw.num_episodes,
        "num_transitions": raw.num_transitions,
        "returns": _stats(returns),
        "return_histogram": _histogram(returns),
        "lengths": _stats(lengths),
        "num_terminals": int(terminals.sum()),
        "num_timeouts": int(timeouts.sum()),
        "observations": {
            "shape": list(raw.observations.shape[1:]),
            "dtype": raw.observations.dtype.name,
            **_per_dim(raw.observations),
        },
        "actions": actions,
        "action_log_probs": raw.action_log_probs is not None,
        "infos": sorted(raw.infos),
        "reference": reference,
        "observation_space": space_to_dict(raw.observation_space),
        "action_space": space_to_dict(act_space),
        "policies": _json_safe(_policies(raw, returns)),
        "metadata": _json_safe(raw.metadata),
    }


# -- text report -----------------------------------------------------------------------------


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    # fixed decimals keep columns comparable; scientific only where they would hide the value
    if x == 0 or 1e-3 <= abs(x) < 1e7:
        return f"{x:.3f}"
    return f"{x:.3e}"


def _table(rows: list[list[str]], align: str = "", indent: str = "  ") -> list[str]:
    """Rows of cells as aligned lines; ``align`` has one 'l' or 'r' per column (default: first
    column left, the rest right)."""
    ncol = len(rows[0])
    align = align or "l" + "r" * (ncol - 1)
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _space_str(d: dict[str, Any]) -> str:
    if d["type"] == "Discrete":
        return f"Discrete({d['n']}{', start=' + str(d['start']) if d.get('start') else ''})"
    low, high = d["low"], d["high"]
    scalar = not isinstance(low, list) and not isinstance(high, list)
    bounds = f"[{low}, {high}]" if scalar else "per-element bounds"
    return f"Box{tuple(d['shape'])} {d['dtype']} {bounds}"


def _meta_value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_meta_value(x)}" for k, x in sorted(v.items()))
    return str(v)


def _ranges(d: dict[str, Any]) -> list[str]:
    if not d["per_dim"]:
        size = int(np.prod(d["shape"]))
        return _table(
            [["", "min", "max", "mean"], [f"all {size}", *(_num(d[k]) for k in ("min", "max", "mean"))]]
        )
    rows = [["dim", "min", "max", "mean", "std"]]
    for i in range(len(d["min"])):
        rows.append([str(i), *(_num(d[k][i]) for k in ("min", "max", "mean", "std"))])
    return _table(rows)


def format_summary(summary: dict[str, Any]) -> str:
    """A compact human-readable report of :func:`summarize`'s result."""
    s = summary
    head = [
        ["file", f"{s['path']} (format v{s['format_version']})"],
        ["env", str(s["env_id"] or "-")],
        ["episodes", f"{s['num_episodes']:,}"],
        ["transitions", f"{s['num_transitions']:,}"],
        ["episode ends", f"{s['num_terminals']:,} terminal, {s['num_timeouts']:,} timeout"],
        ["observations", _space_str(s["observation_space"])],
        ["actions", _space_str(s["action_space"])],
        ["log-probs", "yes" if s["action_log_probs"] else "no"],
    ]
    if s["infos"]:
        head.append(["infos", ", ".join(s["infos"])])
    ref = s["reference"]
    if ref is not None:
        head.append(["reference", f"min {_num(ref['min_return'])}, max {_num(ref['max_return'])}"])
        head.append(["normalised", f"{ref['normalized_score']:.1f}  (100 * (mean - min) / (max - min))"])
    lines = ["dataset", *_table(head, "ll")]

    cols = ["min", "mean", "std", "max", *(f"q{q:02d}" for q in QUANTILES)]
    stat_rows = [["", *cols]]
    stat_rows += [[label, *(_num(s[label][c]) for c in cols)] for label in ("returns", "lengths")]
    lines += ["episodes", *_table(stat_rows)]

    lines += ["observations", *_ranges(s["observations"])]
    acts = s["actions"]
    if acts["kind"] == "discrete":
        total = sum(acts["counts"].values()) or 1
        rows = [["action", "count", "share"]]
        rows += [[a, f"{c:,}", f"{100 * c / total:.1f}%"] for a, c in acts["counts"].items()]
        lines += ["actions", *_table(rows)]
    else:
        lines += ["actions", *_ranges(acts)]

    pol_rows = [["id", "episodes", "mean return", "policy"]]
    for p in s["policies"]:
        desc = p["policy"] if isinstance(p["policy"], str) else json.dumps(p["policy"], sort_keys=True)
        pol_rows.append([str(p["id"]), f"{p['episodes']:,}", _num(p["mean_return"]), desc])
    lines += ["policies", *_table(pol_rows, "rrrl")]

    if s["metadata"]:
        meta_rows = [[str(k), _meta_value(v)] for k, v in sorted(s["metadata"].items())]
        lines += ["metadata", *_table(meta_rows, "ll")]
    return "\n".join(lines)


# -- plot ------------------------------------------------------------------------------------


def plot_returns(summary: dict[str, Any], out_png: str | os.PathLike[str]) -> None:
    """Draw the episode-return histogram of :func:`summarize`'s result into a PNG, atomically."""
    # a bare Figure with an Agg canvas: no pyplot state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hist = summary["return_histogram"]
    edges = np.asarray(hist["bin_edges"], dtype=np.float64)
    counts = np.asarray(hist["counts"], dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, alpha=0.7, label=f"{summary['num_episodes']:,} episodes")
    ax.axvline(summary["returns"]["mean"], color="black", linestyle="--", label="mean")
    ref = summary.get("reference")
    if ref is not None:
        ax.axvline(ref["min_return"], color="tab:red", linestyle=":", label="reference min")
        ax.axvline(ref["max_return"], color="tab:green", linestyle=":", label="reference max")
    ax.set_xlabel("episode return")
    ax.set_ylabel("episodes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{summary.get('env_id') or 'unknown env'} — {summary.get('name', '')}")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
