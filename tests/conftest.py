"""Shared test set-up: the project root on sys.path, a headless matplotlib, and the data directory."""

import os
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
matplotlib.use("Agg")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def data_dir():
    """The directory holding MNIST/raw and FashionMNIST/raw: $MIM_DATA_DIR, else ./data."""
    return Path(os.environ.get("MIM_DATA_DIR", ROOT / "data"))
