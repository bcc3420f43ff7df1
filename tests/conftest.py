import os

import pytest
import torch

os.environ.setdefault("EDGESLIM_QUIET", "1")  # no progress bars in test logs


@pytest.fixture(scope="session")
def mnist():
    from edgeslim import load_data

    return load_data("mnist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
