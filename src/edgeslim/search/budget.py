"""The budget: what the answer must not exceed, on which target.

    Budget(max_latency_ms=2.0, target="ort")
    Budget(max_flash_kb=512, max_sram_kb=128, target="stm32f446")

A cost is a dict of metrics (``latency_ms``, ``size_kb``, ``flash_kb``, ``sram_kb``); a
violation is the relative excess over a limit (0 when within it). The search's constraint
values are those excesses (<= 0 is feasible, Optuna's convention); the closest point of an
infeasible search is the one with the smallest summed excess.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options

LIMITS = {
    "max_latency_ms": "latency_ms",
    "max_flash_kb": "flash_kb",
    "max_sram_kb": "sram_kb",
    "max_size_kb": "size_kb",
}


class Budget(Options):
    """Limits for the searched model on ``target`` (a runtime or a device profile name).

    ``target``: ``"ort"`` (ONNX Runtime, the default), ``"torch"``, or a microcontroller
    profile (``"stm32f446"`` ...: SRAM and flash from the C export, latency from the
    device's cycles-per-MAC model). At least one limit is required.
    """

    model_config = ConfigDict(extra="forbid")

    max_latency_ms: float | None = Field(None, gt=0)
    max_flash_kb: float | None = Field(None, gt=0)
    max_sram_kb: float | None = Field(None, gt=0)
    max_size_kb: float | None = Field(None, gt=0)
    target: str = "ort"

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if all(getattr(self, k) is None for k in LIMITS):
            raise ValueError(f"give at least one limit: {', '.join(LIMITS)}")
        return self

    def limits(self) -> dict[str, float]:
        """``{metric: limit}`` of the limits given."""
        return {m: float(getattr(self, k)) for k, m in LIMITS.items() if getattr(self, k)}

    def check_metrics(self, metrics: tuple[str, ...] | list[str], target: str) -> None:
        """ConfigError when a limit names a metric ``target`` does not have."""
        bad = [m for m in self.limits() if m not in metrics]
        if bad:
            raise ConfigError(
                f"Budget: target {target!r} has no {', '.join(bad)} (it reports "
                f"{', '.join(metrics)}); flash and SRAM need a microcontroller profile"
            )

    def excess(self, cost: dict[str, Any]) -> dict[str, float]:
        """Relative excess over each limit: (cost - limit) / limit; <= 0 means within it."""
        return {m: (float(cost[m]) - lim) / lim for m, lim in self.limits().items()}

    def constraints(self, cost: dict[str, Any]) -> list[float]:
        """Optuna constraint values (<= 0 feasible), in the order of :meth:`limits`."""
        return list(self.excess(cost).values())

    def feasible(self, cost: dict[str, Any]) -> bool:
        return all(v <= 0 for v in self.excess(cost).values())

    def violation(self, cost: dict[str, Any]) -> float:
        """Summed relative excess (0 when feasible): how far from fitting."""
        return sum(max(0.0, v) for v in self.excess(cost).values())

    def primary(self) -> str:
        """The metric the search minimises beside accuracy (latency first, then flash ...)."""
        return next(iter(self.limits()))
