"""The prune registry: config class -> handler; each technique module registers itself.

A new technique adds its config and handler in its own module and ends it with
``REGISTRY.register("name", Config, handler)`` (see docs/architecture.md).
"""

from __future__ import annotations

from edgeslim.core.registry import Registry

REGISTRY = Registry("prune_")
METHODS = REGISTRY.methods  # recipe name -> config class

# What a structural pruner (channels, blocks) reads: it traces the model on ``example`` and
# may measure importance or sensitivity on ``data`` / ``calib``.
STRUCTURAL_TAKES = ("filter_fn", "example", "data", "calib")
