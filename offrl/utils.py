"""Small helpers shared across the package: atomic file writes, seeding, version stamps."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from offrl.errors import OfflineRLError

STAGING = ".partial-"  # staging folders: .NAME.partial-XXXXXXXX beside the folder NAME they will become


class WriteError(OfflineRLError):
    """A file or folder could not be written (a full disk, a path through a file …); the message names
    the destination, never the temporary file that was being written."""


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it over ``dest``.

    The temporary file lives in the same folder so the final ``os.replace`` is atomic: a crash
    before the rename leaves any existing ``dest`` untouched and no half-written file behind it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f"{suffix}.tmp", dir=dest.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would have (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    try:
        with atomic_path(dest) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise WriteError(f"{dest}: could not be written ({exc.strerror or exc})") from None


def atomic_write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def staging_folder(dest: str | os.PathLike[str]) -> Path:
    """A new empty hidden folder beside ``dest`` in which to build it (see :func:`replace_folder`)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING}", dir=dest.parent))
    except OSError as exc:
        raise WriteError(f"{dest}: could not be written ({exc.strerror or exc})") from None


def replace_folder(staged: Path, dest: Path) -> None:
    """Put the complete folder ``staged`` in the place of ``dest``.

    A new ``dest`` takes one rename. An existing one is first moved aside to ``.NAME.old``, so a kill
    between the two renames leaves the old folder whole under that name, and :func:`sweep_leftovers`
    puts it back. Readers never see a folder with files from two writes.
    """
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(staged, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, dest)


def sweep_leftovers(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[str]:
    """Clear what interrupted atomic writes left in ``folder``: temporary files (``.NAME.XXXX.tmp``) and
    staging folders (``.NAME.partial-XXXX``) are removed; a ``.NAME.old`` folder is put back as ``NAME``
    when ``NAME`` is missing (a kill between the two renames of :func:`replace_folder`), else removed.

    ``names``: only leftovers of these ``NAME``s (in a folder that holds the user's files too); None: of
    any name, and every other hidden folder is a leftover as well (a folder that only offrl writes, such
    as ``checkpoints/``, whose staging folders were ``.NAME.XXXXXXXX`` in earlier versions).
    Returns what was cleared (a folder put back as ``.NAME.old -> NAME``)."""
    folder = Path(folder)
    wanted = None if names is None else tuple(f".{n}." for n in names)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or (wanted is not None and not name.startswith(wanted)):
            continue
        if entry.is_symlink():
            continue
        if entry.is_file() and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            done.append(name)
        elif entry.is_dir():
            if name.endswith(".old") and len(name) > len("..old"):
                target = folder / name[1 : -len(".old")]
                if not target.exists():
                    os.replace(entry, target)
                    done.append(f"{name} -> {target.name}")
                    continue
            elif STAGING not in name and wanted is not None:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            done.append(name)
    return done


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a recorded or trained artefact depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("offrl", "torch", "gymnasium", "numpy", "h5py", "mujoco", "box2d"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
