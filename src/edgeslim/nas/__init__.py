"""Hardware-aware neural architecture search for microcontrollers (MCUNet / Once-for-All).

    result = es.nas(es.load_data("mnist"), device="stm32f446", out="runs/nas")

One idea per module:

- :mod:`.supernet`: the elastic inverted-residual supernet and :class:`SubnetConfig`;
- :mod:`.extract`: :func:`extract` (a sub-network as an ordinary ``nn.Module``) and the
  per-sub-network BatchNorm re-calibration;
- :mod:`.train`: the sandwich rule with in-place distillation, checkpointed and resumable;
- :mod:`.cost`: a sub-network's SRAM / flash / latency on a device, cheapest check first;
- :mod:`.space_opt`: TinyNAS's search-space optimisation (width x resolution);
- :mod:`.evolve`: the evolutionary search under the device's constraints;
- :mod:`.api`: :func:`nas`, the whole run (persisted, resumable) down to C checked bit-exact
  with TFLite Micro.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = [
    "BudgetError",
    "NasResult",
    "SandwichTraining",
    "SubnetConfig",
    "Supernet",
    "SupernetSpec",
    "extract",
    "nas",
    "train_supernet",
]

_WHERE = {
    "BudgetError": "edgeslim.nas.cost",
    "NasResult": "edgeslim.nas.api",
    "nas": "edgeslim.nas.api",
    "SandwichTraining": "edgeslim.nas.train",
    "train_supernet": "edgeslim.nas.train",
    "SubnetConfig": "edgeslim.nas.supernet",
    "Supernet": "edgeslim.nas.supernet",
    "SupernetSpec": "edgeslim.nas.supernet",
    "extract": "edgeslim.nas.extract",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'edgeslim.nas' has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    """``edgeslim.nas`` is both this package and the function: importing the package makes
    it the attribute ``edgeslim.nas`` (hiding the facade's lazy function), so the package
    itself calls :func:`edgeslim.nas.api.nas` (as ``edgeslim.search`` does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        return importlib.import_module("edgeslim.nas.api").nas(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
