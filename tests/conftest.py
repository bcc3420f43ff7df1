import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks/NAME.py`` (benchmarks is no package: imported by path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
