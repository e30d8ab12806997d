"""Helper for tests/test_recorder.py: start a recording far too long to finish, to be SIGKILLed.

Usage: python tests/_killed_recorder.py DEST
"""

from __future__ import annotations

import sys

import gymnasium as gym

from offrl.data.recorder import record
from offrl.policies import RandomPolicy

if __name__ == "__main__":
    record(
        "CartPole-v1",
        RandomPolicy(gym.spaces.Discrete(2), seed=0),
        steps=10**9,
        out=sys.argv[1],
        progress=False,
    )
