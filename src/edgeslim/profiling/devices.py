"""Target device profiles: memory budgets and a documented latency model.

Profiles are YAML files shipped in ``edgeslim/profiling/devices/`` (one per device; add your
own the same way or load one by path)::

    dev = load_device("stm32f746")      # or an alias ("cortex-m7") or a path to a .yaml
    dev.check_fit(sram_bytes, flash_bytes)
    dev.latency_ms(work)                # a Workload (per op type) or a MAC count

**Latency model, Cortex-M profiles** (``instruction_model`` set). Edgeslim's C kernels were
built for Cortex-M4 (``-Os``) and run on QEMU with ``-icount`` (``benchmarks/mcu_latency.py``);
a linear model of the executed *instructions* was fitted to those counts by non-negative
least squares, per op type::

    instructions = a_conv x MACs of convolutions + a_tap x their taps (outputs x KH x KW)
                 + a_dw x MACs of depthwise convolutions
                 + a_fc x MACs of fully connected layers + a_packed x MACs of layers stored
                   compressed (over the weights they store) + b_out x output values of
                   conv / FC layers (requantization) + b_elem x values other ops write
                   (pooling: x taps) + c x ops

The coefficients live in one place, ``devices/instruction-models.yml`` (with the fit's
leave-one-out error), and a profile names the model it uses. Instructions become time by the
profile's ``cycles_per_instruction`` (an assumption, stated in the profile: QEMU counts
instructions, not cycles; it models no pipeline, flash wait states or caches) and its clock:
``ms = instructions x cycles_per_instruction / (clock_mhz x 1e3)``.

**Other profiles** (no instruction model): ``ms = MACs x cycles_per_mac / clock`` with a
stated cycles-per-MAC estimate that folds everything but the MACs into that constant.

Either way it is an estimate for planning, not a measurement: measure on the board.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import yaml
from pydantic import ConfigDict, Field, model_validator

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options, validate

FEATURES = (
    "conv_macs",
    "conv_taps",
    "dw_macs",
    "fc_macs",
    "packed_macs",
    "outputs",
    "elements",
    "ops",
)
MODELS_FILE = "instruction-models.yml"


@dataclass(frozen=True)
class Workload:
    """What one inference of an int8 graph does, per op type (the instruction model's
    features; :func:`edgeslim.export.c.workload` counts them for a graph)."""

    conv_macs: int = 0  # MACs of convolutions (not depthwise) with dense int8 weights
    conv_taps: int = 0  # their output values x KH x KW (the per-tap bounds check and loop)
    dw_macs: int = 0  # MACs of depthwise convolutions
    fc_macs: int = 0  # MACs of fully connected layers with dense int8 weights
    packed_macs: int = 0  # MACs over the stored weights of compressed conv / FC layers
    outputs: int = 0  # output values of conv / FC layers (each requantized)
    elements: int = 0  # values written by every other op (pooling: output x taps)
    ops: int = 0  # ops executed

    @property
    def macs(self) -> int:
        """All multiply-accumulates (compressed layers: over the weights they store)."""
        return self.conv_macs + self.dw_macs + self.fc_macs + self.packed_macs

    def scaled_macs(self, factor: float) -> Workload:
        """The same work with every MAC count scaled (patch-based execution's recompute)."""
        d = asdict(self)
        for key in ("conv_macs", "conv_taps", "dw_macs", "fc_macs", "packed_macs"):
            d[key] = round(d[key] * factor)
        return Workload(**d)

    def vector(self) -> list[float]:
        return [float(getattr(self, k)) for k in FEATURES]


class InstructionModel(Options):
    """Instructions per inference as a linear function of a :class:`Workload`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    coefficients: dict[str, float]
    per_mac: float = Field(gt=0)  # a one-constant fit, for a bare MAC count
    error: dict[str, float] = Field(default_factory=dict)  # leave-one-out, as fitted

    @model_validator(mode="after")
    def _known(self) -> InstructionModel:
        unknown = set(self.coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown coefficients {sorted(unknown)}; known: {list(FEATURES)}")
        if any(v < 0 for v in self.coefficients.values()):
            raise ValueError("coefficients must be >= 0 (fitted by non-negative least squares)")
        return self

    def instructions(self, work: Workload | int) -> float:
        """Estimated instructions of ``work`` (a bare int: MACs x ``per_mac``)."""
        if not isinstance(work, Workload):
            return float(work) * self.per_mac
        return sum(self.coefficients.get(k, 0.0) * getattr(work, k) for k in FEATURES)

    def lower_bound(self, macs: int) -> float:
        """Instructions that ``macs`` MACs of dense layers of any type need at least (all
        terms are >= 0; a compressed layer may do fewer MACs than its dense count)."""
        keys = ("conv_macs", "dw_macs", "fc_macs")
        return float(macs) * min(self.coefficients.get(k, 0.0) for k in keys)


@cache
def instruction_models() -> dict[str, InstructionModel]:
    """The fitted instruction models by name (``devices/instruction-models.yml``)."""
    path = Path(str(files("edgeslim.profiling") / "devices" / MODELS_FILE))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read instruction models {path}: {exc}") from exc
    return {
        name: validate(InstructionModel, {"name": name, **body}, f"{path}:{name}")
        for name, body in data.items()
    }


class Device(Options):
    """A deployment target: SRAM and flash budgets, clock, and its latency model (fitted
    instructions x cycles per instruction, or cycles per MAC)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    core: str
    aliases: list[str] = Field(default_factory=list)
    sram_bytes: int = Field(gt=0)
    flash_bytes: int = Field(gt=0)
    clock_mhz: float = Field(gt=0)
    cycles_per_mac: float | None = Field(None, gt=0)
    instruction_model: str | None = None
    cycles_per_instruction: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_model(self) -> Device:
        if self.instruction_model is None and self.cycles_per_mac is None:
            raise ValueError("give 'cycles_per_mac' or 'instruction_model'")
        if self.instruction_model is not None and self.cycles_per_instruction is None:
            raise ValueError("'instruction_model' needs 'cycles_per_instruction'")
        return self

    def instructions(self) -> InstructionModel | None:
        """The profile's fitted instruction model (None for a cycles-per-MAC profile)."""
        if self.instruction_model is None:
            return None
        models = instruction_models()
        if self.instruction_model not in models:
            raise ConfigError(
                f"device {self.name}: unknown instruction_model {self.instruction_model!r}; "
                f"known: {', '.join(sorted(models))}"
            )
        return models[self.instruction_model]

    def _cycles(self, instructions: float) -> float:
        return instructions * (self.cycles_per_instruction or 0.0)

    def latency_ms(self, work: Workload | int) -> float:
        """Estimated latency of ``work``: a :class:`Workload` (best) or a bare MAC count
        (see the module docstring)."""
        model = self.instructions()
        if model is None:
            macs = work.macs if isinstance(work, Workload) else work
            return macs * self.cycles_per_mac / (self.clock_mhz * 1e3)
        return self._cycles(model.instructions(work)) / (self.clock_mhz * 1e3)

    def latency_bound_ms(self, macs: int) -> float:
        """A lower bound of :meth:`latency_ms` of any graph with ``macs`` MACs (with dense
        weights: a compressed layer may skip some)."""
        model = self.instructions()
        if model is None:
            return macs * self.cycles_per_mac / (self.clock_mhz * 1e3)
        return self._cycles(model.lower_bound(macs)) / (self.clock_mhz * 1e3)

    def latency_text(self) -> str:
        """How :meth:`latency_ms` estimates, in words (for tables)."""
        if self.instruction_model is None:
            return f"MACs x {self.cycles_per_mac:g} cycles / {self.clock_mhz:g} MHz (an estimate)"
        return (
            f"instructions fitted per op type on QEMU ({self.instruction_model}) x "
            f"{self.cycles_per_instruction:g} cycles / {self.clock_mhz:g} MHz (an estimate)"
        )

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


@dataclass
class InstructionFit:
    """An instruction model fitted to measured counts, with its leave-one-out errors."""

    coefficients: dict[str, float]
    per_mac: float  # the one-constant fit (instructions = per_mac x MACs)
    loo_error: list[float]  # |predicted - measured| / measured, each sample left out in turn
    fit_error: list[float]  # the same with every sample in the fit


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the sum of squared *relative* errors: exact,
    by least squares on every subset of the columns (few features), keeping the best one
    whose coefficients are all >= 0."""
    a = x / y[:, None]
    target = np.ones(len(y))
    best, best_cost = np.zeros(x.shape[1]), float(len(y))  # all zero: every error 100%
    used = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    for mask in range(1, 1 << len(used)):
        cols = [used[k] for k in range(len(used)) if mask >> k & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], target, rcond=None)
        if np.any(coef < 0):
            continue
        cost = float(np.sum((a[:, cols] @ coef - target) ** 2))
        if cost < best_cost - 1e-12:
            best = np.zeros(x.shape[1])
            best[cols] = coef
            best_cost = cost
    return best


def fit_instructions(samples: list[tuple[Workload, int]]) -> InstructionFit:
    """Fit an instruction model to ``(workload, measured instructions)`` samples (see the
    module docstring): non-negative least squares on the relative error, then each sample
    left out in turn and predicted by the fit of the others."""
    if len(samples) < 2:
        raise ConfigError(f"fit_instructions needs at least 2 samples, got {len(samples)}")
    x = np.array([w.vector() for w, _ in samples])
    y = np.array([float(n) for _, n in samples])
    if np.any(y <= 0):
        raise ConfigError("fit_instructions: every measured count must be > 0")
    coef = _nnls_relative(x, y)
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        c = _nnls_relative(x[keep], y[keep])
        loo.append(abs(float(x[i] @ c) - y[i]) / y[i])
    macs = np.array([w.macs for w, _ in samples], float)
    per_mac = float(np.sum(macs / y) / np.sum((macs / y) ** 2)) if np.any(macs) else 0.0
    return InstructionFit(
        {k: float(v) for k, v in zip(FEATURES, coef, strict=True)},
        per_mac,
        loo,
        [float(v) for v in np.abs(x @ coef - y) / y],
    )
