"""The one registry: offline and online algorithms by name, kind and action space."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from offrl.algos import registry
from offrl.errors import ConfigError
from offrl.online import loop
from offrl.online.dqn import DQN
from offrl.online.ppo import PPO, PPODiscrete
from offrl.online.sac import SAC

BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
DISCRETE = gym.spaces.Discrete(3)


def test_names_by_kind() -> None:
    online, offline = registry.names(online=True), registry.names(online=False)
    assert online == ["dqn", "ppo", "sac"]
    assert {"bc", "cql", "iql"} <= set(offline) and not set(online) & set(offline)
    assert registry.names() == sorted(online + offline)
    assert {cls.online for _, _, cls in registry.variants(online=True)} == {True}
    assert {cls.online for _, _, cls in registry.variants(online=False)} == {False}


def test_online_classes_by_name_and_action_space() -> None:
    assert registry.algorithm_class("ppo", BOX, online=True) is PPO
    assert registry.algorithm_class("ppo", DISCRETE, online=True) is PPODiscrete
    assert registry.algorithm_class("sac", BOX, online=None) is SAC
    assert loop.algorithm_class("dqn", DISCRETE) is DQN
    assert loop.algorithm_names() == registry.names(online=True)


@pytest.mark.parametrize(
    ("name", "online", "message"),
    [
        ("sac", False, r"^'sac' is an online algorithm: use `offrl online` \(offline algorithms: awac, bc"),
        (
            "cql",
            True,
            r"^'cql' is an offline algorithm: use `offrl train` \(online algorithms: dqn, ppo, sac\)$",
        ),
        ("nope", False, r"^unknown algorithm 'nope'; available offline: awac, bc, "),
        ("nope", True, r"^unknown algorithm 'nope'; available online: dqn, ppo, sac$"),
        ("nope", None, r"^unknown algorithm 'nope'; available: awac, bc, bcq, calql, cql, dqn, "),
    ],
)
def test_errors_are_one_line_and_name_the_kind(name: str, online: bool | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        registry.algorithm_class(name, BOX, online=online)
    assert "\n" not in str(info.value)


def test_missing_variant_names_the_ones_there_are() -> None:
    with pytest.raises(ConfigError, match="'sac' has no discrete variant \\(it has: continuous\\)"):
        loop.algorithm_class("sac", DISCRETE)
