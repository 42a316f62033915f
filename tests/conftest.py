"""Shared test fixtures: sample data (fetched once into the user cache) and device marks."""

from __future__ import annotations

import pytest
import torch

from mriface import datasets


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; the CPU variant of this test covers the same logic")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_path():
    """Function ``name -> Path`` of a cached (fetched on first use) sample file."""
    return datasets.fetch
