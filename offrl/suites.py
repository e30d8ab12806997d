"""Dataset suites: named datasets of known quality, rebuilt locally from committed behaviour policies.

A suite is one manifest, ``datasets/<suite>.json`` (format in ``datasets/README.md``): the
environments with their reference returns, and the datasets, each a list of components (a
behaviour policy and how many transitions it records) plus a seed. Behaviour policies are policy
artefacts under ``datasets/policies/`` (or ``random`` / ``scripted:NAME``), so building a dataset
needs no training and no download: ``offrl datasets build classic/cartpole-medium``.

Building is deterministic for a given platform and package versions: every component is recorded
with a seed derived from the dataset's seed, policies act stochastically through their own seeded
generators, and torch runs single-threaded while recording. The manifest keeps the SHA-256 of the
arrays a maintainer's build produced (:func:`arrays_sha256`) and the package versions used, so a
rebuild can be checked against it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from offrl.data import format as fmt
from offrl.data.recorder import record
from offrl.data.writer import write_merged
from offrl.errors import DatasetError
from offrl.utils import atomic_write_text, package_versions

MANIFEST_VERSION = 1
LEVELS = ("random", "medium-replay", "medium", "medium-expert", "expert")
# The packages whose versions decide the bytes of a build (recorded in the manifest, compared on rebuild).
_VERSIONED = ("offrl", "numpy", "torch", "gymnasium", "mujoco", "box2d")


_PACKAGED = Path(__file__).resolve().parent / "suite_data"  # where a wheel puts the checkout's datasets/
_CHECKOUT = Path(__file__).resolve().parents[1] / "datasets"


def suites_dir() -> Path:
    """Where the manifests and behaviour policies live: ``$OFFRL_SUITES_DIR``, else an installed wheel's
    copy of ``datasets/`` (``offrl/suite_data``), else the source checkout's ``datasets/``."""
    env = os.environ.get("OFFRL_SUITES_DIR")
    if env:
        return Path(env)
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


@dataclass(frozen=True)
class Component:
    """One behaviour policy's share of a dataset: exactly ``transitions`` rows (suites) or ``episodes``
    whole episodes (the built-in recipes)."""

    policy: str  # "random", "scripted:NAME[-epsX|-noiseX]" or an artefact folder relative to the suites dir
    transitions: int | None = None
    episodes: int | None = None
    epsilon: float | None = None  # Discrete only: act ε-greedily around the policy's greedy action
    std_scale: float | None = None  # tanh-Gaussian artefacts only: sample with the std scaled by this

    def __post_init__(self) -> None:
        if (self.transitions is None) == (self.episodes is None):
            raise ValueError(f"component {self.policy!r}: give transitions or episodes, not both or neither")

    @property
    def description(self) -> str:
        if self.epsilon is not None:
            return f"{self.policy} (ε-greedy {self.epsilon:g})"
        if self.std_scale is not None:
            return f"{self.policy} (std × {self.std_scale:g})"
        return self.policy


@dataclass(frozen=True)
class SuiteEnv:
    key: str
    env_id: str
    ref_min_return: float  # mean return of the uniform random policy
    ref_max_return: float  # expert reference: gymnasium's reward_threshold, else our best policy
    ref_notes: str = ""
    pending: str = ""  # levels not in the manifest yet and why (a behaviour policy still in training)
    # where the expert behaviour policy scores well below the expert reference (100): by how much, why
    expert_shortfall: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # "<suite>/<env key>-<level>"
    suite: str
    env: SuiteEnv
    level: str
    components: tuple[Component, ...]
    seed: int
    num_envs: int
    description: str
    built: dict[str, Any] = field(default_factory=dict)  # what the maintainer's build produced

    @property
    def transitions(self) -> int:
        return sum(c.transitions or 0 for c in self.components)


def _manifest_error(path: Path, where: str, message: str) -> DatasetError:
    return DatasetError(str(path), f"{where}: {message}")


