"""The built-in pipeline stage kinds.

Importing this package registers every stage kind (``prune``, ...) with
:func:`edgeslim.pipeline.stages.base.register_stage`. A stage adapter is one module here: how
to validate its YAML body and how to run the technique's verb on a model; add one import line
below for a new one.
"""

from __future__ import annotations

from edgeslim.pipeline.stages import dynamic as _dynamic  # noqa: F401
from edgeslim.pipeline.stages import lowrank as _lowrank  # noqa: F401
from edgeslim.pipeline.stages import pack as _pack  # noqa: F401
from edgeslim.pipeline.stages import prune as _prune  # noqa: F401
from edgeslim.pipeline.stages import quant as _quant  # noqa: F401
from edgeslim.pipeline.stages import search as _search  # noqa: F401
from edgeslim.pipeline.stages import share as _share  # noqa: F401
