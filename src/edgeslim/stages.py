"""The built-in pipeline stage kinds.

Importing this module registers every stage kind (``prune``, ...) with
:func:`edgeslim.config.register_stage`. Each technique keeps its stage in its own package
(``prune/stage.py``: how to validate the YAML body and how to run it); add one import line
here for a new one.
"""

from __future__ import annotations

from .codec import stage as _pack  # noqa: F401
from .lowrank import stage as _lowrank  # noqa: F401
from .prune import stage as _prune  # noqa: F401
from .quant import stage as _quant  # noqa: F401
from .share import stage as _share  # noqa: F401