def load_manifest(path: Path) -> list[DatasetSpec]:
    """The datasets of one suite manifest, checked for the fields each needs."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(str(path), f"cannot read the manifest: {exc}") from exc
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise _manifest_error(
            path, "manifest_version", f"expected {MANIFEST_VERSION}, got {data.get('manifest_version')!r}"
        )
    suite = str(data.get("suite") or path.stem)
    envs: dict[str, SuiteEnv] = {}
    for key, e in dict(data.get("envs", {})).items():
        try:
            envs[key] = SuiteEnv(
                key,
                str(e["env_id"]),
                float(e["ref_min_return"]),
                float(e["ref_max_return"]),
                e.get("notes", ""),
                str(e.get("pending", "")),
                str(e.get("expert_shortfall", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _manifest_error(
                path, f"envs.{key}", f"needs env_id, ref_min_return, ref_max_return ({exc})"
            ) from exc
    out = []
    for i, d in enumerate(data.get("datasets", [])):
        where = f"datasets[{i}] ({d.get('name', '?')})"
        try:
            env = envs[d["env"]]
            components = tuple(
                Component(
                    str(c["policy"]),
                    transitions=int(c["transitions"]),
                    epsilon=None if c.get("epsilon") is None else float(c["epsilon"]),
                    std_scale=None if c.get("std_scale") is None else float(c["std_scale"]),
                )
                for c in d["components"]
            )
            spec = DatasetSpec(
                name=str(d["name"]),
                suite=suite,
                env=env,
                level=str(d["level"]),
                components=components,
                seed=int(d["seed"]),
                num_envs=int(d.get("num_envs", 1)),
                description=str(d.get("description", "")),
                built=dict(d.get("built", {})),
            )
        except KeyError as exc:
            raise _manifest_error(path, where, f"missing or unknown {exc}") from exc
        if spec.level not in LEVELS:
            raise _manifest_error(path, where, f"level {spec.level!r} is not one of {', '.join(LEVELS)}")
        if not spec.components or any((c.transitions or 0) < 1 for c in components):
            raise _manifest_error(path, where, "needs at least one component with transitions ≥ 1")
        out.append(spec)
    return out


def all_specs() -> dict[str, DatasetSpec]:
    """Every dataset of every manifest in the suites directory, by name."""
    specs: dict[str, DatasetSpec] = {}
    root = suites_dir()
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        for spec in load_manifest(path):
            if spec.name in specs:
                raise _manifest_error(path, spec.name, "a dataset of this name is defined twice")
            specs[spec.name] = spec
    return specs


def missing_manifests_hint() -> str:
    """Why no suite dataset resolves, when the suites directory holds no manifest; else ''."""
    root = suites_dir()
    if root.is_dir() and any(root.glob("*.json")):
        return ""
    return (
        f"no suite manifests in {root}: the suites (classic/…, locomotion/…) ship in offrl's wheel and in a "
        "source checkout's datasets/ folder; set OFFRL_SUITES_DIR to such a folder"
    )


def get_spec(name: str) -> DatasetSpec:
    specs = all_specs()
    if name not in specs:
        raise DatasetError(name, f"not a suite dataset; known: {', '.join(specs) or 'none'}")
    return specs[name]


# -- building ---------------------------------------------------------------------------------------
@contextmanager
def _single_thread() -> Iterator[None]:
    """Policies' float results (hence their sampled actions) can depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_component_policy(comp: Component, obs_space: gym.Space, act_space: gym.Space, seed: int) -> Any:
    """The behaviour policy of a component: ``random``, ``scripted:…`` or an artefact under the suites
    directory, sampling with a scaled std given ``std_scale`` and ε-greedy given ``epsilon``."""
    from offrl.policies import EpsilonGreedy, resolve_policy

    spec = comp.policy
    if spec == "random" or spec.startswith("scripted:"):
        policy = resolve_policy(spec, obs_space, act_space, seed=seed)
    else:
        path = suites_dir() / spec
        if not path.exists():
            raise DatasetError(str(path), "behaviour policy artefact not found (is the checkout complete?)")
        policy = resolve_policy(str(path), obs_space, act_space, seed=seed)
    if comp.std_scale is not None:
        if not hasattr(policy, "set_std_scale"):
            raise DatasetError(spec, "std_scale needs a trained tanh-Gaussian policy artefact")
        policy.set_std_scale(comp.std_scale)
    if comp.epsilon is None:
        return policy
    return EpsilonGreedy(policy, act_space, comp.epsilon, seed=seed + 1)


