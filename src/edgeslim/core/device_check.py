"""Checking a device a user names (a recipe's ``device:``, ``--device`` on the CLI).

    check_device("cuda:0", "device")   # torch.device('cuda:0'), or a ConfigError saying why not

A name torch does not know, a device this machine does not have (``cuda`` without a GPU or
with torch built without CUDA, ``mps`` off Apple silicon, ``cuda:3`` on a two-GPU machine)
and the ``meta`` device (tensors without data, nothing to compute with) are each a
:class:`ConfigError` naming the device. Nothing here is CUDA-specific: a backend module
``torch.<type>`` with ``is_available()`` / ``device_count()`` (cuda, xpu, mtia ...) is asked.
"""

from __future__ import annotations

import torch

from edgeslim.core.errors import ConfigError


def _backend(kind: str):
    if kind == "mps":
        return torch.backends.mps
    return getattr(torch, kind, None)


def check_device(value: str | torch.device, where: str = "device") -> torch.device:
    """``value`` as a :class:`torch.device` this machine can compute on; else ConfigError.

    ``where`` names the setting in the message (``device``, ``--device``).
    """
    if isinstance(value, torch.device):
        device = value
    else:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{where}: a device is a name like cpu, cuda, cuda:1 or mps; got {value!r}"
            )
        try:
            device = torch.device(value.strip())
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"{where}: {value!r} is not a torch device (cpu, cuda, cuda:1, mps ...): {exc}"
            ) from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ConfigError(
            f"{where}: 'meta' tensors hold no data, so no model can run there; use cpu or a GPU"
        )
    backend = _backend(device.type)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise ConfigError(
            f"{where}: edgeslim cannot tell whether device {str(device)!r} exists "
            "on this machine; use cpu, cuda or mps"
        )
    if not available():
        why = ""
        built = torch.version.cuda or getattr(torch.version, "hip", None)
        if device.type == "cuda" and not built:
            why = f" (this torch {torch.__version__} is built without CUDA)"
        elif device.type == "cuda":
            why = " (no NVIDIA GPU or driver found)"
        raise ConfigError(
            f"{where}: device {str(device)!r} is not available on this machine{why}; "
            "use device: cpu"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(
            f"{where}: device {str(device)!r} does not exist: this machine has {count()} "
            f"{device.type} device(s) (indices 0..{count() - 1})"
        )
    return device
