"""Hardware-aware automatic compression search: from a budget to a deployable model.

    result = es.search(model, data, es.Budget(max_latency_ms=0.5, target="ort"))
    result.model; result.front; result.report_path

One idea per module:

- :mod:`.space`: what may change per layer / per coupled channel group (``SearchSpace``);
- :mod:`.apply`: a candidate -> a compressed model, through the existing verbs;
- :mod:`.cost`: hardware cost, measured once per layer configuration, then predicted (a
  per-machine latency lookup table for ONNX Runtime / PyTorch; the C backend's own numbers
  for microcontrollers); :mod:`.predictor_eval` says how good the prediction is;
- :mod:`.budget`: the limits and what a violation costs;
- :mod:`.executor`: where trials run (local process pool, or Ray);
- :mod:`.store`: every finished trial persisted in the run directory (resume);
- :mod:`.trial`: one trial as a worker runs it (build, short fine-tune, quantize, evaluate);
- :mod:`.sampler`: the seeded Optuna sampler and the study rebuilt from finished trials;
- :mod:`.front`: the Pareto front of the finished trials;
- :mod:`.fit`: whether a measured latency fits, robust to a loaded machine;
- :mod:`.verify`: the answer written for its target and measured from the file;
- :mod:`.engine`: the search itself: generations, finalists, the choice, the report.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from edgeslim.search.budget import Budget
from edgeslim.search.space import SearchSpace

__all__ = ["Budget", "SearchResult", "SearchSpace", "search"]


def __getattr__(name: str):
    if name in ("search", "SearchResult"):
        import importlib

        return getattr(importlib.import_module("edgeslim.search.engine"), name)
    raise AttributeError(f"module 'edgeslim.search' has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    """``edgeslim.search`` is both this package and the function: importing the package
    makes it the attribute ``edgeslim.search`` (hiding the facade's lazy function), so the
    package itself calls :func:`edgeslim.search.engine.search`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        return importlib.import_module("edgeslim.search.engine").search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
