"""Errors raised by edgeslim.

Every error a user can cause (bad recipe, unknown model, wrong input shape, corrupt file)
is an :class:`EdgeslimError` subclass whose message names *what* is wrong, *where*
(key path, file, layer) and, where possible, what to do about it.
"""

from __future__ import annotations


class EdgeslimError(Exception):
    """Base class of every error edgeslim raises on bad input."""


class ConfigError(EdgeslimError, ValueError):
    """A recipe or config is malformed: unknown key, wrong type, value out of range."""


class ModelSourceError(EdgeslimError):
    """A model source (``zoo:``, ``py:``, a ``.pt2`` file) cannot be resolved or loaded."""


class UnknownModelError(ModelSourceError, KeyError):
    """A zoo name that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(EdgeslimError):
    """A dataset cannot be found, read, or has inconsistent arrays."""


class CalibrationError(DataError, TypeError):
    """Calibration data in a form edgeslim does not take (the message lists the forms)."""


class ShapeError(EdgeslimError, ValueError):
    """An input tensor does not have the shape the model expects."""

    @classmethod
    def from_torch(cls, what: str, exc: BaseException) -> ShapeError:
        """``what``, followed by the first line of torch's own message (the useful one)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return cls(f"{what}: {first}")


class CheckpointError(EdgeslimError):
    """A saved stage or model file is missing, truncated or corrupt."""


class ContainerError(CheckpointError):
    """A ``.slim`` file (or one of its streams) is malformed, truncated, corrupt or hostile."""


class RunDirError(EdgeslimError):
    """A run directory holds a different recipe's run, or cannot be written."""


class ExportError(EdgeslimError):
    """An exporter could not write a model, or what it wrote disagrees with PyTorch."""


class LoweringError(ExportError):
    """A model has layers the integer graph (TFLite / C export) does not support."""
