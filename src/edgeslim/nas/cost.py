"""What a sub-network costs on a microcontroller, cheapest check first.

MCUNet (Lin et al. 2020, "MCUNet: Tiny Deep Learning on IoT Devices",
https://arxiv.org/abs/2007.10319) searches with the device's real memory numbers; here they
come from edgeslim's own C backend, in three tiers:

1. **bounds** (:meth:`SubnetCost.bounds`, no model built): MACs and parameters from the
   configuration alone. The device model's latency bound for that many MACs
   (:meth:`~edgeslim.profiling.devices.Device.latency_bound_ms`: every MAC at the cheapest
   op type's rate, nothing else counted) never exceeds its latency of the export (patches
   only add MACs), so a candidate over a latency limit here is over
   it for real and is dropped without lowering (flash has no such bound: ``export_c``
   may store a layer's weights in fewer than 8 bits);
2. **plan** (:meth:`SubnetCost.predict`): the sub-network lowered to the int8 graph, its
   memory planned by :mod:`edgeslim.export.c.planner` without and with patch-based
   execution (MCUNetV2; patches are used, as ``export_c`` does, only when the plain plan
   does not fit the device's SRAM), flash = the constants ``export_c`` writes + the code
   size measured once (:meth:`SubnetCost.calibrate`, as the search's ``McuTarget``
   does), latency = the device model on the graph's work per op type
   (:func:`edgeslim.export.c.workload.workload`, with the patches' extra MACs);
3. **export** (:func:`measure_export`): the finalist exported with
   :func:`edgeslim.export.c.export_c`; SRAM and latency from what was written, flash from
   the compiled object (the ARM link when ``arm-none-eabi-gcc`` is installed).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.nas.extract import extract
from edgeslim.nas.supernet import SubnetConfig, Supernet, SupernetSpec
from edgeslim.search.budget import Budget

__all__ = ["BudgetError", "SubnetCost", "measure_export"]

BOUNDED = ("latency_ms",)  # metrics tier 1 bounds from below


class BudgetError(ConfigError):
    """No sub-network of the space fits the budget (the message gives the smallest's needs)."""


def _calib(spec: SupernetSpec, resolution: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, spec.in_channels, resolution, resolution, generator=g)


class SubnetCost:
    """Costs of sub-networks of ``supernet`` on ``device``, cached by configuration."""

    def __init__(self, supernet: Supernet, device: str, code_bytes: int | None = None) -> None:
        self.supernet = supernet
        self.spec = supernet.spec
        from edgeslim.profiling.devices import load_device

        self.device = load_device(device)
        self.code_bytes = code_bytes
        self.cache: dict[str, dict[str, Any]] = {}
        self.lowered = 0  # sub-networks planned (tier 2), for the report

    def calibrate(self) -> int:
        """The generated C's code size (text minus constants) of the largest sub-network,
        compiled on this host (0 without a C compiler); kept for every later prediction."""
        if self.code_bytes is None:
            from edgeslim.export import int8
            from edgeslim.export.c import code_bytes

            cfg = self.spec.largest()
            model = extract(self.supernet, cfg).eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = int8.lower(model, _calib(self.spec, cfg.resolution), name="subnet")
            self.code_bytes = code_bytes(graph)
        return self.code_bytes

    def bounds(self, cfg: SubnetConfig) -> dict[str, float]:
        """MACs, parameters and the latency lower bound, from ``cfg`` alone."""
        macs, params = self.spec.macs(cfg), self.spec.params(cfg)
        return {
            "macs": macs,
            "params": params,
            "weights_kb": params / 1024,  # int8 (packed layers may need less: no bound)
            "latency_ms": self.device.latency_bound_ms(macs),
        }

    def predict(self, cfg: SubnetConfig, model: nn.Module | None = None) -> dict[str, Any]:
        """SRAM (plain and patch-based), flash and latency from the planned int8 graph."""
        key = cfg.key()
        if key in self.cache:
            return self.cache[key]
        from edgeslim.export import int8
        from edgeslim.export.c import codegen, compress, plan_for
        from edgeslim.export.c.workload import workload

        model = model if model is not None else extract(self.supernet, cfg).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = int8.lower(model, _calib(self.spec, cfg.resolution), name="subnet")
        packed = compress.choose(graph, "auto")
        io = graph.io_bytes()
        plain = plan_for(graph, patch=False, packed=packed)
        patched = plan_for(graph, patch=True, packed=packed)
        sram_plain, sram_patch = plain.arena_size + io, patched.arena_size + io
        use_patch = sram_plain > self.device.sram_bytes and patched.patch is not None
        work = workload(graph, packed, patched if use_patch else plain)
        flash = codegen.constant_bytes(graph, packed) + (self.code_bytes or 0)
        cost = {
            "macs": graph.macs(),
            "params": self.spec.params(cfg),
            "sram_kb": (sram_patch if use_patch else sram_plain) / 1024,
            "sram_plain_kb": sram_plain / 1024,
            "sram_patch_kb": sram_patch / 1024,
            "patch": bool(use_patch),
            "flash_kb": flash / 1024,
            "latency_ms": self.device.latency_ms(work),
        }
        self.lowered += 1
        self.cache[key] = cost
        return cost

    def cost(self, cfg: SubnetConfig, budget: Budget) -> dict[str, Any]:
        """The cheapest cost that decides ``cfg`` against ``budget``: the bounds when they
        already exceed it (``tier`` 1), else the planned graph's (``tier`` 2)."""
        low = self.bounds(cfg)
        over = [m for m, lim in budget.limits().items() if m in BOUNDED and low[m] > lim]
        if over:  # the other limited metrics were not computed: NaN (never feasible)
            unknown = {m: float("nan") for m in budget.limits() if m not in low}
            return {**low, **unknown, "tier": 1}
        return {**self.predict(cfg), "tier": 2}

    def smallest_needs(self, budget: Budget) -> str:
        """What the smallest sub-network needs, against the budget (for a BudgetError)."""
        cost = self.predict(self.spec.smallest())
        limits = budget.limits()
        parts = [
            f"SRAM {cost['sram_kb']:.1f} KB (limit {limits.get('sram_kb', float('nan')):.0f})",
            f"flash {cost['flash_kb']:.1f} KB (limit {limits.get('flash_kb', float('nan')):.0f})",
            f"latency {cost['latency_ms']:.2f} ms"
            + (f" (limit {limits['latency_ms']:g})" if "latency_ms" in limits else ""),
        ]
        return "; ".join(parts)


def measure_export(export: Any, device: Any) -> dict[str, Any]:
    """SRAM, flash and latency of a :class:`~edgeslim.export.c.CExport` (what was written):
    flash from the ARM link when built for the core, else the host object's text + rodata
    (the constants alone without a C compiler); SRAM = arena + I/O buffers (+ the stack
    measured on QEMU when it ran); latency from the device model, patches' MACs included."""
    from edgeslim.export.c import hostbuild
    from edgeslim.export.c.workload import workload

    flash, source = export.weight_bytes, "constants"
    if export.arm is not None:
        flash, source = export.arm.flash, "arm-none-eabi link"
    elif hostbuild.compiler() is not None:
        sizes = hostbuild.object_size(
            {p.name: p.read_text() for p in export.files if p.suffix in (".c", ".h")}
        )
        flash, source = sizes["text"] + sizes["rodata"], "host object"
    sram = export.arena_bytes + export.io_bytes
    if export.arm is not None and export.arm.sram is not None:
        sram = export.arm.sram
    macs = export.graph.macs()
    if export.plan.patch is not None:
        macs = round(macs * (1 + export.plan.patch.mac_overhead))
    return {
        "sram_kb": sram / 1024,
        "flash_kb": flash / 1024,
        "latency_ms": device.latency_ms(workload(export.graph, export.packed, export.plan)),
        "macs": macs,
        "patch": export.plan.patch is not None,
        "flash_from": source,
    }
