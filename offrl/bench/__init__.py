"""Benchmark grids: expand a TOML grid into runs, execute them locally or on Ray, and report honest
statistics (final checkpoint, IQM with stratified bootstrap intervals) with tables and plots."""

from offrl.bench.grid import Cell, GridConfig, expand, load_grid
from offrl.bench.runner import BenchSummary, run_grid

__all__ = ["BenchSummary", "Cell", "GridConfig", "expand", "load_grid", "run_grid"]
