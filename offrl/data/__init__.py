"""Dataset format v1: writing, recording, checking, loading and converting."""

from offrl.data.arrays import from_arrays
from offrl.data.dataset import TransitionDataset
from offrl.data.format import FORMAT_VERSION, RawDataset, check, load_checked, read_raw, validate
from offrl.data.sampling import FullPassSampler
from offrl.data.writer import DatasetWriter, write_raw

__all__ = [
    "FORMAT_VERSION",
    "DatasetWriter",
    "FullPassSampler",
    "RawDataset",
    "TransitionDataset",
    "check",
    "from_arrays",
    "load_checked",
    "read_raw",
    "validate",
    "write_raw",
]
