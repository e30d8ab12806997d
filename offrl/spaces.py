"""Gymnasium spaces to and from JSON, as stored in a dataset's root attributes.

JSON has no Infinity, so infinite bounds are written as the strings ``"inf"`` and ``"-inf"``.
Bounds that are the same in every element are written once as a scalar; otherwise as a nested
list of the space's shape. Dict spaces are reserved for a later format version.
"""

from __future__ import annotations

import json
import math
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.errors import OfflineRLError


def _encode_number(x: float | int) -> float | int | str:
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _decode_number(x: Any) -> float | int:
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    if isinstance(x, (int, float)):
        return x
    raise OfflineRLError(f"space bound {x!r} is neither a number nor 'inf'/'-inf'")


def _encode_bound(arr: np.ndarray) -> Any:
    flat = arr.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return _encode_number(flat[0].item())

    def rec(a: np.ndarray) -> Any:
        if a.ndim == 0:
            return _encode_number(a.item())
        return [rec(x) for x in a]

    return rec(arr)


def _decode_bound(obj: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    def rec(o: Any) -> Any:
        return [rec(x) for x in o] if isinstance(o, list) else _decode_number(o)

    arr = np.asarray(rec(obj), dtype=np.float64)
    arr = np.broadcast_to(arr, shape) if arr.ndim == 0 else arr
    if arr.shape != shape:
        raise OfflineRLError(f"space bound has shape {arr.shape}, expected {shape}")
    return arr.astype(dtype)


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": np.dtype(space.dtype).name,
            "low": _encode_bound(np.asarray(space.low)),
            "high": _encode_bound(np.asarray(space.high)),
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    raise OfflineRLError(
        f"{type(space).__name__} spaces are not supported by dataset format v1 (Box and Discrete are)"
    )


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    kind = d.get("type")
    if kind == "Box":
        shape = tuple(int(s) for s in d["shape"])
        dtype = np.dtype(d["dtype"])
        low = _decode_bound(d["low"], shape, dtype)
        high = _decode_bound(d["high"], shape, dtype)
        return gym.spaces.Box(low=low, high=high, shape=shape, dtype=dtype.type)
    if kind == "Discrete":
        return gym.spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
    raise OfflineRLError(f"unknown space type {kind!r} (format v1 knows Box and Discrete)")


def space_to_json(space: gym.Space) -> str:
    return json.dumps(space_to_dict(space), allow_nan=False)


def space_from_json(text: str) -> gym.Space:
    return space_from_dict(json.loads(text))


def is_discrete(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Discrete)


def action_dim(space: gym.Space) -> int:
    """Flat size of a Box action, or the number of choices of a Discrete one."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    raise OfflineRLError(f"unsupported action space {space}")
