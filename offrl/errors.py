"""Errors meant for people: each names the file, key, row or flag at fault."""

from __future__ import annotations


class OfflineRLError(Exception):
    """Base class of offrl's own errors; the CLI prints them without a traceback and exits non-zero."""


class DatasetError(OfflineRLError):
    """A dataset file is unreadable or violates the format (one line per problem)."""

    def __init__(self, path: object, problems: list[str] | str) -> None:
        self.path = str(path)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"{self.path}: {p}" for p in self.problems)
        super().__init__(lines)


class ConfigError(OfflineRLError):
    """A configuration file, --set override or flag is invalid."""


class CheckpointError(OfflineRLError):
    """A checkpoint or policy artefact is missing, incompatible or corrupt."""
