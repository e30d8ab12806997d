"""Built-in datasets made in seconds from scripted controllers and random policies.

They are the default data of the README's main job and of the learning tests until trained
behaviour policies exist. Each recipe states its components (policy, episode count) and the
reference returns used for normalised scores; building is deterministic for given package versions.
Files are cached in the data directory (``$OFFRL_DATA_DIR``, default ``~/.offrl/datasets``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from offrl.errors import DatasetError
from offrl.suites import Component, record_components


@dataclass(frozen=True)
class Recipe:
    name: str
    env_id: str
    components: tuple[Component, ...]
    seed: int
    ref_min_return: float  # mean return of the uniform random policy
    ref_max_return: float  # mean return of the noise-free scripted controller
    description: str


# Reference returns: means over 200 seeded episodes (see tests/test_scripted.py for the controllers).
_CARTPOLE_REF = (22.0, 500.0)
_PENDULUM_REF = (-1217.0, -140.0)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "builtin/cartpole-expert",
            "CartPole-v1",
            (Component("scripted:cartpole-eps0.05", episodes=20),),
            seed=0,
            ref_min_return=_CARTPOLE_REF[0],
            ref_max_return=_CARTPOLE_REF[1],
            description="20 episodes of the balancing controller with 5% random actions (~10k transitions)",
        ),
        Recipe(
            "builtin/cartpole-mixed",
            "CartPole-v1",
            (
                Component("scripted:cartpole-eps0.1", episodes=10),
                Component("scripted:cartpole_anti-eps0.1", episodes=1000),
                Component("random", episodes=300),
            ),
            seed=1,
            ref_min_return=_CARTPOLE_REF[0],
            ref_max_return=_CARTPOLE_REF[1],
            description=(
                "10 episodes of the balancing controller and 1000 of its opposite (pushes the pole over), "
                "both with 10% random actions, and 300 random episodes: most start-state actions are wrong"
            ),
        ),
        Recipe(
            "builtin/pendulum-mixed",
            "Pendulum-v1",
            (Component("scripted:pendulum-noise0.5", episodes=20), Component("random", episodes=80)),
            seed=2,
            ref_min_return=_PENDULUM_REF[0],
            ref_max_return=_PENDULUM_REF[1],
            description="20 episodes of the swing-up controller with noise, 80 random episodes (20k transitions)",
        ),
    )
}


def data_dir() -> Path:
    return Path(os.environ.get("OFFRL_DATA_DIR", Path.home() / ".offrl" / "datasets"))


def dataset_path(name: str) -> Path:
    return data_dir() / f"{name}.h5"


def build(name: str, out: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """Record the components of recipe ``name`` and merge them into one file (atomically)."""
    if name not in RECIPES:
        raise DatasetError(name, f"unknown built-in dataset; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    dest = Path(out) if out is not None else dataset_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    record_components(
        recipe.env_id,
        recipe.components,
        recipe.seed,
        dest,
        metadata={"recipe": recipe.name, "description": recipe.description, "seed": recipe.seed},
        ref_min_return=recipe.ref_min_return,
        ref_max_return=recipe.ref_max_return,
        progress=progress,
    )
    return dest


def ensure(name: str, *, progress: bool = True) -> Path:
    """The cached file of a built-in dataset, building it on first use."""
    path = dataset_path(name)
    if not path.exists():
        build(name, path, progress=progress)
    return path