def record_components(
    env_id: str,
    components: Sequence[Component],
    seed: int,
    dest: str | os.PathLike[str],
    *,
    num_envs: int = 1,
    metadata: dict[str, Any] | None = None,
    ref_min_return: float | None = None,
    ref_max_return: float | None = None,
    progress: bool = True,
) -> Path:
    """Record each component stochastically with seed ``seed·1000 + 100·i`` and merge them, in order,
    into ``dest`` (written atomically)."""
    probe = gym.make(env_id)
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    with tempfile.TemporaryDirectory(prefix="offrl-build-") as tmp, _single_thread():
        parts = []
        for i, comp in enumerate(components):
            part_seed = seed * 1000 + i * 100
            policy = resolve_component_policy(comp, obs_space, act_space, part_seed)
            part = Path(tmp) / f"part{i}.h5"
            record(
                env_id,
                policy,
                episodes=comp.episodes,
                steps=comp.transitions,
                seed=part_seed,
                out=part,
                num_envs=num_envs,
                deterministic=False,
                progress=progress,
                policy_description=comp.description,
            )
            parts.append(part)
        write_merged(
            dest,
            [fmt.read_raw(part) for part in parts],
            env_id=env_id,
            metadata=metadata or {},
            ref_min_return=ref_min_return,
            ref_max_return=ref_max_return,
        )
    return Path(dest)


_HASHED_KEYS = (
    fmt.OBSERVATIONS,
    fmt.ACTIONS,
    fmt.REWARDS,
    fmt.NEXT_OBSERVATIONS,
    fmt.TERMINALS,
    fmt.TIMEOUTS,
    fmt.EPISODE_ENDS,
    fmt.ACTION_LOG_PROBS,
)


def _raw(source: fmt.RawDataset | str | os.PathLike[str]) -> fmt.RawDataset:
    return source if isinstance(source, fmt.RawDataset) else fmt.read_raw(source)


def arrays_sha256(source: fmt.RawDataset | str | os.PathLike[str]) -> str:
    """SHA-256 over the transition arrays (name, dtype, shape, bytes), not the file: HDF5 files also
    hold creation times and layout details that differ between identical builds."""
    import hashlib

    raw = _raw(source)
    h = hashlib.sha256()
    for key in _HASHED_KEYS:
        value = getattr(raw, key, None)
        if value is None:
            continue
        arr = np.ascontiguousarray(value)
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def behaviour_stats(
    source: fmt.RawDataset | str | os.PathLike[str], max_episode_steps: int | None
) -> dict[str, float]:
    """Mean return and episode count of the recorded episodes, leaving out episodes cut short by a
    component's transition quota (a timeout before the environment's own time limit)."""
    raw = _raw(source)
    ends = raw.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    returns = np.add.reduceat(raw.rewards.astype(np.float64), starts) if len(ends) else np.zeros(0)
    lengths = ends - starts
    cut = raw.timeouts[ends - 1] & (lengths < (max_episode_steps or np.iinfo(np.int64).max))
    whole = returns[~cut] if (~cut).any() else returns
    return {"episodes": len(ends), "mean_return": float(whole.mean()), "whole_episodes": len(whole)}


def build_platform() -> str:
    """What besides package versions can change a build's bytes: the machine, torch's CPU kernels and
    the CPU model (the same instruction set on another vendor's CPU takes other kernel paths, whose
    float results differ in the last bits; a policy's action, and so the rest of its episode, with them)."""
    import platform

    base = f"{platform.system()}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    model = cpu_model()
    return f"{base} ({model})" if model else base


def cpu_model() -> str:
    """The CPU's model name ('' where the system does not say: only Linux's /proc/cpuinfo is read, since
    elsewhere the standard library reports the architecture, not the model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def normalized(spec: DatasetSpec, value: float) -> float:
    return 100.0 * (value - spec.env.ref_min_return) / (spec.env.ref_max_return - spec.env.ref_min_return)


def build(
    name: str, out: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Build suite dataset ``name`` into ``out`` (default: the data directory); returns the path and the
    build record (transitions, episodes, mean return, normalised score, arrays' SHA-256, versions)."""
    from offrl.builtin import dataset_path

    spec = get_spec(name)
    dest = Path(out) if out is not None else dataset_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    record_components(
        spec.env.env_id,
        spec.components,
        spec.seed,
        dest,
        num_envs=spec.num_envs,
        metadata={
            "dataset": spec.name,
            "suite": spec.suite,
            "level": spec.level,
            "seed": spec.seed,
            "description": spec.description,
            "components": [
                {"policy": c.policy, "transitions": c.transitions, "epsilon": c.epsilon}
                for c in spec.components
            ],
        },
        ref_min_return=spec.env.ref_min_return,
        ref_max_return=spec.env.ref_max_return,
        progress=progress,
    )
    env_spec = gym.spec(spec.env.env_id)
    raw = fmt.read_raw(dest)
    stats = behaviour_stats(raw, env_spec.max_episode_steps)
    built: dict[str, Any] = {
        "transitions": spec.transitions,
        **stats,
        "normalized_score": round(normalized(spec, stats["mean_return"]), 2),
        "sha256": arrays_sha256(raw),
        "package_versions": {k: v for k, v in package_versions().items() if k in _VERSIONED},
        "platform": build_platform(),
    }
    built["mean_return"] = round(built["mean_return"], 3)
    return dest, built


