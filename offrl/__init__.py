"""offrl: offline reinforcement learning from logged episodes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("offrl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
