"""Target device profiles: memory budgets and a documented latency model.

Profiles are YAML files shipped in ``edgeslim/profile/devices/`` (one per device; add your
own the same way or load one by path)::

    dev = load_device("stm32f746")      # or an alias ("cortex-m7") or a path to a .yaml
    dev.check_fit(sram_bytes, flash_bytes)
    dev.latency_ms(macs)

**Latency model.** ``latency = MACs x cycles_per_mac / clock``. ``cycles_per_mac`` is an
estimate (stated and explained in each profile) of what edgeslim's scalar C kernels cost
per int8 multiply-accumulate on that core; MACs dominate the run time of convolutional
networks, everything else (requantization, pooling, copies) is folded into that constant.
It is an estimate for planning, not a measurement: measure on the board for real numbers.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options, validate


class Device(Options):
    """A deployment target: SRAM and flash budgets, clock, cost of one int8 MAC."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    core: str
    aliases: list[str] = Field(default_factory=list)
    sram_bytes: int = Field(gt=0)
    flash_bytes: int = Field(gt=0)
    clock_mhz: float = Field(gt=0)
    cycles_per_mac: float = Field(gt=0)

    def latency_ms(self, macs: int) -> float:
        """Estimated latency of ``macs`` int8 MACs (see the module docstring)."""
        return macs * self.cycles_per_mac / (self.clock_mhz * 1e3)

    def check_fit(self, sram_bytes: int, flash_bytes: int) -> list[str]:
        """What does not fit: an empty list when both budgets hold."""
        problems = []
        if sram_bytes > self.sram_bytes:
            problems.append(f"SRAM {sram_bytes:,} B > {self.sram_bytes:,} B")
        if flash_bytes > self.flash_bytes:
            problems.append(f"flash {flash_bytes:,} B > {self.flash_bytes:,} B")
        return problems


def _profiles() -> dict[str, Path]:
    folder = files("edgeslim.profiling") / "devices"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def device_names() -> list[str]:
    """Names of the shipped device profiles."""
    return sorted(_profiles())


def _read(path: Path) -> Device:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc}") from exc
    return validate(Device, data, str(path))


def load_device(name: str | os.PathLike) -> Device:
    """The device profile ``name`` (a shipped name, an alias, or a path to a YAML file)."""
    text = os.fspath(name)
    if text.endswith((".yaml", ".yml")):
        return _read(Path(text))
    profiles = _profiles()
    key = text.lower()
    if key in profiles:
        return _read(profiles[key])
    for path in profiles.values():
        dev = _read(path)
        if key in (a.lower() for a in dev.aliases):
            return dev
    raise ConfigError(
        f"unknown device {text!r}; known: {', '.join(device_names())} (or a path to a .yaml)"
    )
