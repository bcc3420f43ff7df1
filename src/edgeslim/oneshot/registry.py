"""How a one-shot algorithm plugs into the engine: its interface and the config table.

An algorithm says which statistics to collect per linear layer (``stats_type``: an
accumulator of :mod:`.stats`) and how to compress one layer from them
(:meth:`OneShotAlgorithm.compress_layer`); an optional block-level step
(:meth:`OneShotAlgorithm.prepare_block`, e.g. SmoothQuant's smoothing) runs first. The
engine owns the loop over a block's layers.

Each algorithm module registers itself with its config class at its bottom::

    register(Wanda, WandaAlgorithm)

so that :func:`algorithm_for` (used by the engine) never imports an algorithm; a config
instance exists only once its module, and so its registration, was imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from edgeslim.core.errors import ConfigError


class OneShotAlgorithm:
    """What an algorithm tells the engine (subclass it; ``cfg`` is its config)."""

    # InputNorms, Hessian or InputAbsMax: one per linear layer, built as
    # stats_type(in_features, device=<the layer weight's device>)
    stats_type: ClassVar[type]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def prepare_block(
        self, block: nn.Module, layers: dict[str, nn.Module], stats: dict[str, Any]
    ) -> None:
        """A step over the whole block before its layers are compressed (none by default);
        ``layers`` maps full names to the modules inside ``block``, ``stats`` likewise."""

    def compress_layer(self, name: str, module: nn.Module, stats: Any) -> Any:
        """Compress ``module`` (full name ``name``) in place from its statistics; return its
        log entry."""
        raise NotImplementedError


_ALGORITHMS: dict[type, Callable[[Any], OneShotAlgorithm]] = {}


def register(config_type: type, algorithm: Callable[[Any], OneShotAlgorithm]) -> None:
    """Make ``algorithm(cfg)`` the engine-side algorithm of configs of ``config_type``."""
    _ALGORITHMS[config_type] = algorithm


def algorithm_for(cfg: Any) -> tuple[OneShotAlgorithm, str]:
    """The engine-side algorithm of a one-shot config, and the config's label."""
    if type(cfg) not in _ALGORITHMS:
        known = ", ".join(c.__name__ for c in _ALGORITHMS)
        raise ConfigError(f"{type(cfg).__name__} is not a one-shot method; known: {known}")
    return _ALGORITHMS[type(cfg)](cfg), cfg.label