def mismatch(spec: DatasetSpec, built: dict[str, Any]) -> str | None:
    """Why a build differs from the manifest's record (None if it matches or there is no record)."""
    want = spec.built.get("sha256")
    if not want or want == built["sha256"]:
        return None
    then, now = dict(spec.built.get("package_versions", {})), dict(built["package_versions"])
    then["platform"], now["platform"] = spec.built.get("platform"), built["platform"]
    if then["platform"] and " (" not in str(then["platform"]):  # recorded before platforms named the CPU
        now["platform"] = str(now["platform"]).split(" (")[0]
    changed = [
        f"{k} {then.get(k)} → {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)
    ]
    why = f"differences: {', '.join(changed)}" if changed else "same versions and platform: a bug"
    score, theirs = built.get("normalized_score"), spec.built.get("normalized_score")
    if changed and score is not None and theirs is not None:
        # the bytes cannot match across such differences; what matters is that the data are as good
        why += f"; normalised score of the data {score:.1f} here, {theirs:.1f} in the manifest"
    return f"arrays' SHA-256 {built['sha256'][:12]}… differs from the manifest's {want[:12]}… ({why})"


def update_manifest(name: str, built: dict[str, Any]) -> Path:
    """Store a build record in the dataset's manifest entry (maintainers, after rebuilding a suite)."""
    spec = get_spec(name)
    path = suites_dir() / f"{spec.suite}.json"
    data = json.loads(path.read_text())
    for d in data["datasets"]:
        if d["name"] == name:
            d["built"] = built
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def ensure(name: str, *, progress: bool = True) -> Path:
    """The cached file of suite dataset ``name``, built on first use."""
    from offrl.builtin import dataset_path

    path = dataset_path(name)
    if not path.exists():
        if progress:
            print(f"building {name} into {path} (first use) …", flush=True)
        build(name, path, progress=progress)
    return path


def format_dataset_list() -> str:
    """The table of ``offrl datasets list``: built-in recipes and the suites' datasets, whether each is
    built here, and the notes of the manifests (pending environments, experts below their reference)."""
    from offrl import builtin

    specs = all_specs()
    lines = [f"{'name':<44} {'env':<26} {'level':<14} {'transitions':>11} {'score':>6}  local"]
    for name, recipe in builtin.RECIPES.items():
        built = "yes" if builtin.dataset_path(name).exists() else "-"
        lines.append(f"{name:<44} {recipe.env_id:<26} {'mixed':<14} {'':>11} {'':>6}  {built}")
    for name, spec in specs.items():
        local = "yes" if builtin.dataset_path(name).exists() else "-"
        score = spec.built.get("normalized_score")
        score_s = f"{score:6.1f}" if score is not None else f"{'?':>6}"
        lines.append(
            f"{name:<44} {spec.env.env_id:<26} {spec.level:<14} {spec.transitions:>11,} {score_s}  {local}"
        )
    hint = missing_manifests_hint()
    if hint:
        lines.append(hint)
    pending = {f"{s.suite}/{s.env.key}": s.env.pending for s in specs.values() if s.env.pending}
    lines += [f"{env_name}: not listed yet: {why}" for env_name, why in pending.items()]
    short = {
        f"{s.suite}/{s.env.key}": s.env.expert_shortfall for s in specs.values() if s.env.expert_shortfall
    }
    lines += [f"{env_name}: expert below its reference: {why}" for env_name, why in short.items()]
    lines.append(
        f"\nscore: normalised score of the behaviour data (0 random, 100 expert reference)."
        f"\ndata directory: {builtin.data_dir()} (set OFFRL_DATA_DIR to move it); manifests: {suites_dir()}"
    )
    return "\n".join(lines)
