"""Shared test settings: fixed thread count (results differ between thread counts)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OFFRL_NO_PROGRESS", "1")
torch.set_num_threads(1)
