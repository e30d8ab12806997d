"""Minari datasets in and out, through the ``minari`` package itself (the ``offrl[minari]`` extra).

Minari keeps one group per episode with T actions, rewards and flags and T + 1 observations and
infos (the reset's first). Format v1 keeps flat transitions with an explicit next observation, so an
episode's ``observations[:-1]`` become ``observations`` and ``observations[1:]`` ``next_observations``:
nothing is lost in either direction. The rules are in docs/convert.md.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.data import format as fmt
from offrl.data.convert import ConvertReport, fit_spaces, plural, write_imported
from offrl.errors import ConfigError, DatasetError, OfflineRLError

MINARI_PREFIX = "minari:"
NO_END_FLAG = "episodes without an end flag"


def _minari() -> Any:
    try:
        import minari
    except ImportError:
        raise OfflineRLError(
            'reading or writing Minari datasets needs the minari package: pip install "offrl[minari]"'
        ) from None
    return minari


def datasets_root() -> Path:
    """The local Minari root (``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``), as minari finds it."""
    _minari()
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


def data_folder(id_or_path: str) -> Path:
    """The ``data`` folder of a Minari dataset given by id (looked up in the local root) or by path (the
    dataset's folder or its ``data`` folder). Never downloads: a dataset missing locally is an error that
    names the root and the ``minari download`` command."""
    minari = _minari()
    src = id_or_path[len(MINARI_PREFIX) :] if id_or_path.startswith(MINARI_PREFIX) else id_or_path
    path = Path(src)
    if path.is_dir():
        for folder in (path, path / "data"):
            if (folder / "metadata.json").is_file():
                return folder
        raise DatasetError(src, "is a folder but not a Minari dataset (no metadata.json in it or in data/)")
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        minari.dataset.minari_dataset.parse_dataset_id(src)
    except ValueError:
        raise DatasetError(
            src, "neither a folder nor a Minari dataset id (NAMESPACE/NAME-vN, e.g. D4RL/door/human-v2)"
        ) from None
    folder = Path(get_dataset_path(src)) / "data"
    if not (folder / "metadata.json").is_file():
        raise DatasetError(
            src,
            f"not in the local Minari root {datasets_root()} (MINARI_DATASETS_PATH); offrl never downloads: "
            f"run `minari download {src}` first",
        )
    return folder


def open_dataset(id_or_path: str) -> Any:
    """A ``minari.MinariDataset`` for an id in the local root or a dataset folder."""
    minari = _minari()
    folder = data_folder(id_or_path)
    try:
        return minari.MinariDataset(folder)
    except (ValueError, OSError, KeyError) as exc:
        raise DatasetError(folder, f"minari cannot open this dataset ({exc})") from None


def fingerprint(id_or_path: str) -> dict[str, Any]:
    """What identifies a Minari dataset cheaply: its metadata and every file's size and modification time
    (no hash of the data). The cache of ``minari:ID`` is keyed by it."""
    folder = data_folder(id_or_path)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "metadata": (folder / "metadata.json").read_text(),
        "files": [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def _check_spaces(src: str, obs_space: gym.Space, act_space: gym.Space) -> None:
    if not isinstance(obs_space, gym.spaces.Box):
        raise DatasetError(
            src, f"observation space {obs_space} is not supported: format v1 stores Box observations"
        )
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise DatasetError(
            src, f"action space {act_space} is not supported: format v1 stores Box or Discrete actions"
        )


def _numeric_infos(infos: dict[str, Any] | None, steps: int) -> tuple[dict[str, np.ndarray], set[str]]:
    """An episode's numeric per-step infos as the rows of its steps (``infos[1:]``), and the keys skipped."""
    kept: dict[str, np.ndarray] = {}
    skipped: set[str] = set()
    for key, value in (infos or {}).items():
        a = value if isinstance(value, np.ndarray) else None
        if a is None or a.dtype.kind not in "biuf" or a.ndim == 0 or a.shape[0] != steps + 1:
            skipped.add(key)
        else:
            kept[key] = a[1:]
    return kept, skipped


def read_minari(id_or_path: str) -> tuple[fmt.RawDataset, int, dict[str, int], list[str]]:
    """A Minari dataset as an in-memory, checked format-v1 dataset; with its row count, the rows dropped
    per reason (none today) and notes on what was decided."""
    src = id_or_path
    ds = open_dataset(id_or_path)
    obs_space, act_space = ds.observation_space, ds.action_space
    _check_spaces(src, obs_space, act_space)
    meta = ds.storage.metadata
    notes: list[str] = []
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
    }
    infos: list[dict[str, np.ndarray]] = []
    skipped: set[str] = set()
    ends: list[int] = []
    rows = 0
    unflagged = empty = 0
    for ep in ds.iterate_episodes():
        t = len(ep.rewards)
        if t == 0:
            empty += 1
            continue
        obs = np.asarray(ep.observations)
        if obs.shape[0] != t + 1:
            raise DatasetError(
                src, f"episode {ep.id} has {obs.shape[0]} observations for {t} steps, expected {t + 1}"
            )
        term = np.asarray(ep.terminations, dtype=bool).reshape(t)
        trunc = np.asarray(ep.truncations, dtype=bool).reshape(t)
        inner = np.flatnonzero((term | trunc)[:-1])
        if inner.size:
            raise DatasetError(
                src,
                f"episode {ep.id} ends at step {inner[0]} (terminated or truncated) before its last step {t - 1}",
            )
        terminal = np.zeros(t, dtype=bool)
        timeout = np.zeros(t, dtype=bool)
        if term[-1]:
            terminal[-1] = True  # a termination wins over a truncation on the same step
        else:
            timeout[-1] = True
            unflagged += int(not trunc[-1])
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions))
        parts["rewards"].append(np.asarray(ep.rewards).reshape(t))
        parts["terminals"].append(terminal)
        parts["timeouts"].append(timeout)
        kept, skip = _numeric_infos(ep.infos, t)
        infos.append(kept)
        skipped |= skip
        rows += t
        ends.append(rows)
    if not ends:
        raise DatasetError(src, "the Minari dataset has no steps")
    if unflagged:
        notes.append(
            f"{plural(unflagged, 'episode')} ended with neither a termination nor a truncation: "
            "closed as timeouts"
        )
    if empty:
        notes.append(f"{plural(empty, 'episode')} without steps skipped")
    # an info key is kept only when every episode has it, with the same row shape and dtype
    common = set(infos[0]) - skipped
    for ep_infos in infos[1:]:
        common &= set(ep_infos)
    for key in sorted(common):
        first = infos[0][key]
        if any(i[key].shape[1:] != first.shape[1:] or i[key].dtype != first.dtype for i in infos):
            common.discard(key)
    dropped_infos = (set().union(*infos) | skipped) - common
    if dropped_infos:
        notes.append(
            "skipped infos that are not numeric with one row per step in every episode: "
            + ", ".join(repr(k) for k in sorted(dropped_infos))
        )
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    info_arrays = {k: np.concatenate([i[k] for i in infos]) for k in sorted(common)}
    log_probs = info_arrays.pop(fmt.ACTION_LOG_PROBS, None)

    metadata: dict[str, Any] = {"converted_from": "minari", "minari_dataset_id": ds.id}
    kept_meta = {
        k: sorted(v) if isinstance(v, set) else v
        for k, v in meta.items()
        if k not in ("observation_space", "action_space", "env_spec", "eval_env_spec")
    }
    metadata["minari_metadata"] = json.loads(json.dumps(kept_meta, default=str))
    obs_space, act_space, actions = fit_spaces(
        src, cat["observations"], cat["actions"], obs_space, act_space, "the Minari dataset's space", metadata
    )
    env_id = env_spec = None
    spec = ds.env_spec
    if spec is not None:
        env_id = spec.id
        try:
            env_spec = spec.to_json()
        except (ValueError, TypeError, gym.error.Error):
            notes.append(f"the env spec of {env_id} holds kwargs JSON cannot store: only its id is kept")
    else:
        notes.append("the Minari dataset records no environment: evaluating a policy will need --env")
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    if (ref_min is None) != (ref_max is None):
        notes.append("only one of ref_min_score and ref_max_score is set: no reference returns kept")
        ref_min = ref_max = None
    metadata["minari_import"] = {"notes": list(notes)}
    raw = fmt.RawDataset(
        path=src,
        observations=cat["observations"],
        actions=actions,
        rewards=cat["rewards"].astype(np.float32),
        next_observations=cat["next_observations"],
        terminals=cat["terminals"],
        timeouts=cat["timeouts"],
        episode_ends=np.asarray(ends, dtype=np.int64),
        observation_space=obs_space,
        action_space=act_space,
        action_log_probs=None if log_probs is None else log_probs.astype(np.float32).reshape(rows),
        infos=info_arrays,
        env_id=env_id,
        env_spec=env_spec,
        metadata=metadata,
        ref_min_return=None if ref_min is None else float(ref_min),
        ref_max_return=None if ref_max is None else float(ref_max),
    )
    problems = fmt.check(raw)
    if problems:
        raise DatasetError(src, [f"after conversion: {p}" for p in problems])
    return raw, rows, {}, notes


