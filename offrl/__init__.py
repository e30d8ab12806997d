"""offrl: offline reinforcement learning from logged episodes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("offrl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["TransitionDataset", "__version__", "fit", "load_policy", "record"]


def __getattr__(name: str) -> object:
    # Lazy: `import offrl` (and the CLI) stays fast; torch loads only when these are used.
    if name == "load_policy":
        from offrl.policies.artifact import load_policy

        return load_policy
    if name == "fit":
        from offrl.train import fit

        return fit
    if name == "record":
        from offrl.data.recorder import record

        return record
    if name == "TransitionDataset":
        from offrl.data.dataset import TransitionDataset

        return TransitionDataset
    raise AttributeError(f"module 'offrl' has no attribute {name!r}")
