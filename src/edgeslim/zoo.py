"""``edgeslim.zoo``: the built-in model zoo (see :mod:`edgeslim.models.zoo`)."""

from .models.zoo import create, names, register

__all__ = ["create", "names", "register"]