def import_minari(
    id_or_path: str, out: str | os.PathLike[str], *, compression: str | None = None
) -> ConvertReport:
    """Convert a Minari dataset (an id in the local root, or a folder) into a format-v1 file, atomically."""
    raw, rows, dropped, notes = read_minari(id_or_path)
    return write_imported(
        raw, out, src=id_or_path, rows_in=rows, dropped=dropped, notes=notes, compression=compression
    )


def _env_for_export(raw: fmt.RawDataset) -> Any:
    """The EnvSpec to hand to minari (which makes the env), or None when the file records none."""
    from gymnasium.envs.registration import EnvSpec

    spec = None
    if raw.env_spec is not None:
        try:
            spec = EnvSpec.from_json(raw.env_spec)
        except (ValueError, TypeError, KeyError, gym.error.Error):
            spec = None
    if spec is None and raw.env_id is not None:
        try:
            spec = gym.spec(raw.env_id)
        except gym.error.Error:
            spec = None
    if spec is not None:
        try:
            gym.make(spec).close()
        except Exception as exc:  # minari makes the env itself; refuse before it half-writes a dataset
            raise ConfigError(
                f"{raw.path}: minari needs to make its environment {spec.id!r}, which fails here ({exc})"
            ) from None
    return spec


def export_minari(src: str | os.PathLike[str], dataset_id: str) -> Path:
    """Write a valid format-v1 file as a new Minari dataset ``dataset_id`` in the local root, with minari's
    ``create_dataset_from_buffers``; returns the dataset's folder. Each offrl episode becomes one Minari
    episode; ``action_log_probs`` and ``infos/*`` become per-step infos (the reset's row zeros)."""
    minari = _minari()
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError:
        raise ConfigError(f"--id {dataset_id!r}: not a Minari dataset id (NAMESPACE/NAME-vN)") from None
    if Path(get_dataset_path(dataset_id)).exists():
        raise ConfigError(
            f"--id {dataset_id}: a Minari dataset of this id exists in {datasets_root()}; minari never "
            "replaces one: choose another id or version, or `minari delete` it"
        )
    raw = fmt.load_checked(src)
    env = _env_for_export(raw)
    infos = dict(raw.infos)
    if raw.action_log_probs is not None:
        infos[fmt.ACTION_LOG_PROBS] = raw.action_log_probs
    buffers = []
    for i, (s, e) in enumerate(zip(raw.episode_starts.tolist(), raw.episode_ends.tolist())):
        ep_infos = {
            k: np.concatenate([np.zeros((1, *v.shape[1:]), dtype=v.dtype), v[s:e]]) for k, v in infos.items()
        }
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=np.concatenate([raw.observations[s:e], raw.next_observations[e - 1 : e]]),
                actions=raw.actions[s:e],
                rewards=raw.rewards[s:e],
                terminations=raw.terminals[s:e].astype(bool),
                truncations=raw.timeouts[s:e].astype(bool),
                infos=ep_infos or None,
            )
        )
    refs = {}
    if raw.ref_min_return is not None and raw.ref_max_return is not None:
        refs = {"ref_min_score": raw.ref_min_return, "ref_max_score": raw.ref_max_return}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # minari's advice on authors, permalinks, eval envs
        ds = minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env,
            observation_space=raw.observation_space,
            action_space=raw.action_space,
            description=f"converted by offrl from {Path(str(src)).name}",
            algorithm_name=str(raw.metadata.get("policy", "unknown")),
            jpeg_encoding=False,  # lossless: the round trip must give back the same arrays
            **(refs if env is not None else {}),
        )
        if refs and env is None:  # minari stores reference scores only with an env; keep them anyway
            ds.storage.update_metadata(refs)
    return Path(get_dataset_path(dataset_id))
