"""Checkpoints without pickle: every tensor in one safetensors file, everything else in JSON.

A nested state (dicts, lists, tuples, numbers, strings, tensors — e.g. optimiser state dicts with
integer keys) is split into a flat ``{key: tensor}`` map and a JSON skeleton that refers to those
keys; joining them gives back the same structure with the same types and bit-identical tensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from offrl.errors import CheckpointError
from offrl.utils import atomic_write_json

CHECKPOINT_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest.json"


def split_state(obj: Any) -> tuple[Any, dict[str, Tensor]]:
    """``(skeleton, tensors)``: the JSON-able skeleton and the tensors it refers to by key."""
    tensors: dict[str, Tensor] = {}

    def enc(o: Any, path: str) -> Any:
        if isinstance(o, Tensor):
            key = path or "tensor"
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o) and "__tensor__" not in o:
                return {"__dict__": {k: enc(v, f"{path}.{k}" if path else k) for k, v in o.items()}}
            return {"__items__": [[k, enc(v, f"{path}.{k}" if path else str(k))] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(o)]
        if isinstance(o, float) and not math.isfinite(o):
            return {"__float__": repr(o)}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise CheckpointError(f"cannot store {type(o).__name__} at '{path}' in a checkpoint (no pickling)")

    return enc(obj, ""), tensors


def join_state(skeleton: Any, tensors: dict[str, Tensor], device: str | torch.device = "cpu") -> Any:
    def dec(o: Any) -> Any:
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if "__tensor__" in o:
                key = o["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint refers to tensor '{key}' that its weights file lacks")
                return tensors[key].to(device)
            if "__dict__" in o:
                return {k: dec(v) for k, v in o["__dict__"].items()}
            if "__items__" in o:
                return {k: dec(v) for k, v in o["__items__"]}
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            if "__float__" in o:
                return float(o["__float__"])
        return o

    return dec(skeleton)


def save_checkpoint(folder: str | os.PathLike[str], state: Any, meta: dict[str, Any]) -> Path:
    """Write ``folder`` (``state.safetensors`` + ``state.json``) atomically: the files are written in a
    temporary sibling folder, which then replaces ``folder`` in one rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = split_state(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(
            json.dumps({"checkpoint_version": CHECKPOINT_VERSION, "meta": meta, "state": skeleton}, indent=1)
        )
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_checkpoint(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` from a checkpoint folder."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a checkpoint ('{STATE_JSON}' missing)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / STATE_JSON}: invalid JSON ({exc})") from None
    if int(doc.get("checkpoint_version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint version {doc.get('checkpoint_version')} is newer than this offrl"
        )
    try:
        tensors = load_file(str(folder / STATE_TENSORS), device="cpu")
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{folder / STATE_TENSORS}: unreadable ({exc})") from None
    return join_state(doc["state"], tensors, device), doc.get("meta", {})


def write_latest(checkpoints_dir: str | os.PathLike[str], name: str, meta: dict[str, Any]) -> None:
    atomic_write_json(Path(checkpoints_dir) / LATEST, {"checkpoint": name, **meta})


def latest_checkpoint(checkpoints_dir: str | os.PathLike[str]) -> Path | None:
    """The folder named by ``latest.json`` (written only after a checkpoint is complete)."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["checkpoint"]
    path = Path(checkpoints_dir) / name
    if not (path / STATE_JSON).is_file():
        raise CheckpointError(f"{pointer} names '{name}', which is missing")
    return path
