"""Checkpoints without pickle: every tensor in one safetensors file, everything else in JSON.

A nested state (dicts, lists, tuples, numbers, strings, tensors — e.g. optimiser state dicts with
integer keys) is split into a flat ``{key: tensor}`` map and a JSON skeleton that refers to those
keys; joining them gives back the same structure with the same types and bit-identical tensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from offrl.errors import CheckpointError, ConfigError, OfflineRLError
from offrl.utils import (
    WriteError,
    atomic_write_json,
    replace_folder,
    staging_folder,
    sweep_leftovers,
)

CHECKPOINT_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest.json"

T = TypeVar("T")


# -- errors that name the file and the field ------------------------------------------------------
class FileContentError(OfflineRLError):
    """A file offrl wrote and reads back is unreadable or malformed: the message names the file and,
    where one is at fault, the field (``FILE: 'field' problem``). One subclass per kind of file."""

    def __init__(self, path: str | os.PathLike[str], problem: str, field: str | None = None) -> None:
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: " + (f"'{field}' {problem}" if field else problem))


class WeightsFileError(FileContentError, CheckpointError):
    """A safetensors file (``state.safetensors``, ``policy.safetensors``) is missing, damaged or holds
    non-finite values."""


class StateFileError(FileContentError, CheckpointError):
    """A checkpoint's ``state.json`` is malformed, or its state does not fit the run."""


class LatestFileError(FileContentError, CheckpointError):
    """``checkpoints/latest.json`` is malformed or names no checkpoint of this run."""


class RunConfigFileError(FileContentError, ConfigError):
    """A run folder's ``config.toml`` lacks a field or holds one of the wrong type."""


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


