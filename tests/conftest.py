"""Shared fixtures: every test starts from the same seeds and uses one intra-op thread.

One thread keeps timings and results stable when several test runs share a machine's cores.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator for test data."""
    return np.random.default_rng(0)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU torch generator for test data."""
    return torch.Generator().manual_seed(0)
