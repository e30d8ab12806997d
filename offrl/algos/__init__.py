"""Offline algorithms: one per file, each with its config dataclass beside it."""