class Fields:
    """The fields of one JSON (or TOML) object read from ``path``, checked as they are read: a missing or
    mistyped field raises ``error`` naming the file and the field's dotted name (``meta.pass``)."""

    def __init__(
        self,
        data: Any,
        path: str | os.PathLike[str],
        error: type[FileContentError],
        name: str = "",
    ) -> None:
        self.path, self.error, self.name = Path(path), error, name
        if not isinstance(data, dict):
            where = f"'{name}' is" if name else "holds"
            raise error(path, f"{where} {_type_name(data)}, expected an object")
        self.data: dict[str, Any] = data

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def fail(self, key: str, problem: str) -> FileContentError:
        return self.error(self.path, problem, self._key(key))

    def get(self, key: str, types: type | tuple[type, ...], what: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            raise self.fail(key, "is missing")
        value = self.data[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(key, f"is {value!r}, expected {what}")
        if not isinstance(value, types):
            shown = repr(value) if len(repr(value)) <= 40 else _type_name(value)
            raise self.fail(key, f"is {shown}, expected {what}")
        return value

    def integer(self, key: str, default: Any = ..., *, minimum: int | None = None) -> int:
        value = self.get(key, int, "an integer", default)
        if minimum is not None and value is not default and value < minimum:
            raise self.fail(key, f"is {value}, expected an integer >= {minimum}")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, "a string", default)

    def tensor(self, key: str) -> Tensor:
        return self.get(key, Tensor, "a tensor")

    def fields(self, key: str) -> Fields:
        if key not in self.data:
            raise self.fail(key, "is missing")
        return Fields(self.data[key], self.path, self.error, self._key(key))

    @contextlib.contextmanager
    def applying(self, key: str) -> Iterator[None]:
        """Turn any error raised while this field is put to use into one naming the file and the field."""
        try:
            yield
        except FileContentError:
            raise
        except (OfflineRLError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = str(exc) if not isinstance(exc, KeyError) else f"lacks {exc}"
            raise self.fail(key, f"does not fit this run: {detail}") from None

    def use(self, key: str, apply: Callable[[Any], T]) -> T:
        """``apply(value of key)``, any error from it naming the file and the field."""
        if key not in self.data:
            raise self.fail(key, "is missing")
        with self.applying(key):
            return apply(self.data[key])


def set_torch_rng_state(value: Any) -> None:
    """``torch.set_rng_state`` for a state read from a checkpoint, checked first: a state of the wrong
    type or size raises :class:`CheckpointError` instead of torch's error."""
    expected = torch.get_rng_state()
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.shape != expected.shape:
        found = (
            f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else _type_name(value)
        )
        raise CheckpointError(
            f"expected torch's CPU RNG state (uint8, {expected.numel()} bytes), found {found}"
        )
    torch.set_rng_state(value.cpu())


# -- safetensors files ----------------------------------------------------------------------------
def read_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file, refused (:class:`WeightsFileError`) when the file is missing,
    empty, damaged or not safetensors, or when a floating-point tensor holds NaN or infinity."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise WeightsFileError(path, "is missing") from None
    if size == 0:
        raise WeightsFileError(path, "is empty (0 bytes): it was never completely written")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise WeightsFileError(
            path, f"is not a valid safetensors file ({size} bytes; it is truncated or damaged): {exc}"
        ) from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsFileError(path, "holds NaN or infinite values", key)
    return tensors


def write_tensors(tensors: dict[str, Tensor], path: Path, shown: Path | None = None) -> None:
    """Write a safetensors file; a failure (a full disk) names ``shown`` (the final path) and why."""
    try:
        save_file(tensors, str(path))
    except (SafetensorError, OSError) as exc:
        reason = str(exc).removeprefix("Error while serializing: ")
        raise WriteError(f"{shown or path}: could not be written ({reason})") from None


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
    hidden staging folder beside it, which then takes its place (:func:`offrl.utils.replace_folder`).
    A failed write (a full disk) raises :class:`offrl.utils.WriteError` naming the file and leaves
    nothing behind."""
    folder = Path(folder)
    skeleton, tensors = split_state(state)
    tmp = staging_folder(folder)
    try:
        write_tensors(tensors, tmp / STATE_TENSORS, folder / STATE_TENSORS)
        doc = {"checkpoint_version": CHECKPOINT_VERSION, "meta": meta, "state": skeleton}
        try:
            (tmp / STATE_JSON).write_text(json.dumps(doc, indent=1))
        except OSError as exc:
            raise WriteError(f"{folder / STATE_JSON}: could not be written ({exc.strerror or exc})") from None
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_json(path: Path, error: type[FileContentError]) -> Any:
    """A JSON file's content; unreadable or invalid JSON raises ``error`` naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(path, "is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error(path, f"is not valid JSON ({exc})") from None


def load_checkpoint(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` from a checkpoint folder. Every field is checked (:class:`StateFileError`,
    :class:`WeightsFileError` name the file and the field or tensor at fault), and a checkpoint holding
    NaN or infinity is refused here rather than a pass later."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise CheckpointError(f"{folder}: not a checkpoint ('{STATE_JSON}' missing)")
    path = folder / STATE_JSON
    doc = Fields(read_json(path, StateFileError), path, StateFileError)
    version = doc.integer("checkpoint_version", 0, minimum=0)
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint version {version} is newer than this offrl reads ({CHECKPOINT_VERSION})"
        )
    meta = doc.fields("meta").data if "meta" in doc.data else {}
    if "state" not in doc.data:
        raise doc.fail("state", "is missing")
    tensors = read_tensors(folder / STATE_TENSORS, "cpu")
    try:
        state = join_state(doc.data["state"], tensors, device)
    except CheckpointError as exc:
        raise StateFileError(path, str(exc)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise doc.fail("state", f"is malformed ({type(exc).__name__}: {exc})") from None
    return state, meta


def write_latest(checkpoints_dir: str | os.PathLike[str], name: str, meta: dict[str, Any]) -> None:
    atomic_write_json(Path(checkpoints_dir) / LATEST, {"checkpoint": name, **meta})


def latest_checkpoint(checkpoints_dir: str | os.PathLike[str]) -> Path | None:
    """The folder named by ``latest.json`` (written only after a checkpoint is complete). The name must
    be a checkpoint folder directly inside ``checkpoints_dir``: a path leading elsewhere is refused."""
    checkpoints_dir = Path(checkpoints_dir)
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    name = Fields(read_json(pointer, LatestFileError), pointer, LatestFileError).text("checkpoint")
    if (
        name in ("", ".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
    ):
        raise LatestFileError(
            pointer, f"is {name!r}, which is not a checkpoint folder of this run", "checkpoint"
        )
    path = checkpoints_dir / name
    if not (path / STATE_JSON).is_file():
        moved_aside = checkpoints_dir / f".{name}.old"  # a kill between replace_folder's two renames
        if (moved_aside / STATE_JSON).is_file():
            return moved_aside
        raise LatestFileError(pointer, f"names '{name}', which is missing", "checkpoint")
    return path


def sweep_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[str]:
    """Clear what checkpoint writes cut short by a kill left in ``checkpoints_dir`` (hidden staging
    folders and temporary files); a checkpoint moved aside for its replacement is put back. Call it only
    while holding the run folder: another writer's staging folder looks the same."""
    return sweep_leftovers(checkpoints_dir)
