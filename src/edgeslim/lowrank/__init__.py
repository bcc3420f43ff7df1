"""Low-rank factorisation: one verb, :func:`lowrank_`, dispatching on the config's type.

    lowrank_(model, SVD(energy=0.9))                                  # Linear layers, weights
    lowrank_(model, ConvDecompose(macs=0.5, linear=True), calib=data.calib(256))

Each chosen layer becomes a :class:`Factored` pair of thinner layers (:mod:`.layers`). The
components come from a solver -- weight SVD (:mod:`.svd`) or response reconstruction on
calibration data (Zhang et al. 2015, :mod:`.conv`) -- and the number kept per layer from a
rank rule (:mod:`.ranks`: fixed rank, energy share, or a MAC budget spent by measured
sensitivity). ``method: NAME`` in a recipe's ``lowrank`` stage picks the config class
registered under ``NAME``.
"""

from __future__ import annotations

from edgeslim.lowrank import factorize as _factorize  # noqa: F401  (registers svd and conv)
from edgeslim.lowrank.conv import ConvDecompose, response_factors
from edgeslim.lowrank.layers import Factored, Factorization, restore_
from edgeslim.lowrank.registry import METHODS, REGISTRY
from edgeslim.lowrank.svd import SVD, weight_factors

register = REGISTRY.register

lowrank_ = REGISTRY.verb(
    """Factorise ``model``'s layers in place as ``cfg`` says; one log entry per factorised layer.

    ``calib`` (a tensor of inputs, or an iterable of batches) is needed by the response
    solver and by a ``macs`` budget; ``filter_fn(module, name)`` restricts the layers.
    Each entry has the layer's ``rank``, ``max_rank``, kept ``energy``, and its ``macs``
    before and ``factored_macs`` after (per sample). Layers whose factorised form would not
    be cheaper are left as they are.
    """
)


__all__ = [
    "METHODS",
    "SVD",
    "ConvDecompose",
    "Factored",
    "Factorization",
    "lowrank_",
    "register",
    "response_factors",
    "restore_",
    "weight_factors",
]
